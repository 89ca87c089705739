"""Ablation 6, Gemma 3 270M half (range setting and granularity): the README and figure of its study folder.

    qlab sweep experiments/ablation_range_gemma3.toml --out results/ablations/range_gemma3   # the runs (resumable)
    python experiments/ablation_range_gemma3.py --readme [--out results/ablations/range_gemma3]   # README.md + figure
    (without --readme the script runs the sweep first)

Reads the stored runs only (``qlab.experiments.load_results``) and writes ``range_vs_bits.png`` (perplexity ratio
to float against bits, one panel per granularity, one line per range setting: ``qlab.plot.metric_vs_bits_panels``)
and ``README.md`` (one table: ``qlab.experiments.results.range_table`` with the mean weight SQNR of the
projections from ``layers.csv``). Every figure in the README is read from the runs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qlab.experiments as qx  # noqa: E402
from qlab import plot  # noqa: E402
from qlab.experiments.results import range_labels, range_table  # noqa: E402

STUDY = "experiments/ablation_range_gemma3.toml"
COMMAND = f"qlab sweep {STUDY} --out results/ablations/range_gemma3"


def table(runs: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    """:func:`range_table` of the runs plus ``sqnr_db``: the mean weight SQNR (dB) over the quantized projections.

    Example:
        >>> r = pd.DataFrame({"config_hash": ["f", "a"], "method": ["float", "ptq_rtn"], "granularity": [None, "ch"],
        ...                   "bits": [None, 4], "range": [None, "mse"], "symmetric": [None, True],
        ...                   "ppl_ratio": [1.0, 1.2], "collapsed": [False, False]})
        >>> l = pd.DataFrame({"config_hash": ["a", "a"], "weight_sqnr_db": [20.0, 22.0]})
        >>> table(r, l)[["range", "sqnr_db"]].values.tolist()
        [['float', nan], ['mse', 21.0]]
    """
    sqnr = layers.dropna(subset=["weight_sqnr_db"]).groupby("config_hash")["weight_sqnr_db"].mean()
    t = runs.assign(sqnr_db=runs["config_hash"].map(sqnr))
    return range_table(t, metrics=("bits_per_weight", "perplexity", "ppl_ratio", "ppl_ratio_se", "kl", "top1",
                                   "sqnr_db"))


def markdown(t: pd.DataFrame) -> str:
    """The README table: collapsed runs read ``collapsed`` (their perplexity in brackets), ratios with their
    paired standard error."""
    def ratio(r):
        if r.range == "float":
            return f"1 (ppl {r.perplexity:.2f})"
        if r.collapsed:
            return f"collapsed (ppl {r.perplexity:.2g})"
        se = f"{r.ppl_ratio_se:.2g}"
        return f"{r.ppl_ratio:.4g} ± {se}{'.0' if se.isdigit() and len(se) == 1 else ''}"

    return (pd.DataFrame({
        "granularity": t["granularity"], "bits": ["" if pd.isna(b) else str(b) for b in t["bits"]], "range": t["range"],
        "ppl / float ± se": [ratio(r) for r in t.itertuples()],
        "KL": [f"{v:.3g}" for v in t["kl"]], "top-1": [f"{v:.3f}" for v in t["top1"]],
        "weight SQNR dB": ["" if pd.isna(v) else f"{v:.1f}" for v in t["sqnr_db"]],
        "bits/weight": [f"{v:.3f}" for v in t["bits_per_weight"]]})
            .to_markdown(index=False, disable_numparse=True))


def figure(runs: pd.DataFrame):
    t = runs.assign(range=range_labels(runs))
    return plot.metric_vs_bits_panels(t, "granularity", y="ppl_ratio", x="bits", hue="range", logy=True,
                                      collapsed="collapsed",
                                      title="Gemma 3 270M, RTN weights: perplexity / float by range setting")


def wall_minutes(runs: pd.DataFrame) -> tuple[float, float]:
    """``(span, sum)`` in minutes: from the first run's start (its finish less its wall time) to the last finish,
    and the runs' wall times summed."""
    end = pd.to_datetime(runs["finished_at"])
    start = end - pd.to_timedelta(runs["wall_s"], unit="s")
    return (end.max() - start.min()).total_seconds() / 60, runs["wall_s"].sum() / 60


