"""Ablation 4 (issue #15): LLM.int8() outlier features on Gemma 3 270M.

    python experiments/ablation_llm_int8.py [--readme] [--out results/ablations/llm_int8]

Runs the study ``experiments/ablation_llm_int8.toml`` with ``qlab.sweep`` (resumable; the same as
``qlab sweep experiments/ablation_llm_int8.toml --out results/ablations/llm_int8``), then writes the report:
``outliers.csv``, ``outliers.png`` and ``README.md``. ``--readme`` only rewrites them from the stored runs.

Three parts, on the first ``eval_tokens`` tokens of Pride and Prejudice (the text formats4 scores):

* **outlier features** (Dettmers et al. 2022): the inputs of every attention / MLP projection, captured in one
  float pass (:func:`qlab.experiments.lm_ablations.hidden_inputs`, the capture the ``zero_outliers`` runs use);
  per layer, a feature is an outlier when its magnitude is >= 6 at >= 6% of the sequence positions
  (:func:`qlab.ptq.outlier_dims`); a hidden dimension is *systematic* when it is an outlier in >= 25% of the layers
  that read the hidden state (the normed block inputs of q/k/v and gate/up). Per block and input site:
  ``outliers.csv`` (:func:`outlier_table`), computed by :func:`write` only when it is missing (one capture of the
  model, outside the sweep).
* **W8A8** (``ptq_rtn`` runs with ``act`` and ``outlier_threshold``): int8 per-channel weights (symmetric absmax,
  stored as codes whose scales span every input row, the decomposed ones too) with int8 activations per tensor (absmax, or asymmetric
  "zeropoint"), per token ("vector-wise", symmetric or zeropoint), and per token with LLM.int8's decomposition at
  thresholds 4 / 6 / 8 (input columns whose magnitude exceeds the threshold anywhere in the sequence stay float with
  their weight rows). Dynamic activation ranges; float32 products of the fake-quantized operands. Every projection
  is quantized, the tied embedding stays float. The share of input columns kept float is counted from
  ``outliers.csv`` (:func:`float_column_share`).
* **zeroing** (``zero_outliers`` runs, the paper's "remove the outlier features"): the systematic hidden dimensions
  set to zero in the input of every q/k/v and gate/up projection (``zero_dims = "systematic"``), against as many
  random other dimensions (``zero_dims = "random"``, 3 seeds).

Metrics per run: perplexity with its standard error, the paired ratio to float, KL to float and top-1 agreement.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qlab.experiments as qx  # noqa: E402
from qlab import ptq  # noqa: E402
from qlab.experiments.lm_ablations import SITES  # noqa: E402
from qlab.experiments.results import atomic_write_text  # noqa: E402

STUDY = "experiments/ablation_llm_int8.toml"
OUT = "results/ablations/llm_int8"
SCRIPT = "experiments/ablation_llm_int8.py"
#: the projection whose captured input stands for each input site
SITE_LAYER = {"attn_in": "attn/q_proj", "attn_out": "attn/o_proj", "mlp_in": "mlp/gate_proj",
              "mlp_hidden": "mlp/down_proj"}
#: how many projections read each site (q/k/v share attn_in, gate/up share mlp_in)
SITE_PROJECTIONS = {site: sum(s == site for s in SITES.values()) for site in SITE_LAYER}
#: W8A8 activation schemes: key -> (label, activation spec, LLM.int8 threshold)
SCHEMES = {
    "tensor_absmax": ("A8 per-tensor absmax", "int8", None),
    "tensor_zeropoint": ("A8 per-tensor zeropoint", "int8/asym", None),
    "vector_wise": ("A8 per-token absmax (vector-wise)", "int8/ch", None),
    "vector_zeropoint": ("A8 per-token zeropoint", "int8/ch/asym", None),
    "llm_int8_t4": ("vector-wise + decomposition, threshold 4", "int8/ch", 4.0),
    "llm_int8_t6": ("vector-wise + decomposition, threshold 6 (LLM.int8)", "int8/ch", 6.0),
    "llm_int8_t8": ("vector-wise + decomposition, threshold 8", "int8/ch", 8.0),
}
#: LLM.int8() Table 1 (C4 perplexity, 125M model), the rows our schemes correspond to
PAPER_ROW = {"float": "float 25.65", "tensor_absmax": "absmax row-wise 30.93 (per-tensor A, per-row W)",
             "tensor_zeropoint": "zeropoint 56.66 (per-tensor W and A)", "vector_wise": "absmax vector-wise 35.84",
             "vector_zeropoint": "zeropoint vector-wise 25.72", "llm_int8_t6": "LLM.int8() 25.83",
             "llm_int8_t4": "-", "llm_int8_t8": "-"}


def scheme_key(method: str, act, threshold) -> str | None:
    """The :data:`SCHEMES` key of a run from its ``method``, ``act`` and ``outlier_threshold`` ("float" for the
    float run, None for a run that is none of the schemes).

    >>> scheme_key("float", None, None), scheme_key("ptq_rtn", "int8/ch", 6.0), scheme_key("ptq_rtn", "int8", None)
    ('float', 'llm_int8_t6', 'tensor_absmax')
    >>> scheme_key("ptq_rtn", "int8/ch", float("nan")), scheme_key("zero_outliers", None, None)
    ('vector_wise', None)
    """
    if method == "float":
        return "float"
    if method != "ptq_rtn":
        return None
    thr = None if threshold is None or pd.isna(threshold) else float(threshold)
    return next((k for k, (_, a, t) in SCHEMES.items() if a == act and t == thr), None)


def _site_inputs(inputs: dict, site: str) -> dict[str, np.ndarray]:
    suffix = "/" + SITE_LAYER[site]
    return {p[: -len(suffix)]: x for p, x in inputs.items() if p.endswith(suffix)}


def outlier_table(inputs: dict, norm_gains: dict | None = None) -> pd.DataFrame:
    """Per block and input site, from ``{projection path: captured input [positions, features]}``
    (:func:`qlab.experiments.lm_ablations.hidden_inputs`): width, the largest magnitude, the paper's outlier
    features (>= 6 at >= 6% of positions: count and dims), the features above 4 / 6 / 8 anywhere (the columns
    LLM.int8 keeps float at that threshold) and ``wide_positions``, the share of positions at which more than half
    the features reach 6. ``norm_gains`` (``{(block, site): RMSNorm gain}`` of the normed sites) adds what the normed
    input was before the gain, ``x / gain`` (RMS 1 per position): the median gain, the mean share of a position's
    squared norm held by its largest dimension (``top_share``; near 1 where a few "massive" residual dimensions
    dominate the RMS), and the dimension that is largest most often (``top_dim``).

    >>> x = np.zeros((50, 4), np.float32); x[:5, 2] = 9.0; x[0, 1] = 5.0
    >>> xs = {f"layers/{i}/{s}": x for i in range(2) for s in SITE_LAYER.values()}
    >>> t = outlier_table(xs)
    >>> t[["block", "site", "outliers", "above_4", "above_8"]].values.tolist()[0], systematic_from_table(t)
    ([0, 'attn_in', 1, 2, 1], [2])
    >>> t = outlier_table(xs, {(0, "attn_in"): np.full(4, 3.0)})
    >>> t[["gain_median", "top_share", "top_dim"]].round(3).values.tolist()[0]   # (81 / 106 + 4 * 1) / 5
    [3.0, 0.953, 2.0]
    """
    rows = []
    for site in SITE_LAYER:
        for blk, x in _site_inputs(inputs, site).items():
            x = np.asarray(x, np.float32)
            a = np.abs(x).max(0)
            dims = ptq.outlier_dims(x)
            b = int(blk.split("/")[-1])
            extra = {}
            g = (norm_gains or {}).get((b, site))
            if g is not None:
                g = np.asarray(g, np.float32)
                v = x / np.where(g == 0, 1, g)
                e = v * v
                tot = e.sum(1)
                ok = tot > 0
                extra = dict(gain_median=float(np.median(np.abs(g))),
                             top_share=float((e.max(1)[ok] / tot[ok]).mean()) if ok.any() else 0.0,
                             top_dim=float(np.bincount(e.argmax(1)[ok]).argmax()) if ok.any() else float("nan"))
            rows.append(dict(block=b, site=site, width=x.shape[1], positions=x.shape[0],
                             absmax=float(a.max()), median_absmax=float(np.median(a)),
                             wide_positions=float(((np.abs(x) >= 6.0).mean(1) > 0.5).mean()),
                             outliers=len(dims), outlier_dims=" ".join(map(str, dims)),
                             **{f"above_{t}": int((a > t).sum()) for t in (4, 6, 8)}, **extra))
    return pd.DataFrame(rows).sort_values(["block", "site"], kind="stable").reset_index(drop=True)


def capture_outliers(model: str, data: str, eval_tokens: int) -> pd.DataFrame:
    """:func:`outlier_table` of ``model`` on its evaluation tokens, with the RMSNorm gains of the normed sites
    (one float capture: the one the ``zero_outliers`` runs use)."""
    from qlab.experiments import lm
    from qlab.experiments.lm_ablations import hidden_inputs

    inputs = hidden_inputs(model, data, int(eval_tokens))
    gains = {(i, site): np.asarray(getattr(layer, norm).weight[...])
             for i, layer in enumerate(lm.lm_model(model)[0].layers)
             for site, norm in (("attn_in", "pre_attn_norm"), ("mlp_in", "pre_ffn_norm"))}
    return outlier_table(inputs, gains)


def float_column_share(outl: pd.DataFrame, threshold: float) -> float:
    """The share of the projections' input columns that LLM.int8's decomposition at ``threshold`` (4, 6 or 8)
    keeps float: the columns above it anywhere on the tokens (``outliers.csv``'s ``above_<t>``), each site weighted
    by the projections that read it (:data:`SITE_PROJECTIONS`) and its width.

    >>> t = pd.DataFrame({"site": ["attn_in", "attn_out"], "width": [10, 20], "above_6": [5, 0]})
    >>> float_column_share(t, 6)   # q/k/v: 3 x 5 of 3 x 10, o_proj: 0 of 20
    0.3
    """
    col = f"above_{float(threshold):g}"
    if col not in outl:
        return float("nan")
    n = outl.site.map(SITE_PROJECTIONS)
    return float((n * outl[col]).sum() / (n * outl.width).sum())


def outlier_counts(outl: pd.DataFrame, sites=("attn_in", "mlp_in"), exclude_blocks=()) -> tuple[dict[int, int], int]:
    """``({dimension: the number of layers in which it is an outlier}, layers)`` over the ``sites`` rows of
    ``outliers.csv`` (its ``outlier_dims``), leaving out ``exclude_blocks``.

    >>> t = pd.DataFrame({"block": [0, 0, 1, 1], "site": ["attn_in", "mlp_in"] * 2,
    ...                   "outlier_dims": ["0 1 2", "1", "1", float("nan")]})
    >>> outlier_counts(t)
    ({0: 1, 1: 3, 2: 1}, 4)
    """
    sel = outl[outl.site.isin(list(sites)) & ~outl.block.isin(list(exclude_blocks))]
    counts: dict[int, int] = {}
    for dims in sel.outlier_dims.fillna(""):
        for d in str(dims).split():
            counts[int(d)] = counts.get(int(d), 0) + 1
    return counts, len(sel)


def systematic_from_table(outl: pd.DataFrame, exclude_blocks=(), min_layers: float = 0.25,
                          sites=("attn_in", "mlp_in")) -> list[int]:
    """Systematic hidden dimensions counted from ``outliers.csv`` (an outlier in >= ``min_layers`` of the
    ``sites`` layers, as :func:`qlab.ptq.systematic_outliers`), leaving out ``exclude_blocks``.

    >>> t = pd.DataFrame({"block": [0, 0, 1, 1], "site": ["attn_in", "mlp_in"] * 2,
    ...                   "outlier_dims": ["0 1 2", "1", "1", float("nan")]})
    >>> systematic_from_table(t), systematic_from_table(t, exclude_blocks=[0], min_layers=0.5)
    ([0, 1, 2], [1])
    """
    counts, n = outlier_counts(outl, sites, exclude_blocks)
    return sorted(d for d, c in counts.items() if c >= min_layers * n - 1e-9)


def _col(t: pd.DataFrame, name: str) -> pd.Series:
    return t[name] if name in t else pd.Series([None] * len(t), index=t.index, dtype=object)


def scheme_table(runs: pd.DataFrame, outl: pd.DataFrame | None = None) -> pd.DataFrame:
    """The float and W8A8 rows in :data:`SCHEMES` order: scheme, perplexity +- se, paired ratio +- se, KL +- se,
    top-1, the share of the projections' input columns kept float (decomposition runs: from ``outl``,
    ``outliers.csv``, :func:`float_column_share`), with the paper's figure.

    >>> r = pd.DataFrame({"method": ["ptq_rtn", "float"], "act": ["int8/ch", None], "outlier_threshold": [6.0, None],
    ...                   "perplexity": [18.0, 17.0], "perplexity_se": [1.1, 1.0], "ppl_ratio": [1.05, 1.0],
    ...                   "ppl_ratio_se": [0.01, 0.0], "kl": [0.02, 0.0], "kl_se": [0.001, 0.0], "top1": [0.95, 1.0]})
    >>> o = pd.DataFrame({"site": ["attn_in", "attn_out"], "width": [10, 20], "above_6": [5, 0]})
    >>> scheme_table(r, o)[["scheme", "ratio", "float cols %", "paper C4 ppl (OPT-125M)"]].values.tolist()
    [['float', 1.0, 100.0, 'float 25.65'], ['vector-wise + decomposition, threshold 6 (LLM.int8)', 1.05, 30.0, 'LLM.int8() 25.83']]
    """
    t = runs.copy()
    t["_key"] = [scheme_key(m, a, th) for m, a, th in
                 zip(t.method, _col(t, "act"), _col(t, "outlier_threshold"))]
    order = {k: i for i, k in enumerate(["float", *SCHEMES])}
    t = t[t["_key"].notna()].copy()
    t = t.assign(_o=t["_key"].map(order)).sort_values("_o", kind="stable")

    def share(k):
        if k == "float":
            return 100.0
        thr = SCHEMES[k][2]
        return 0.0 if thr is None else (100 * float_column_share(outl, thr) if outl is not None else float("nan"))

    t["float cols %"] = [share(k) for k in t["_key"]]
    t["scheme"] = [("float" if k == "float" else SCHEMES[k][0]) for k in t["_key"]]
    t["paper C4 ppl (OPT-125M)"] = [PAPER_ROW[k] for k in t["_key"]]
    t = t.rename(columns={"perplexity": "ppl", "perplexity_se": "ppl_se", "ppl_ratio": "ratio",
                          "ppl_ratio_se": "ratio_se"})
    return t[["scheme", "ppl", "ppl_se", "ratio", "ratio_se", "kl", "kl_se", "top1", "float cols %",
              "paper C4 ppl (OPT-125M)"]].reset_index(drop=True)


def zero_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The ``zero_outliers`` runs: the systematic outlier features against random dimensions (mean +- std over the
    seeds): how many were zeroed, perplexity, the paired ratio to float and top-1 agreement.

    >>> r = pd.DataFrame({"method": ["zero_outliers"] * 3, "zero_dims": ["systematic", "random", "random"],
    ...                   "perplexity": [90.0, 17.0, 19.0], "ppl_ratio": [5.0, 1.0, 1.2], "top1": [0.1, 0.9, 0.8],
    ...                   "zeroed_features": [7, 7, 7]})
    >>> zero_table(r)[["zeroed", "ppl", "ratio"]].values.tolist()
    [['systematic outlier features', '90', '5'], ['random dimensions (2 seeds)', '18 +- 1.414', '1.1 +- 0.1414']]
    """
    z = runs[runs.method == "zero_outliers"]
    o, r = z[z.zero_dims == "systematic"], z[z.zero_dims == "random"]
    rows = []
    for label, sel in (("systematic outlier features", o), (f"random dimensions ({len(r)} seeds)", r)):
        if not len(sel):
            continue
        fmt = (lambda c: f"{sel[c].mean():.4g}") if len(sel) == 1 else (
            lambda c: f"{sel[c].mean():.4g} +- {sel[c].std(ddof=1):.4g}")
        rows.append(dict(zeroed=label, features=int(sel.zeroed_features.iloc[0]), ppl=fmt("perplexity"),
                         ratio=fmt("ppl_ratio"), top1=fmt("top1")))
    return pd.DataFrame(rows, columns=["zeroed", "features", "ppl", "ratio", "top1"])


