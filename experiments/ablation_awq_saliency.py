"""Ablation 2 (issue #15): AWQ's salient channels on Gemma 3 270M, W3 g128 RTN (AWQ Tables 1 and 2).

    python experiments/ablation_awq_saliency.py [--readme] [--out results/ablations/awq_saliency]

Runs the study ``experiments/ablation_awq_saliency.toml`` with ``qlab.sweep`` (resumable; the same as
``qlab sweep experiments/ablation_awq_saliency.toml --out results/ablations/awq_saliency``), then writes the
tables (:func:`keep_table`: AWQ Table 1's layout, :func:`scale_table`: Table 2's), ``saliency.png`` and
``README.md``. ``--readme`` only rewrites the tables, plot and README from the stored runs; the runs of the study
that are not stored are listed as not run.

AWQ (Lin et al. 2024) Table 1: keeping 0.1 / 1 / 3% of each projection's input channels in float under INT3 g128
RTN, chosen by activation magnitude, recovers most of the gap to float; chosen by weight magnitude or at random it
does not. Table 2: instead of keeping them float, scaling the 1% activation-salient channels by ``s`` (weights up,
activations down; exact in float) gives a U shape in ``s`` (best at 2).

The runs: ``float``, ``ptq_rtn`` (plain RTN) and ``rtn_salient`` (:mod:`qlab.experiments.lm_ablations`) with
``saliency`` (activation / weight / random), ``salient_fraction``, ``salient_scale`` (none: the salient rows are
kept float, :func:`qlab.ptq.rtn_keep_float`; ``s``: ``Q(S W) / S``, :func:`qlab.ptq.rtn_scaled`) and ``seed``
(the random draws); the channels per projection are :func:`qlab.experiments.lm_ablations.salient_rows`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qlab.experiments as qx  # noqa: E402

STUDY = "experiments/ablation_awq_saliency.toml"
OUT = "results/ablations/awq_saliency"
FRACTIONS = (0.001, 0.01, 0.03)
CRITERIA = ("activation", "weight", "random")
MODELS = {"gemma3": "Gemma 3 270M"}
TEXTS = {"austen": "Pride and Prejudice", "emma": "Emma"}
#: AWQ Table 1 (OPT-6.7B, INT3 g128, WikiText-2 ppl): FP16 10.86, RTN 23.54
PAPER_FP16, PAPER_RTN = 10.86, 23.54
PAPER_T1 = {("activation", 0.001): 11.58, ("activation", 0.01): 11.39, ("activation", 0.03): 11.36,
            ("weight", 0.001): 23.41, ("weight", 0.01): 22.37, ("weight", 0.03): 22.45,
            ("random", 0.001): 23.54, ("random", 0.01): 24.23, ("random", 0.03): 24.22}
#: AWQ Table 2 (OPT-6.7B, INT3 g128): s = 1 / 1.25 / 1.5 / 2 / 4
PAPER_T2 = {1.0: 23.54, 1.25: 12.87, 1.5: 12.48, 2.0: 11.92, 4.0: 12.36}
_COLUMNS = ("saliency", "salient_fraction", "salient_scale", "seed", "float_weight_share", "perplexity_se",
            "ppl_ratio", "ppl_ratio_se", "weight")


def _norm(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with the columns the report reads (missing ones as NaN)."""
    return runs.assign(**{c: np.nan for c in _COLUMNS if c not in runs})