def findings(t: pd.DataFrame) -> str:
    """The README's "What it shows", every figure read from ``t`` (:func:`table`)."""
    q = t[t["range"] != "float"].set_index(["granularity", "bits", "range"])

    def r(g, b, rng):  # the ratio to float, or "collapsed"
        row = q.loc[(g, b, rng)]
        return "collapsed" if row.collapsed else f"{row.ppl_ratio:.4g}"

    def db(g, b, rng):
        return f"{q.loc[(g, b, rng)].sqnr_db:.1f} dB"

    def span(g, b, ranges):
        v = [q.loc[(g, b, x)].ppl_ratio for x in ranges]
        return f"{min(v):.3f}-{max(v):.3f}"

    n_t = int(q.loc["tensor"].collapsed.sum())
    n_c = int(q.loc["ch"].collapsed.sum())
    on_par = ("absmax", "minmax", "mse", "mse asym")
    return f"""Per-channel scales beat per-tensor ones at every bit width and range, by far more than on the CNN:
one scale per tensor costs Gemma 3 270M {span("tensor", 8, on_par)}x float perplexity already at int8 (per channel
{span("ch", 8, on_par)}), and at int4 it leaves nothing usable (absmax {r("tensor", 4, "absmax")}, min-max
{r("tensor", 4, "minmax")}, the best, MSE asym, {r("tensor", 4, "mse asym")}); {n_t} of the 15 per-tensor runs
collapse against {n_c} of the 15 per-channel ones. Mean weight SQNR at int8 absmax: {db("tensor", 8, "absmax")} per
tensor, {db("ch", 8, "absmax")} per channel: the output channels of a projection span very different ranges, and one
scale for all of them leaves most channels few codes.
At 8 bits per channel the ranges are on par, as in the paper (absmax {r("ch", 8, "absmax")}, min-max
{r("ch", 8, "minmax")}, MSE {r("ch", 8, "mse")}, MSE asym {r("ch", 8, "mse asym")}); per tensor MSE is a little worse
than the plain range (MSE {r("tensor", 8, "mse")} / {r("tensor", 8, "mse asym")} asym against absmax
{r("tensor", 8, "absmax")} / min-max {r("tensor", 8, "minmax")}: about 0.05 apart, 2-4 times either run's paired
standard error).
At 3 bits MSE wins, as in the paper: per channel absmax and p99.9 collapse and MSE reaches {r("ch", 3, "mse")},
and asymmetric MSE is the best run, {r("ch", 3, "mse asym")} against min-max {r("ch", 3, "minmax")} (standard errors
{q.loc[("ch", 3, "mse asym")].ppl_ratio_se:.2g} and {q.loc[("ch", 3, "minmax")].ppl_ratio_se:.2g}); per tensor only
asymmetric MSE stays below the collapse threshold ({r("tensor", 3, "mse asym")}, useless all the same).
At 4 bits per channel the paper's finding does not hold: MSE raises the mean weight SQNR ({db("ch", 4, "mse")}
against absmax {db("ch", 4, "absmax")}; asym {db("ch", 4, "mse asym")} against min-max {db("ch", 4, "minmax")}) and
yet raises perplexity (MSE {r("ch", 4, "mse")} against absmax {r("ch", 4, "absmax")}; MSE asym
{r("ch", 4, "mse asym")} against min-max {r("ch", 4, "minmax")}, the best int4 run), while the light percentile clip
helps a little (p99.9 {r("ch", 4, "p99.9")}). The percentile runs at 8 bits show what is at stake: clipping the
largest 0.1% of the weights costs more than all the rounding (p99.9 {r("tensor", 8, "p99.9")} per tensor,
{r("ch", 8, "p99.9")} per channel), so Gemma's largest weights matter to its output far more than their share of the
squared weight error says, and a range chosen to minimise that error trades them for the bulk. It pays off only where
rounding error is catastrophic (3 bits, 4 bits per tensor). The asymmetric grid (one more code, a zero point) beats
the symmetric one at 4 and 3 bits per channel, for the max range and for MSE alike.

**Against the paper and the CNN half.** Nagel et al.: per-channel beats per-tensor, most at low bits (yes, and far
more strongly than on the CNN, whose int8 and int4 per-tensor runs were on par with per-channel); at 8 bits MSE and
min-max on par (yes per channel; per tensor MSE slightly worse); at 4 bits and below MSE clearly wins (at 3 bits yes;
at 4 bits per channel no: MSE is worse than the max range in both shapes; on the CNN nothing won at 4 bits).

**Departures.** One model and one text of 1,024 tokens (perplexity standard errors of about 8%: compare the paired
ratios); the float baseline is itself dequantized from a Q4_K_M GGUF, so the "float" weights already sit on 4- to
8-bit block grids. RTN of the weights only (activations float, the embedding float); MSE searches 100 clip ratios
down to 0.2 per scale group and minimises the weights' squared error, not the output's. Groups (g128) were not run:
at about a minute a run on the shared machine the 31 runs already took over half an hour.
"""