def plot(out: Path, runs: pd.DataFrame, outl: pd.DataFrame):
    """``outliers.png``: per block and input site the outlier-feature count and the largest magnitude; the W8A8
    schemes' perplexity ratio to float."""
    from qlab.plot import figure, save

    fig = figure(figsize=(13, 4))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    for i, site in enumerate(SITE_LAYER):
        s = outl[outl.site == site]
        ax1.plot(s.block, s.outliers, "o-", color=f"C{i}", label=f"{site} ({int(s.width.iloc[0])} dims)")
        ax2.semilogy(s.block, s.absmax, "o-", color=f"C{i}", label=site)
    ax1.set_yscale("symlog", linthresh=1)
    ax1.set_xlabel("block")
    ax1.set_ylabel("outlier features (|x| >= 6 at >= 6% of positions)")
    ax1.legend(fontsize=7)
    ax2.axhline(6, color="k", ls="--", lw=1)
    ax2.set_xlabel("block")
    ax2.set_ylabel("max |x| over the tokens (log)")
    ax2.legend(fontsize=7)
    t = scheme_table(runs, outl)
    t = t[t.scheme != "float"]
    y = np.arange(len(t))
    ax3.barh(y, t.ratio - 1, xerr=t.ratio_se, color="C0")
    ax3.set_yticks(y, t.scheme, fontsize=7)
    ax3.invert_yaxis()
    ax3.set_xscale("symlog", linthresh=0.01)
    ax3.set_xlabel("perplexity ratio to float - 1 (paired se)")
    ax3.set_title("W8A8, int8 per-channel weights", fontsize=9)
    fig.suptitle("Gemma 3 270M: outlier features per block and input site; W8A8 schemes", fontsize=10)
    save(fig, out / "outliers.png")