def kept_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The ``rtn_salient`` runs that keep the salient rows float (no ``salient_scale``: AWQ Table 1)."""
    r = _norm(runs)
    return r[(r.method == "rtn_salient") & r.salient_scale.isna()]


def scaled_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """The ``rtn_salient`` runs that scale the salient rows by ``salient_scale`` (AWQ Table 2)."""
    r = _norm(runs)
    return r[(r.method == "rtn_salient") & r.salient_scale.notna()]


def _one(runs: pd.DataFrame, method: str) -> pd.Series | None:
    sel = runs[runs.method == method]
    return sel.iloc[0] if len(sel) else None


def _fmt(v: pd.Series) -> str:
    if not len(v):
        return ""
    return f"{v.mean():.4g}" if len(v) == 1 else f"{v.mean():.4g} +- {v.std(ddof=1):.2g}"


def fractions(runs: pd.DataFrame) -> list[float]:
    """The salient fractions of the kept-float runs, ascending (AWQ's 0.1 / 1 / 3% when all ran)."""
    return sorted(float(f) for f in kept_runs(runs).salient_fraction.dropna().unique())


def keep_table(runs: pd.DataFrame, value: str = "perplexity") -> pd.DataFrame:
    """Table 1's layout: one row per saliency criterion, one column per fraction kept float (random: mean +- std
    over the seeds), with the RTN and float figures.

    Example:
        >>> r = pd.DataFrame({"method": ["float", "ptq_rtn", "rtn_salient", "rtn_salient", "rtn_salient"],
        ...                   "saliency": [None, None, "activation", "random", "random"],
        ...                   "salient_fraction": [None, None, 0.01, 0.01, 0.01],
        ...                   "salient_scale": [None] * 5, "seed": [0, 0, 0, 0, 1],
        ...                   "perplexity": [17.0, 90.0, 20.0, 80.0, 84.0]})
        >>> keep_table(r).values.tolist()
        [['float', '17'], ['RTN (none kept)', '90'], ['activation', '20'], ['random', '82 +- 2.8']]
    """
    runs = _norm(runs)
    fr = fractions(runs)
    cols = [f"{f * 100:g}%" for f in fr]
    rows = [dict(kept="float", **{c: _fmt(runs[runs.method == "float"][value]) for c in cols}),
            dict(kept="RTN (none kept)", **{c: _fmt(runs[runs.method == "ptq_rtn"][value]) for c in cols})]
    k = kept_runs(runs)
    for crit in CRITERIA:
        sel = k[k.saliency == crit]
        if len(sel):
            rows.append(dict(kept=crit, **{c: _fmt(sel[np.isclose(sel.salient_fraction, f)][value])
                                           for c, f in zip(cols, fr)}))
    return pd.DataFrame(rows, columns=["kept", *cols])


def scale_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Table 2's layout: the scaled runs by ``s`` (s = 1 is RTN), perplexity +- se, paired ratio, KL, top-1, with
    the paper's figure.

    Example:
        >>> r = pd.DataFrame({"method": ["ptq_rtn", "rtn_salient", "rtn_salient"], "salient_scale": [None, 2.0, 1.0],
        ...                   "perplexity": [90.0, 30.0, 90.0], "perplexity_se": [9.0, 3.0, 9.0],
        ...                   "ppl_ratio": [5.0, 1.7, 5.0], "ppl_ratio_se": [0.5, 0.1, 0.5], "kl": [1.0, 0.5, 1.0],
        ...                   "top1": [0.3, 0.5, 0.3]})
        >>> scale_table(r)[["s", "ppl", "paper (OPT-6.7B)"]].values.tolist()
        [[1.0, 90.0, 23.54], [2.0, 30.0, 11.92]]
    """
    t = scaled_runs(runs).copy()
    t["s"] = t["salient_scale"].astype(float)
    t = t.sort_values("s").rename(columns={"perplexity": "ppl", "perplexity_se": "ppl_se", "ppl_ratio": "ratio",
                                           "ppl_ratio_se": "ratio_se"})
    t["paper (OPT-6.7B)"] = [PAPER_T2.get(s) for s in t.s]
    cols = ["s", "ppl", "ppl_se", "ratio", "ratio_se", "kl", "top1", "paper (OPT-6.7B)"]
    return t[[c for c in cols if c in t]].reset_index(drop=True)


def rtn_check(runs: pd.DataFrame) -> dict | None:
    """The s = 1 run against the RTN run: ``Q(1 W) / 1 = Q(W)``, so they must agree (``same``: perplexity, KL and
    top-1 equal to 6 significant digits); None when either is missing.

    Example:
        >>> r = pd.DataFrame({"method": ["ptq_rtn", "rtn_salient"], "salient_scale": [None, 1.0],
        ...                   "perplexity": [90.0, 90.0], "kl": [1.0, 1.0], "top1": [0.3, 0.3]})
        >>> rtn_check(r)
        {'s1': 90.0, 'rtn': 90.0, 'same': True, 'exact': True}
    """
    sc = scaled_runs(runs)
    s1, rtn = sc[np.isclose(sc.salient_scale, 1.0)], _one(runs, "ptq_rtn")
    if not len(s1) or rtn is None:
        return None
    s1 = s1.iloc[0]
    cols = ("perplexity", "kl", "top1")
    same = all(np.isclose(float(s1[c]), float(rtn[c]), rtol=1e-6, atol=0) for c in cols)
    return {"s1": float(s1.perplexity), "rtn": float(rtn.perplexity), "same": bool(same),
            "exact": all(float(s1[c]) == float(rtn[c]) for c in cols)}


def _model(runs: pd.DataFrame) -> str:
    m = str(runs.model.iloc[0]) if "model" in runs and len(runs) else "gemma3"
    return MODELS.get(m, m)


def _text(name) -> str:
    """A text's name in prose (``austen``: the evaluation text, Pride and Prejudice)."""
    return TEXTS.get(str(name), f"`{name}`")


def _calibration(runs: pd.DataFrame) -> str:
    """The activation-salient runs' calibration: ``<seqs> x <len> tokens of <text>``.

    Example:
        >>> _calibration(pd.DataFrame({"method": ["rtn_salient"], "saliency": ["activation"], "salient_scale": [None],
        ...                            "calibration": ["emma"], "calibration_seqs": [32], "calibration_len": [256]}))
        '32 x 256 tokens of Emma'
    """
    a = kept_runs(runs)
    a = a[a.saliency == "activation"]
    if not len(a) or "calibration_seqs" not in a:
        return "the calibration text"
    r = a.iloc[0]
    return f"{int(r.calibration_seqs)} x {int(r.calibration_len)} tokens of {_text(r.calibration)}"


def _spec(runs: pd.DataFrame) -> str:
    w = _norm(runs).weight.dropna()
    return str(w.iloc[0]) if len(w) else "?"


def plot(out: Path, runs: pd.DataFrame):
    """``saliency.png``: perplexity against the fraction kept float per criterion; perplexity against ``s``."""
    from qlab.plot import figure, save

    fig = figure(figsize=(10, 4))
    ax1, ax2 = fig.subplots(1, 2)
    fl, rtn = _one(runs, "float"), _one(runs, "ptq_rtn")
    k = kept_runs(runs)
    for i, crit in enumerate(CRITERIA):
        sel = k[k.saliency == crit]
        if len(sel):
            g = sel.groupby("salient_fraction").perplexity
            m, s = g.mean(), g.std(ddof=1).fillna(0)
            ax1.errorbar(m.index * 100, m.values, yerr=s.values, fmt="o-", color=f"C{i}", label=f"by {crit}")
    for ax in (ax1, ax2):
        if fl is not None:
            ax.axhline(fl.perplexity, color="k", ls="--", lw=1, label="float")
        if rtn is not None:
            ax.axhline(rtn.perplexity, color="C3", ls=":", lw=1, label="RTN, none kept")
        ax.set_yscale("log")
        ax.set_ylabel("perplexity (log)")
    ax1.set_xscale("log")
    if len(k):
        ax1.set_xticks([f * 100 for f in fractions(runs)], [f"{f * 100:g}" for f in fractions(runs)])
    ax1.set_xlabel("input channels kept float per projection (%)")
    ax1.set_title(f"{_model(runs)}, {_spec(runs)} RTN (random: mean +- std over seeds)", fontsize=9)
    ax1.legend(fontsize=7)
    t = scale_table(runs)
    if len(t):
        ax2.errorbar(t.s, t.ppl, yerr=t.ppl_se, fmt="o-", label="1% by activation, scaled")
        ax2.set_xscale("log", base=2)
        ax2.set_xticks(list(t.s), [f"{s:g}" for s in t.s])
        ax2.legend(fontsize=7)
    ax2.set_xlabel("scale s of the 1% activation-salient channels")
    ax2.set_title("weights x s, activations / s (AWQ Table 2)", fontsize=9)
    save(fig, out / "saliency.png")


def gap_closed(ppl: float, rtn: float, fl: float) -> float:
    """The share of RTN's log-perplexity gap to float that ``ppl`` closes (1: float, 0: RTN, < 0: worse than RTN).

    Example:
        >>> round(gap_closed(20.0, 100.0, 10.0), 3), gap_closed(100.0, 100.0, 10.0)
        (0.699, 0.0)
    """
    return float((np.log(rtn) - np.log(ppl)) / (np.log(rtn) - np.log(fl)))


def _pct(v: float) -> str:
    """A share as a whole percent, "-" when not measured, no "-0%".

    Example:
        >>> _pct(0.613), _pct(-0.004), _pct(float("nan"))
        ('61%', '0%', '-')
    """
    if not np.isfinite(v):
        return "-"
    return f"{max(v, 0.0) if abs(v) < 0.005 else v:.0%}"


def missing(study, runs: pd.DataFrame) -> list[str]:
    """Labels of the study's runs with no stored result."""
    done = set(runs.config_hash)
    out = []
    for r in study.runs:
        if r.config_hash in done:
            continue
        label = r.method.name
        if label == "rtn_salient":
            label += f" {r['saliency']} {r['salient_fraction']:g}"
            label += f" s={r['salient_scale']:g}" if r["salient_scale"] is not None else (
                f" seed {r['seed']}" if r["saliency"] == "random" else "")
        out.append(label)
    return out


def readme(runs: pd.DataFrame, study, source: str) -> str:
    """The study's README.md (tables from the stored runs; the findings are written from them)."""
    runs = _norm(runs)
    fl = _one(runs, "float")
    k = kept_runs(runs)
    share = k.groupby("salient_fraction").float_weight_share.mean()
    paper = pd.DataFrame([dict(kept=c, **{f"{f * 100:g}%": PAPER_T1[(c, f)] for f in FRACTIONS}) for c in CRITERIA])
    miss = missing(study, runs)
    miss_txt = ("All runs of the study are stored." if not miss else
                f"**Not run** ({len(miss)} of {len(study.runs)} runs of the study: the study resumes with the same "
                "command): " + "; ".join(miss) + ".")
    r0 = runs.iloc[0]
    env = f"{r0.backend}, jax {r0.jax_version}" if "backend" in runs and "jax_version" in runs else "?"
    n_seeds = int(k[k.saliency == "random"].seed.nunique()) if (k.saliency == "random").any() else 0
    fl_txt = f"float {fl.perplexity:.2f} +- {fl.perplexity_se:.2f}" if fl is not None else "float not run"
    rtn = _one(runs, "ptq_rtn")
    bpw = f"{rtn.bits_per_weight:.4g}" if rtn is not None and "bits_per_weight" in rtn else "?"
    seeds = ", ".join(str(int(v)) for v in sorted(k[k.saliency == "random"].seed.unique())) or "-"
    minutes = runs.wall_s.sum() / 60
    check = rtn_check(runs)
    if check is None:
        check_txt = "(the s = 1 run or the RTN run is not stored)"
    elif check["same"]:
        check_txt = (f"The s = 1 row is a check: `Q(1 W) / 1 = Q(W)`, and it equals the plain RTN run "
                     f"(`ptq_rtn`, perplexity {check['rtn']:.4g}) in perplexity, KL and top-1"
                     f"{' bit for bit' if check['exact'] else ' (to 6 significant digits)'}.")
    else:
        check_txt = (f"**The s = 1 row differs from the plain RTN run** (perplexity {check['s1']:.6g} against "
                     f"{check['rtn']:.6g}), though `Q(1 W) / 1 = Q(W)`.")
    return f"""# Ablation 2: AWQ's salient channels on {_model(runs)}

{study.description}.

**Question.** Are the few input channels with large activations the ones whose weights matter, as AWQ (Lin et al.
2024) argues? AWQ Table 1 (OPT-6.7B, INT3 g128 RTN, WikiText-2): keeping 0.1 / 1 / 3% of each projection's input
channels in float recovers most of the gap to float when they are chosen by activation magnitude, and nothing when
chosen by weight magnitude or at random. Table 2: instead of keeping them float, scaling the 1% activation-salient
channels by `s` (weights x s, activations / s: exact in float) gives a U shape in `s`, best at 2.

**Setup.** The study `{source}`, run with `qlab sweep {STUDY} --out {OUT}`, then
`python experiments/ablation_awq_saliency.py --readme` for this file and `saliency.png`: {len(runs)} runs,
{minutes:.0f} min summed over the runs' `wall_s` (the first runs include loading the model, the float evaluation and
the one calibration capture; process start and imports extra; {env}). {miss_txt}

Every attention / MLP projection at `{_spec(runs)}` (AWQ's zero-point INT3 with groups of 128 along the input;
{bpw} bits per weight with the f16 scale and 3-bit zero point per group), the tied embedding float; RTN with qlab's
min-max range for an asymmetric spec, no clipping search (`ptq_rtn`). The `rtn_salient` runs pick per projection
`max(1, round(salient_fraction x inputs))` input channels (kernel rows) by `saliency`: `activation` = mean |x| over
the calibration tokens ({_calibration(runs)}, BOS + text at random offsets with seed 0; one float pass shared by
the runs), `weight` = the L2 norm of the kernel row, `random` = a uniform draw (seed `1000 x seed + projection
index`, seeds {seeds}); then either restore those rows to float after RTN of the whole kernel (`salient_scale`
none, Table 1) or quantize `Q(S W) / S` with `S` = s on those rows (Table 2, the same as dividing their
activations by s). Perplexity on the first {int(r0.eval_tokens)} tokens of {_text(r0.data)} ({fl_txt}) with its
standard error; `ratio` is the paired perplexity ratio to float +- its standard error over tokens, `kl` the mean
KL(float || quantized) per token, `top1` the share of positions whose most likely next token is float's, all
through the float model with the effective kernels swapped in. `float_weight_share`: the share of the projections'
weights kept float (`bits_per_weight` counts the RTN codes only). `layers.csv` holds the RTN codes per projection,
the same for every run (the kept or scaled rows are applied to the evaluated kernels only).

## Keeping salient channels in float (AWQ Table 1)

Perplexity (random: mean +- std over {n_seeds} seeds; share of the projections' weights kept float:
{', '.join(f'{f * 100:g}% -> {v * 100:.2f}%' for f, v in share.items())}):

{keep_table(runs).to_markdown(index=False)}

Paired perplexity ratio to float:

{keep_table(runs, "ppl_ratio").to_markdown(index=False)}

The paper (OPT-6.7B, INT3 g128, WikiText-2; FP16 {PAPER_FP16}, RTN {PAPER_RTN}):

{paper.to_markdown(index=False)}

## Scaling the 1% activation-salient channels (AWQ Table 2)

{scale_table(runs).to_markdown(index=False, floatfmt=".4g")}

{check_txt}

![saliency](saliency.png)

{findings(runs)}
"""


def findings(runs: pd.DataFrame) -> str:
    """The README's "What it shows": the paper beside qlab, with the figures from the stored runs (empty until
    float, RTN, kept-float and scaled runs are all stored)."""
    runs = _norm(runs)
    k, sc = kept_runs(runs), scale_table(runs)
    fl_row, rtn_row = _one(runs, "float"), _one(runs, "ptq_rtn")
    if fl_row is None or rtn_row is None or not len(k) or not len(sc):
        return ""
    fl, rtn = float(fl_row.perplexity), float(rtn_row.perplexity)

    def kp(crit, f):
        return k[(k.saliency == crit) & np.isclose(k.salient_fraction, f)].perplexity

    def closed(crit, f):
        v = kp(crit, f)
        return gap_closed(float(v.mean()), rtn, fl) if len(v) else float("nan")

    def ppl(crit, f):
        v = kp(crit, f)
        return f"{v.mean():.1f}" if len(v) else "-"

    def three(crit):
        return " / ".join(_pct(closed(crit, f)) for f in FRACTIONS)

    pg = {key: gap_closed(v, PAPER_RTN, PAPER_FP16) for key, v in PAPER_T1.items()}
    pt2 = {s_: gap_closed(v, PAPER_RTN, PAPER_FP16) for s_, v in PAPER_T2.items()}
    best = sc.loc[sc.ppl.idxmin()]
    u = best.s not in (sc.s.min(), sc.s.max())
    a = {f: closed("activation", f) for f in FRACTIONS}
    fr = fractions(runs)
    top = fr[-1]
    ranking = all(kp("activation", f).mean() < min(kp("weight", f).mean(), kp("random", f).mean())
                  for f in fr if len(kp("weight", f)) and len(kp("random", f)))
    rising = all(np.diff([closed("activation", f) for f in fr]) > 0)
    kshare = k.groupby("salient_fraction").float_weight_share.mean()
    ps = {float(s): r for s, r in zip(sc.s, sc.itertuples())}
    scale_notes = []
    if 1.25 in ps and 1.5 in ps:
        p, q = ps[1.25], ps[1.5]
        level = abs(p.ppl - q.ppl) < max(p.ppl_se, q.ppl_se)
        scale_notes.append(f"s = 1.25 and 1.5 are {'level' if level else 'apart'} ({p.ppl:.1f} and {q.ppl:.1f}, "
                           f"{'within' if level else 'more than'} one standard error)")
    if 2.0 in ps and 4.0 in ps:
        worse = ps[4.0].ppl > ps[2.0].ppl
        scale_notes.append(f"s = 4 is {'worse' if worse else 'no worse'} than 2 ({ps[4.0].ppl:.1f} against "
                           f"{ps[2.0].ppl:.1f}" + ("; the paper's reading: a larger scale coarsens the other channels "
                                                   "of the salient channels' groups of 128)" if worse else ")"))
    se = (runs.perplexity_se / runs.perplexity)[runs.method != "float"].median()
    up = sc[sc.s > 1]
    scaled = f"s = {' / '.join(f'{v:g}' for v in up.s)}: " + " / ".join(_pct(gap_closed(v, rtn, fl)) for v in up.ppl)
    paper_s = " / ".join(f"{pt2[v]:.0%}" for v in (1.25, 1.5, 2.0, 4.0))
    as_paper = ", as AWQ Table 2" if u and best.s == 2 else ""
    shares = " / ".join(f"{100 * kshare[f]:.2f}%" if f in kshare else "-" for f in FRACTIONS)
    ppl3 = " / ".join(ppl("activation", f) for f in FRACTIONS)

    def paper3(crit):
        return " / ".join(f"{pg[(crit, f)]:.0%}" for f in FRACTIONS)

    def agree(crit):
        return "yes" if closed(crit, top) < 0.25 else "partly"

    u_txt = ("yes" if u and best.s == 2 else f"yes, best at {best.s:g}" if u else
             f"no: best at the {'largest' if best.s == sc.s.max() else 'smallest'} s")
    a1_txt = _pct(a[0.01])
    size_agrees = "yes" if a[0.01] > 0.8 else "partly: the ranking, not the size"
    return f"""## What it shows

Share of RTN's gap to float closed, in log perplexity (`(log RTN - log ppl) / (log RTN - log float)`; 100%: float,
0: RTN), beside the paper's (OPT-6.7B, FP16 {PAPER_FP16}, RTN {PAPER_RTN}); random is the mean over the seeds:

| finding | paper | qlab ({_model(runs)}, {_spec(runs)}; float {fl:.2f}, RTN {rtn:.1f}) | agrees? |
|---|---|---|---|
| activation-salient channels kept float recover most of the gap | 0.1 / 1 / 3%: {paper3('activation')} | {three('activation')} (ppl {ppl3}) | {size_agrees} |
| weight-salient channels do not | {paper3('weight')} | {three('weight')} | {agree('weight')} |
| random channels do not | {paper3('random')} | {three('random')} | {agree('random')} |
| scaling the 1% salient channels: a U in s, best at 2 | s = 1.25 / 1.5 / 2 / 4: {paper_s} | {scaled}; best s = {best.s:g} (ppl {best.ppl:.1f}) | {u_txt} |

- The activations pick the channels that matter, the weights do not: {a1_txt} of the log gap closed by the 1%
  activation-salient channels against {_pct(closed('weight', 0.01))} by the 1% of largest weight rows and
  {_pct(closed('random', 0.01))} by random ones, as in the paper, and the ranking
  {"holds at every fraction" if ranking else "does not hold at every fraction"}.
- The size departs: the paper's 0.1% already closes {_pct(pg[('activation', 0.001)])} of OPT-6.7B's gap (and 1%
  closes 93% of OPT-1.3B's, RTN 119.00 -> 16.91 against FP16 14.62); here the gap
  {"keeps closing" if rising else "does not keep closing"} with more channels ({three('activation')} at
  0.1 / 1 / 3%, float weights {shares}),
  so {_model(runs)}'s salient set is wider than 1%, and {_spec(runs)} RTN hurts it far more to begin with (ratio to
  float {rtn_row.ppl_ratio:.1f}, against {PAPER_RTN / PAPER_FP16:.2f} for OPT-6.7B): with {top * 100:g}% kept float
  it is still at {float(kp('activation', top).mean()) / fl:.2f}x float's perplexity.
- Scaling instead of keeping float: {"a U in s" if u else "no U in s"} with its best at s = {best.s:g}
  ({_pct(gap_closed(float(best.ppl), rtn, fl))} of the gap, against {a1_txt} for the same channels kept float;
  the paper: {_pct(pt2[2.0])} against {_pct(pg[('activation', 0.01)])}){as_paper};
  {"; ".join(scale_notes) or "-"}.
- Departures: one model ({_model(runs)}), one text of {int(runs.eval_tokens.iloc[0])} tokens (perplexity standard
  errors of about {se:.0%}; the paired ratios carry their own); RTN with qlab's min-max range and no clipping
  search; the float baseline is Gemma's Q4_K_M GGUF dequantized; channels are chosen per projection (q/k/v share
  their input, so they keep the same activation-chosen channels, as gate/up do), random draws differ per
  projection; calibration on {_calibration(runs)}, not the Pile.
"""


def write(out: Path, study) -> None:
    """``saliency.png`` and ``README.md`` from the stored runs (``study``: the :class:`qlab.experiments.Study`)."""
    out = Path(out)
    runs = qx.load_results(out)
    stored = json.loads((out / "study.json").read_text()) if (out / "study.json").is_file() else {}
    source = stored.get("source") or study.source or STUDY
    plot(out, runs)
    (out / "README.md").write_text(readme(runs, study, source))
    print(keep_table(runs).to_string())
    print(scale_table(runs).to_string())


if __name__ == "__main__":
    qx.study_script(__doc__, ROOT / STUDY, ROOT / OUT, write)