def readme(runs: pd.DataFrame, layers: pd.DataFrame, study) -> str:
    t = table(runs, layers)
    fl = runs[runs.method == "float"].iloc[0]
    span, total = wall_minutes(runs)
    day = pd.to_datetime(runs["finished_at"]).max().date().isoformat()
    return f"""# Ablation 6: range setting and granularity (Nagel et al. 2021), Gemma 3 270M, RTN weights

{study.description}.

**Question.** How much of round-to-nearest's damage on a pretrained language model comes from the range setting
(what the largest code stands for) and from the granularity (one scale per tensor or per output channel)? The white
paper (Nagel et al. 2021, `../shared/PAPERS.md`): per-channel weight scales beat per-tensor, most at low bits; at 8
bits MSE and min-max ranges are on par, at 4 bits and below MSE clearly beats min-max. The CNN half of this ablation
is [range_granularity](../range_granularity/README.md).

**What ran.** `{COMMAND}`
(source: `{STUDY}`; the same as `.venv/bin/python -m qlab.cli sweep ...`), then
`python experiments/ablation_range_gemma3.py --readme` for this file and `range_vs_bits.png` (`pareto.png`,
`perplexity_vs_bits.png` and `layers.png` are the sweep's own figures). {len(runs)} runs in one process:
{span:.0f} min wall from the first run's start to the last one's end ({total:.0f} min summed over runs; finished
{day}), on 2 CPU cores shared with another Gemma sweep, jax {runs['jax_version'].iloc[0]}.

**Setup.** Every attention and MLP projection of Gemma 3 270M (126 matrices,
{int(runs.loc[runs.method != 'float', 'quantized_params'].iloc[0]):,} weights) rounded to nearest at int8 / int4 / int3 with one f16 scale per tensor (`tensor`) or per output channel
(`ch`); the tied embedding and everything else float, activations float. Ranges: `absmax` (symmetric, ±max|w|),
`minmax` (asymmetric [min w, max w] with an integer zero point), `p99.9` (symmetric, the 99.9th percentile of |w|),
`mse` (symmetric, the clip of least squared weight error on a grid of 100 ratios of the absmax range down to 0.2,
chosen per scale group: per tensor or per channel) and `mse asym` (the same from the min-max range). Symmetric
min-max is absmax in qlab, so that pair is not repeated. RTN of a pretrained model is deterministic: one run per
cell (seed 0), no seed spread. Perplexity on the first {int(fl['eval_tokens']):,} tokens of Pride and Prejudice
(float {fl['perplexity']:.2f} ± {fl['perplexity_se']:.2f}); `ppl / float` is the paired perplexity ratio to float with
its standard error (paired over tokens, far smaller than either perplexity's); `KL` the mean KL(float || quantized) per
token in nats; `top-1` the share of positions whose most likely next token is float's; weight SQNR
`10 log10(|W|^2 / |W - Q(W)|^2)` averaged over the 126 projections (`layers.csv`); bits per weight count codes,
scales and zero points. A run is `collapsed` when its perplexity exceeds the vocabulary size (262,144: worse than a
uniform guess).

## Results

{markdown(t)}

![range x granularity](range_vs_bits.png)

(Collapsed runs are the crosses on the top edge.)

## What it shows

{findings(t)}"""


def write(out) -> pd.DataFrame:
    """Write ``range_vs_bits.png`` and ``README.md`` into the study folder ``out`` from its runs; returns the table."""
    out = Path(out)
    runs, layers = qx.load_results(out, layers=True)
    plot.save(figure(runs), out / "range_vs_bits.png")
    (out / "README.md").write_text(readme(runs, layers, qx.load_study(ROOT / STUDY, check=False)))
    return table(runs, layers)


if __name__ == "__main__":
    qx.study_script(__doc__, ROOT / STUDY, ROOT / "results/ablations/range_gemma3",
                    lambda out, study: print(write(out).to_string()))