def _md(t: pd.DataFrame) -> str:
    return t.to_markdown(index=False, floatfmt=".4g")


def _blocks_note(outl: pd.DataFrame, full: list, sys_wo: list, rest: pd.DataFrame, total: int) -> str:
    """The README's bullet on the blocks where every dimension of q/k/v's input counts as an outlier."""
    if not full:
        return f"- {total} (layer, feature) outliers in all."
    a = outl[outl.site == "attn_in"].set_index("block")
    others = a.drop(full)
    note = (f"- In blocks {', '.join(map(str, full))} *every* one of the {int(a.width.iloc[0])} dimensions of "
            f"q/k/v's input passes the test: the whole normed input is large there (median feature maximum "
            f"{', '.join(f'{a.median_absmax[b]:.0f}' for b in full)}, against {others.median_absmax.min():.1f}-"
            f"{others.median_absmax.max():.1f} in the other blocks); at "
            f"{', '.join(f'{100 * a.wide_positions[b]:.1f}%' for b in full)} of the tokens more than half of the "
            f"dimensions reach 6 (above the 6% bar), at {100 * others.wide_positions.max():.0f}% in any other block.")
    if "top_share" in a:
        dims = others.top_dim.value_counts().index[:2]
        note += (f" The norm's gain does not set these blocks apart (median |gain| "
                 f"{', '.join(f'{a.gain_median[b]:.0f}' for b in full)} there, {others.gain_median.min():.1f}-"
                 f"{others.gain_median.max():.0f} elsewhere); the normed input before the gain (RMS 1 per token) "
                 f"does: its largest dimension holds on average "
                 f"{', '.join(f'{100 * a.top_share[b]:.0f}%' for b in full)} of a token's squared norm in blocks "
                 f"{', '.join(map(str, full))}, against {100 * others.top_share.min():.0f}-"
                 f"{100 * others.top_share.max():.0f}% in the others, where one residual dimension (most often "
                 f"{', '.join(str(int(d)) for d in dims)}) takes most of the RMS on nearly every token and leaves the "
                 f"other dimensions small after normalisation; in a block in between, the tokens it does not dominate "
                 f"are the ones with most dimensions above 6.")
    return note + (f" The threshold of 6 is an absolute one, set for OPT's LayerNorm outputs. Leaving those blocks "
                   f"out ({len(rest)} layers, 25% = {0.25 * len(rest):.1f}) still leaves {len(sys_wo)} systematic "
                   f"dimensions: {sys_wo}. {total} (layer, feature) outliers in all, counting the {len(full)} x "
                   f"{int(a.width.iloc[0])} of those blocks.")



def _magnitude(x: float) -> str:
    """A perplexity in words for the README.

    >>> _magnitude(3.4e9), _magnitude(2.1e6), _magnitude(812.0)
    ('in the billions', 'in the millions', '812')
    """
    for scale, word in ((1e9, "billions"), (1e6, "millions"), (1e3, "thousands")):
        if x >= scale:
            return f"in the {word}"
    return f"{x:.3g}"


def readme(runs: pd.DataFrame, outl: pd.DataFrame, study, source: str | None = None) -> str:
    """The study's README.md: question, setup, the tables beside the paper's figures, the plot and the findings
    (figures taken from the stored runs and ``outliers.csv``)."""
    counts_hid, n_hid = outlier_counts(outl)
    hidden = systematic_from_table(outl)
    sys_attn = systematic_from_table(outl, sites=("attn_in",))
    sys_mlp = systematic_from_table(outl, sites=("mlp_in",))
    per_site = outl.pivot_table(index="block", columns="site", values="outliers", aggfunc="sum")[list(SITE_LAYER)]
    absmax = outl.pivot_table(index="block", columns="site", values="absmax", aggfunc="max")[list(SITE_LAYER)]
    med = outl.pivot_table(index="block", columns="site", values="median_absmax", aggfunc="max")[list(SITE_LAYER)]
    counts = per_site.astype(int).astype(str) + " (" + med.round(1).astype(str) + " / " + absmax.round(0).astype(
        int).astype(str) + ")"
    counts.columns = [f"{c} ({int(outl[outl.site == c].width.iloc[0])})" for c in counts.columns]
    fl = runs[runs.method == "float"].iloc[0]
    table = scheme_table(runs, outl)
    st = table.set_index("scheme")

    def r(key, col="ratio"):
        return float(st.loc[SCHEMES[key][0], col]) if SCHEMES[key][0] in st.index else float("nan")

    def cols(key):
        return r(key, "float cols %")

    z = runs[runs.method == "zero_outliers"]
    zo, zr = z[z.zero_dims == "systematic"], z[z.zero_dims == "random"]
    zeroed = int(zo.zeroed_features.iloc[0]) if len(zo) else len(hidden)
    run_dims = hidden
    if len(zo) and "systematic_dims" in zo:  # what the run counted on its own capture ("" -> NaN: none)
        d = zo.systematic_dims.iloc[0]
        run_dims = sorted(int(x) for x in str(d).split()) if pd.notna(d) else []
    mismatch = "" if run_dims == hidden else (
        f"\n- **Note:** the `zero_outliers` run counted {len(run_dims)} systematic dimensions ({run_dims}) on its own "
        f"capture, `outliers.csv` {len(hidden)}: the two were not taken on the same model or tokens.")
    worst = zr.loc[zr.ppl_ratio.idxmax()] if len(zr) else None
    worst_dims = [int(d) for d in str(worst.zeroed_dims).split()] if worst is not None and "zeroed_dims" in zr \
        and pd.notna(worst.zeroed_dims) else []
    worst_count = max((counts_hid.get(d, 0) for d in worst_dims), default=0)
    by_count = ", ".join(f"{d} ({counts_hid[d]})" for d in sorted(hidden, key=lambda d: -counts_hid[d]))
    top = max(hidden, key=lambda d: counts_hid[d]) if hidden else None
    width = int(outl[outl.site == "attn_in"].width.iloc[0])
    full = outl[(outl.site == "attn_in") & (outl.outliers == outl.width)].block.tolist()
    sys_wo = systematic_from_table(outl, exclude_blocks=full)
    rest = outl[outl.site.isin(["attn_in", "mlp_in"]) & ~outl.block.isin(full)]
    total_outliers = int(outl.outliers.sum())
    o = outl[outl.site == "attn_out"].set_index("block")
    o_share = o.above_6 / o.width
    o_most = o_share[o_share > 0.5]
    o_note = (f"most of o_proj's input in block{'s' * (len(o_most) > 1)} {', '.join(map(str, o_most.index))} "
              f"({', '.join(f'{100 * v:.0f}%' for v in o_most)})") if len(o_most) else "little of o_proj's input"
    decomp = [k for k in ("vector_wise", "vector_zeropoint", "llm_int8_t4", "llm_int8_t6", "llm_int8_t8")
              if SCHEMES[k][0] in st.index]
    kl_se = st.loc[[SCHEMES[k][0] for k in decomp], "kl_se"] if decomp else pd.Series([float("nan")])
    kls = [r(k, "kl") for k in ("llm_int8_t4", "llm_int8_t6", "llm_int8_t8")]
    ratios = [r(k) for k in ("llm_int8_t4", "llm_int8_t6", "llm_int8_t8")]
    others = [r(k) for k in ("vector_zeropoint", "llm_int8_t4", "llm_int8_t6", "llm_int8_t8")]
    others_se = [r(k, "ratio_se") for k in ("vector_zeropoint", "llm_int8_t4", "llm_int8_t6", "llm_int8_t8")]
    gaps = [(r("vector_wise") - x) / r("vector_wise", "ratio_se") for x in others]
    kl_lower = all(k < r("vector_wise", "kl") for k in kls)
    kl_mono, ratio_mono = kls == sorted(kls), ratios == sorted(ratios)
    kl_text = ("lowers KL against vector-wise int8 at every threshold" if kl_lower else
               "does not lower KL against vector-wise int8 at every threshold") + \
        (", more with a lower threshold" if kl_mono else "")
    ratio_text = "its ratio goes the same way" if ratio_mono else "its ratio does not follow that order"
    wall = runs["wall_s"]
    first = runs.iloc[0]
    first_z = z.iloc[0] if len(z) else None
    src_note = f" (`study.json` records its source as `{source}`)" if source and source != STUDY else ""
    env = f"{str(fl.get('backend', 'cpu')).upper()}, jax {fl.get('jax_version', '?')}"
    return f"""# Ablation 4: LLM.int8() outlier features in Gemma 3 270M

{study.description}.

**Question.** Dettmers et al. (2022) define an outlier feature as a hidden dimension whose magnitude is >= 6 in
>= 25% of the layers and at >= 6% of the sequence positions; they find such features systematic (in every layer)
from 6.7B parameters on, in fewer layers and fewer of them below, and predict few or none in small models. They
break per-tensor int8 activations; LLM.int8() keeps the input columns above a threshold (6) in 16-bit and runs the
rest as vector-wise int8; removing the outlier features (setting them to zero) wrecks the model, removing as many
random features does not. Table 1 (C4 perplexity, 125M): float 25.65, int8 absmax per-tensor 87.76, zeropoint 56.66,
absmax row-wise 30.93, vector-wise 35.84, zeropoint vector-wise 25.72, LLM.int8() 25.83. What does Gemma 3 270M have,
and which W8A8 scheme does it need?

**Setup.** The study `{STUDY}`{src_note}, run with
`qlab sweep {STUDY} --out {OUT}`, then `python {SCRIPT} --readme` for this file, `outliers.png` and (only when it is
missing) `outliers.csv`. {len(runs)} runs, {wall.sum() / 60:.0f} min summed over their `wall_s`
({wall.min():.0f}-{wall.max():.0f} s each; {env}); the process start-up is not in it, and the model load and the
float reference pass fall in the first run ({first.wall_s:.0f} s), the float capture of the projections' inputs in the first zeroing run
({first_z.wall_s if first_z is not None else float('nan'):.0f} s). `outliers.csv` comes from one more float capture of
the same tokens outside the sweep and the total (the report script takes it, with the RMSNorm gains, when the file is
missing). Gemma 3 270M (the float baseline dequantized from the Q4_K_M
GGUF, as in every qlab Gemma study), the first {int(fl['eval_tokens'])} tokens of Pride and Prejudice (float
perplexity {fl['perplexity']:.2f} +- {fl['perplexity_se']:.2f}, the figure formats4 reports).
Outliers are counted on the same tokens, on the inputs of the projections (the normed hidden state for q/k/v and
gate/up, the attention output for o_proj, the GeGLU product for down_proj); Gemma's o_proj reads 1,024 dimensions
and down_proj 2,048, so only the {n_hid} normed inputs ({n_hid // 2} blocks x `attn_in`, `mlp_in`, {width} dimensions)
share the hidden feature space that the systematic count runs over ({0.25 * n_hid:g} of {n_hid} layers = 25%). The
W8A8 runs (`ptq_rtn` with `act` and `outlier_threshold`) quantize every projection (weights int8 per output channel,
symmetric absmax, stored as codes computed once over all the input rows); the activation range is dynamic (per call,
per tensor or per token); the decomposition keeps float each input column whose magnitude exceeds the threshold
anywhere in the sequence, with its float weight row, and multiplies the other columns by the int8 weights (whose
scales therefore also span the rows kept float). The zeroing runs are `zero_outliers` (`zero_dims`
= systematic | random). Details in the study file's comments and the script's docstring.

## Outlier features

Per block and input site: the number of outlier features (magnitude >= 6 at >= 6% of the
{int(outl.positions.iloc[0])} positions) and, in brackets, the median over the features of their largest magnitude /
the largest magnitude; the site's width in the header (`attn_in`: q/k/v's input, `attn_out`: o_proj's, `mlp_in`:
gate/up's, `mlp_hidden`: down_proj's). Dimensions per layer: `outliers.csv`.

{counts.reset_index().to_markdown(index=False)}

- **Systematic hidden dimensions** (an outlier in >= 25% of the {n_hid} normed inputs): {len(hidden)}, namely (with
  the number of the {n_hid} layers in which each is an outlier) {by_count or 'none'}. Over `attn_in` alone
  ({n_hid // 2} layers): {len(sys_attn)} dimensions; over `mlp_in` alone: {sys_mlp}.
{_blocks_note(outl, full, sys_wo, rest, total_outliers)}{mismatch}

## W8A8

Perplexity on the first {int(fl['eval_tokens'])} tokens of Pride and Prejudice with its standard error, the paired
ratio to float (its se paired over tokens), KL(float || quantized) per token with its se, top-1 agreement with float,
the share of the projections' input columns kept float (decomposition: the columns above the threshold anywhere in
the float model's inputs on these tokens, `outliers.csv`'s `above_4/6/8`, summed over the
{int(outl.site.map(SITE_PROJECTIONS).sum())} projections), and the paper's Table 1 row each corresponds to
(OPT-125M, C4):

{_md(table)}

## Zeroing the outlier features

The {zeroed} systematic dimensions set to zero in the input of every q/k/v and gate/up projection, against as many
random other dimensions ({len(zr)} seeds; one draw per seed shared by all those projections):

{_md(zero_table(runs))}

![outliers](outliers.png)

## What it shows

| finding | paper | qlab (Gemma 3 270M) | agrees? |
|---|---|---|---|
| few or no systematic outlier features below 6.7B (PAPERS.md) | in >= 25% of the layers only from about 6B on; fewer layers below | {len(hidden)} systematic dimensions of {width} ({100 * len(hidden) / width:.1f}%); dimension {top} is an outlier in {counts_hid.get(top, 0)} of the {n_hid} layers; {len(sys_wo)} remain without the {len(full)} blocks where every dimension passes | {'no' if hidden else 'yes'} |
| per-tensor activations lose most (Table 1) | absmax row-wise (per-tensor A) 30.93, ratio 1.21 to float's 25.65; per-tensor W and A 87.76 | per-tensor absmax A (per-channel W) {r('tensor_absmax'):.3f} | yes |
| a zero point helps (Table 1) | per-tensor 87.76 -> 56.66; vector-wise 35.84 -> 25.72 | per-tensor {r('tensor_absmax'):.3f} -> {r('tensor_zeropoint'):.3f}; per-token {r('vector_wise'):.4f} -> {r('vector_zeropoint'):.4f} | yes |
| per-token (vector-wise) against per-tensor activations (Table 1) | vector-wise 35.84 *worse* than row-wise 30.93 at 125M | per-token {r('vector_wise'):.4f} far better than per-tensor {r('tensor_absmax'):.3f} | no |
| LLM.int8() close to float (Table 1) | 25.83 against 25.65 (ratio 1.007) | decomposition at 6: {r('llm_int8_t6'):.4f} (at 4: {r('llm_int8_t4'):.4f}); KL {r('vector_wise', 'kl'):.4f} (vector-wise) -> {r('llm_int8_t6', 'kl'):.4f} | yes |
| removing the outlier features wrecks the model, random ones barely matter (Section 4) | qualitative here: the paper's figures for it are not in PAPERS.md and were not checked, so none is quoted | ppl {zo.perplexity.mean():.3g} (LM top-1 agreement {zo.top1.mean():.2f}) against {zr.perplexity.mean():.3g} +- {zr.perplexity.std(ddof=1):.3g} for as many random dimensions | yes, the contrast; random ones are not harmless here |

- **The count departs from the paper's prediction.** Gemma 3 270M has systematic outlier dimensions by the paper's
  own definition, and they matter: zeroing them collapses the model (perplexity {_magnitude(zo.perplexity.mean())},
  top-1 agreement {zo.top1.mean():.2f}), zeroing as many random dimensions costs a ratio of
  {zr.ppl_ratio.mean():.2f} +- {zr.ppl_ratio.std(ddof=1):.2f}. Part of the count is the absolute threshold meeting
  Gemma's scales (blocks {', '.join(map(str, full))}), but {len(sys_wo)} dimensions are outliers in more than a
  quarter of the other layers, with the same dimensions recurring from block to block (the paper's "systematic"
  property). Why is not tested here; a model with another norm (RMSNorm, sandwich norms), a 262k vocabulary and a
  far longer training run than OPT's need not sit on the paper's OPT scaling curve; {100 * len(hidden) / width:.1f}%
  of the dimensions is also a far larger share than the paper's ~0.1% at 6.7B, so random zeroing of {zeroed}
  dimensions is not the small perturbation the paper's random control is (seed
  {int(worst.seed) if worst is not None else ''}'s random set costs a ratio of {zr.ppl_ratio.max():.2f}, though none
  of its dimensions is an outlier in more than {worst_count} of the
  {n_hid} normed inputs).
- **W8A8: per-tensor activations fail, per-token ones and the decomposition come close, as in the paper** (except
  that here per-token scales beat per-tensor ones outright, where the paper's 125M model had vector-wise behind
  row-wise). Per-tensor activation scales are the failure (ratio {r('tensor_absmax'):.2f}; the zero point recovers
  part of it, {r('tensor_zeropoint'):.2f}); per-token scales bring W8A8 within {100 * (r('vector_wise') - 1):.1f}%
  of float and a per-token zero point within {100 * (r('vector_zeropoint') - 1):.1f}%. The decomposition {kl_text}
  ({kls[0]:.4f} / {kls[1]:.4f} / {kls[2]:.4f} at 4 / 6 / 8, against {r('vector_wise', 'kl'):.4f}), and
  {ratio_text} ({ratios[0]:.4f} / {ratios[1]:.4f} / {ratios[2]:.4f}), but by perplexity these runs are close:
  vector-wise int8 lies {min(gaps):.1f}-{max(gaps):.1f} of its standard errors above zeropoint vector-wise and the
  decomposition, which lie within {max(others) - min(others):.4f} of one another (standard errors
  {min(others_se):.4f}-{max(others_se):.4f}; each ratio is paired against float, not against the others), so their
  order by perplexity is not settled by {int(fl['eval_tokens'])} tokens; the KL order is (its standard errors are
  {kl_se.min():.4f}-{kl_se.max():.4f}).
- **The decomposition is not cheap here.** At the paper's threshold of 6 it keeps {cols('llm_int8_t6'):.1f}% of the
  projections' input columns float (4: {cols('llm_int8_t4'):.1f}%, 8: {cols('llm_int8_t8'):.1f}%), against about
  0.1% of the features in the paper's models: all of q/k/v's input in blocks {', '.join(map(str, full))}, {o_note}
  (`outliers.csv`, `above_6`; counted on the float model's inputs, while each run decides its float columns on its
  own, quantized, inputs). A threshold relative to each layer's scale would be the fair translation; the paper's
  absolute 6 is what was run.
- Departures: the zeroing removes the dimensions in every layer at once (the paper zeroes them one layer at a
  time), a harsher test for both the outlier and the random sets; one 270M model, one text of
  {int(fl['eval_tokens'])} tokens for both the count and the perplexity (paper: OPT/BLOOM 125M-175B, C4 validation);
  weights are always int8 per output channel (so "per-tensor" means per-tensor activations: the paper's "absmax
  row-wise" row, and its per-tensor zeropoint quantizes weights per tensor too); fake-quantized float32 products
  instead of int8 GEMMs (equal up to float32 summation order); the attention's own products and the tied embedding
  stay float; in the decomposition runs the int8 weight scales span the input rows kept float (the ablation's
  earlier script, in git history, computed them without those rows and got ratios 1.0085 / 1.0153 / 1.0209 and KL
  0.0077 / 0.0118 / 0.0144 at 4 / 6 / 8: the same picture, the ratios 0.001-0.009 from these, under two of
  their standard errors). Timings are in `runs.csv` (`quant_s`, `eval_s`, `wall_s`).
"""


def write(out: Path, study) -> None:
    """``outliers.csv`` (one float capture, only when it is missing), ``outliers.png`` and ``README.md`` from the
    stored runs of ``study`` (a :class:`qlab.experiments.Study`)."""
    import json

    out = Path(out)
    runs = qx.load_results(out)
    fl = runs[runs.method == "float"].iloc[0]
    path = out / "outliers.csv"
    if not path.is_file():
        table = capture_outliers(fl["model"], fl["data"], int(fl["eval_tokens"]))
        atomic_write_text(path, table.to_csv(index=False))
    outl = pd.read_csv(path)
    if int(outl.positions.iloc[0]) != int(fl["eval_tokens"]):
        raise ValueError(f"{path} counts {int(outl.positions.iloc[0])} positions, the study evaluates "
                         f"{int(fl['eval_tokens'])} tokens: delete it to recount on the study's tokens")
    source = json.loads((out / "study.json").read_text()).get("source") if (out / "study.json").is_file() else None
    plot(out, runs, outl)
    atomic_write_text(out / "README.md", readme(runs, outl, study, source))
    print(scheme_table(runs, outl).to_string())
    print(zero_table(runs).to_string())


if __name__ == "__main__":
    qx.study_script(__doc__, ROOT / STUDY, ROOT / OUT, write)
