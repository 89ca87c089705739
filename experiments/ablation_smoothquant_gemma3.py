"""Ablation 3 on Gemma 3 270M (issue #15): SmoothQuant's migration strength alpha, 0 to 1 in steps of 0.1, W8A8.

    python experiments/ablation_smoothquant_gemma3.py [--readme] [--out results/ablations/smoothquant_gemma3]

Runs the study ``experiments/ablation_smoothquant_gemma3.toml`` with ``qlab.sweep`` (resumable; the same as
``qlab sweep experiments/ablation_smoothquant_gemma3.toml --out results/ablations/smoothquant_gemma3``): 25
``ptq_smoothquant`` runs and float. Two settings (``SERIES``), each an unsmoothed W8A8 baseline (``smooth =
"none"``, RTN under the same activation calibration) and SmoothQuant at the 11 alphas; weights int8 per output
channel on every attention / MLP projection, the tied embedding and the attention's own products float:

* ``static``: int8 *static* per-tensor activations (``act_scales = "static"``: one range per layer, the calibration
  maximum of the layer's input after smoothing; the paper's O3 activations);
* ``per_token``: int8 dynamic per-token activations (``act = "int8/ch"``).

Then writes ``alpha_sweep.png``, ``layer_ranges.png`` (from the smoothing columns of ``layers.csv``:
:func:`qlab.experiments.lm_ablations.smoothing_rows`), ``channels.png`` and ``README.md``. ``channels.csv`` (the
per-channel input maxima of ``CHANNEL_LAYER`` before smoothing and after at alpha 0.5 and 0.8) is computed once
from the study's calibration capture (:func:`channel_table`: loads the model) and reused when present.
``--readme`` only rewrites the plots and README from the stored runs.
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
from qlab.experiments.results import atomic_write_text  # noqa: E402

STUDY = "experiments/ablation_smoothquant_gemma3.toml"
OUT = "results/ablations/smoothquant_gemma3"
SERIES = {"static": "W8 per-channel, A8 static per-tensor (O3 activations)",
          "per_token": "W8 per-channel, A8 dynamic per-token"}
#: the layer whose per-channel maxima channels.png shows (the first q_proj on a smaller model)
CHANNEL_LAYER = "layers/8/attn/q_proj"
CHANNEL_ALPHAS = (0.5, 0.8)
#: the alphas of the activation-range table and plot (those of the study)
RANGE_ALPHAS = (0.0, 0.3, 0.5, 0.8, 1.0)


def series(runs: pd.DataFrame) -> pd.Series:
    """Each run's series: ``static`` (static per-tensor activation scales), ``per_token``, None for float.

    Example:
        >>> r = pd.DataFrame({"method": ["float", "ptq_smoothquant", "ptq_smoothquant"],
        ...                   "act_scales": [None, "static", "dynamic"]})
        >>> series(r).tolist()
        [None, 'static', 'per_token']
    """
    s = np.where(runs["act_scales"] == "static", "static", "per_token")
    return pd.Series(np.where(runs["method"] == "float", None, s), index=runs.index, dtype=object)


def curves(runs: pd.DataFrame) -> dict[str, tuple[pd.DataFrame, pd.Series | None]]:
    """``{series: (SmoothQuant rows by alpha, the unsmoothed W8A8 row (smooth = "none") or None)}``.

    Example:
        >>> r = pd.DataFrame(dict(method="ptq_smoothquant", act_scales="static", smooth=["none", "norm_inputs"],
        ...                       alpha=[0.5, 0.5], ppl_ratio=[1.5, 1.2]))
        >>> c = curves(r)["static"]
        >>> c[0]["ppl_ratio"].tolist(), float(c[1]["ppl_ratio"])
        ([1.2], 1.5)
    """
    s = series(runs)
    out = {}
    for name in SERIES:
        sel = runs[s == name]
        sq = sel[sel["smooth"] != "none"].sort_values("alpha")
        rtn = sel[sel["smooth"] == "none"]
        if len(sq) or len(rtn):
            out[name] = (sq, rtn.iloc[0] if len(rtn) else None)
    return out


def smoothing(runs: pd.DataFrame, layers: pd.DataFrame) -> pd.DataFrame:
    """The smoothed layers' rows of ``layers.csv`` (one per layer and alpha: both series smooth alike), with the
    run's ``alpha``, the layer's ``block`` and projection ``proj``.

    Example:
        >>> r = pd.DataFrame({"config_hash": ["a", "b"], "alpha": [0.5, 0.5]})
        >>> l = pd.DataFrame({"config_hash": ["a", "a", "b"], "act_ratio": [4.0, None, 4.0],
        ...                   "layer": ["layers/3/attn/q_proj", "layers/3/attn/o_proj", "layers/3/attn/q_proj"]})
        >>> smoothing(r, l)[["layer", "alpha", "block", "proj"]].values.tolist()
        [['layers/3/attn/q_proj', 0.5, 3, 'q_proj']]
    """
    if not len(layers) or "act_ratio" not in layers:
        return pd.DataFrame(columns=["layer", "alpha", "block", "proj", "act_ratio"])
    t = layers.dropna(subset=["act_ratio"]).drop(columns=["alpha"], errors="ignore")
    t = t.merge(runs[["config_hash", "alpha"]], on="config_hash").drop_duplicates(["layer", "alpha"])
    t["block"] = t["layer"].str.extract(r"layers/(\d+)/")[0].astype(int)
    t["proj"] = t["layer"].str.rsplit("/", n=1).str[-1]
    return t.sort_values(["alpha", "block", "layer"]).reset_index(drop=True)


def channel_layer(layers: pd.DataFrame) -> str:
    """``CHANNEL_LAYER`` if the study has it, else its first q_proj.

    Example:
        >>> channel_layer(pd.DataFrame({"layer": ["layers/1/attn/q_proj", "layers/0/attn/q_proj"]}))
        'layers/0/attn/q_proj'
    """
    names = set(layers["layer"]) if "layer" in layers else set()
    if CHANNEL_LAYER in names or not names:
        return CHANNEL_LAYER
    q = [p for p in names if p.endswith("attn/q_proj")] or list(names)
    return min(q, key=lambda p: (int(p.split("/")[1]) if p.split("/")[1].isdigit() else 0, p))


def channel_table(runs: pd.DataFrame, layer: str) -> pd.DataFrame:
    """Per input channel of ``layer``: the calibration absmax of its input (the study's float-pass capture), the
    float kernel row's absmax, and the absmax after smoothing at each of ``CHANNEL_ALPHAS``. Loads the model."""
    from qlab import ptq
    from qlab.experiments import lm

    r = runs[runs["method"] == "ptq_smoothquant"].iloc[0]
    stats = lm.float_pass_stats(r["model"], r["calibration"], int(r["calibration_seqs"]), int(r["calibration_len"]))
    a = np.asarray(stats[layer]["absmax"], np.float32)
    W = np.asarray(lm.lm_linears(lm.lm_model(r["model"])[0])[layer].kernel[...])
    ch = {"channel": np.arange(len(a)), "absmax": a, "weight_absmax": np.abs(W).max(1)}
    for alpha in CHANNEL_ALPHAS:
        ch[f"smoothed_{alpha}"] = a / np.asarray(ptq.smoothquant_scales(a, W, alpha))
    return pd.DataFrame(ch)


def _ratio(v) -> float:
    v = np.asarray(v, np.float64)
    return float(v.max() / np.median(v))


def _at(t: pd.DataFrame, alpha: float) -> pd.DataFrame:
    return t[np.isclose(t["alpha"].astype(float), alpha)]


def facts(runs: pd.DataFrame, sm: pd.DataFrame, channels: pd.DataFrame | None) -> dict:
    """The figures the findings quote, from the runs, the smoothing rows and ``channels.csv``."""
    c = curves(runs)
    f: dict = {"st_range_a0_src": "", "st_range_rtn_src": ""}
    st_sq, st_rtn = c.get("static", (runs.iloc[:0], None))
    pt_sq, pt_rtn = c.get("per_token", (runs.iloc[:0], None))
    if len(st_sq) and st_rtn is not None:
        best = st_sq.loc[st_sq["ppl_ratio"].idxmin()]
        last, prev = st_sq.iloc[-1], st_sq.iloc[max(len(st_sq) - 2, 0)]
        near = st_sq[st_sq.ppl_ratio <= best.ppl_ratio + best.ppl_ratio_se].alpha
        f.update(st_rtn=st_rtn.ppl_ratio, st_a0=st_sq.iloc[0].ppl_ratio, st_a0_alpha=st_sq.iloc[0].alpha,
                 st_best=best.ppl_ratio, st_best_se=best.ppl_ratio_se, st_best_alpha=best.alpha,
                 st_last=last.ppl_ratio, st_last_alpha=last.alpha, st_kl_rtn=st_rtn.kl, st_kl_best=best.kl,
                 st_kl_last=last.kl, st_best_pct=100 * (best.ppl_ratio - 1),
                 st_gap_removed=100 * (1 - np.log(best.ppl_ratio) / np.log(st_rtn.ppl_ratio)),
                 st_se_lo=st_sq.ppl_ratio_se.min(), st_se_hi=st_sq.ppl_ratio_se.max(),
                 st_near=f"{near.min():.1f}-{near.max():.1f}" if len(near) > 1 else f"{best.alpha:.1f}",
                 st_prev=prev.ppl_ratio, st_prev_alpha=prev.alpha,
                 st_range_rtn=st_rtn.get("static_range_max", np.nan))
        smoothed = st_sq[st_sq["alpha"] > 0]["static_range_max"] if "static_range_max" in st_sq else pd.Series([])
        lo, hi = smoothed.min(), smoothed.max()
        f.update(st_range_a0=st_sq.iloc[0].get("static_range_max", np.nan),
                 st_range=f"{lo:.0f} at every alpha > 0" if np.isclose(lo, hi) else f"{lo:.0f}-{hi:.0f} at alpha > 0")
    if len(pt_sq) and pt_rtn is not None:
        late = pt_sq[pt_sq["alpha"] >= 0.2]
        allr = pd.concat([pt_sq.ppl_ratio, pd.Series([pt_rtn.ppl_ratio])])
        f.update(pt_rtn=pt_rtn.ppl_ratio, pt_lo=pt_sq.ppl_ratio.min(), pt_hi=pt_sq.ppl_ratio.max(),
                 pt_se=pt_sq.ppl_ratio_se.median(), pt_kl_rtn=pt_rtn.kl, pt_kl_lo=late.kl.min(), pt_kl_hi=late.kl.max(),
                 pt_kl_se=pt_sq.kl_se.median(), pt_pct_lo=100 * (allr.min() - 1), pt_pct_hi=100 * (allr.max() - 1))
    if len(sm):
        # the unsmoothed columns are the same at every alpha; q_proj / gate_proj stand for the two input sites
        s0 = _at(sm, float(sm["alpha"].iloc[0]))
        n = int(sm["block"].max()) + 1
        q, g = s0[s0.proj == "q_proj"], s0[s0.proj == "gate_proj"]
        qg_late = s0[s0.proj.isin(["q_proj", "gate_proj"]) & (s0.block >= 2)]
        f.update(blocks=n, late=f"2-{n - 1}", act_ratio_lo=qg_late.act_ratio.min(),
                 act_ratio_hi=qg_late.act_ratio.max(),
                 qkv_ratio_late=q[q.block >= 2].act_ratio.median(), gu_ratio_late=g[g.block >= 2].act_ratio.median(),
                 q_max_01=" and ".join(f"{v:.0f}" for v in q[q.block <= 1].act_absmax),
                 q_max_late=q[q.block >= 2].act_absmax.median(),
                 w_ratio_lo=pd.concat([q, g]).weight_ratio.min(), w_ratio_hi=pd.concat([q, g]).weight_ratio.max(),
                 w_ratio_qkv=q.weight_ratio.median(), w_ratio_gu=g.weight_ratio.median())
        for a in (0.5, 0.8, 1.0):
            r = _at(sm, a)
            late_ = r[r.block >= 2]
            key = f"{a:.1f}".replace(".", "")
            qr, gr = late_[late_.proj == "q_proj"], late_[late_.proj == "gate_proj"]
            f[f"w_sm_q_{key}"] = qr.weight_ratio_smoothed.median()
            f[f"w_sm_g_{key}"] = gr.weight_ratio_smoothed.median()
            f[f"a_sm_q_{key}"] = qr.act_ratio_smoothed.median()
            qe = r[(r.block <= 1) & (r.proj == "q_proj")]
            f[f"a_sm_q01_{key}"] = " / ".join(f"{v:.1f}" for v in qe.act_ratio_smoothed)
            f[f"a_max_q01_{key}"] = " / ".join(f"{v:.0f}" for v in qe.act_absmax_smoothed)
        tab = _at(sm, 0.8)  # the range table's figures at 0.8: blocks 0-1, and the other blocks' median
        vals = [v for p in ("q_proj", "gate_proj") for t in [tab[tab.proj == p]]
                for v in [*t[t.block <= 1].act_ratio_smoothed, t[t.block >= 2].act_ratio_smoothed.median()]]
        f["a_sm_lo_08"], f["a_sm_hi_08"] = (min(vals), max(vals)) if len(tab) else (np.nan, np.nan)
        st_pos = c.get("static", (runs.iloc[:0], None))[0]
        st_pos = st_pos[st_pos["alpha"] > 0]
        smax = sm[sm["alpha"] > 0].groupby("alpha")["act_absmax_smoothed"].max()
        if len(st_pos) and "static_range_max" in st_pos:
            unsmoothed = all(smax.get(a, np.inf) < r * (1 - 1e-4)
                             for a, r in zip(st_pos.alpha, st_pos.static_range_max))
            f["st_range_who"] = "an unsmoothed layer" if unsmoothed else "at some alphas a smoothed input"
        # which input sets the largest static range, where it is a smoothed layer's (unsmoothed ones are not in sm)
        for key, t, col, what in (("st_range_a0", _at(sm, 0.0), "act_absmax_smoothed", " after smoothing"),
                                  ("st_range_rtn", sm, "act_absmax", "")):
            if len(t) and np.isclose(t[col].max(), f.get(key, np.nan), rtol=1e-4):
                top = t.loc[t[col].idxmax()]
                site = "q/k/v" if top.proj in ("q_proj", "k_proj", "v_proj") else "gate/up"
                f[key + "_src"] = f", block {top.block}'s {site} input{what}"
    if channels is not None and "absmax" in channels:
        f.update(ch_ratio=_ratio(channels.absmax), ch_dim=int(channels.channel[channels.absmax.idxmax()]),
                 **{f"ch_ratio_{a:.1f}".replace(".", ""): _ratio(channels[f"smoothed_{a}"]) for a in CHANNEL_ALPHAS
                    if f"smoothed_{a}" in channels})
    q = runs[runs["method"] != "float"]
    first = q.wall_s > 4 * q.wall_s.median()  # a sweep process's first run: model load, float eval, capture
    f.update(quant_med=q.quant_s.median(), quant_lo=q.quant_s.min(), quant_hi=q.quant_s.max(),
             eval_med=q.eval_s.median(), eval_lo=q.eval_s.min(), eval_hi=q.eval_s.max(),
             wall_min=runs.wall_s.sum() / 60, wall_first=", ".join(f"{v:.0f}" for v in q.wall_s[first]) or "none",
             wall_lo=q.wall_s[~first].min(), wall_hi=q.wall_s[~first].max())
    return f


def plot(out: Path, runs: pd.DataFrame, sm: pd.DataFrame):
    from qlab import plot as qplot

    fig = qplot.figure(figsize=(11, 4.2))
    ax1, ax2 = fig.subplots(1, 2)
    for i, (name, (sq, rtn)) in enumerate(curves(runs).items()):
        color = f"C{i}"
        ax1.errorbar(sq.alpha, sq.ppl_ratio, yerr=sq.ppl_ratio_se, fmt="o-", color=color, capsize=2,
                     label=SERIES[name])
        ax2.plot(sq.alpha, sq.kl, "o-", color=color, label=SERIES[name])
        if rtn is not None:
            ax1.axhline(float(rtn.ppl_ratio), color=color, ls="--", lw=1)
            ax2.axhline(float(rtn.kl), color=color, ls="--", lw=1)
    ax1.set_yscale("log")
    ax1.set_xlabel("SmoothQuant alpha (migration strength)")
    ax1.set_ylabel("perplexity / float perplexity (paired se; log)")
    ax1.set_title("Gemma 3 270M W8A8 (dashed: RTN, no smoothing)", fontsize=9)
    ax1.legend(fontsize=7)
    ax2.set_yscale("log")
    ax2.set_xlabel("SmoothQuant alpha")
    ax2.set_ylabel("KL(float || quantized) per token, nats (log)")
    qplot.save(fig, out / "alpha_sweep.png")
    if not len(sm):
        return
    fig = qplot.figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2)
    styles = {0.0: ":", 0.5: "-", 0.8: "--", 1.0: "-."}
    for ax, (proj, kind) in zip(axes, (("q_proj", "q/k/v input (q_proj)"), ("gate_proj", "gate/up input (gate_proj)"))):
        k = sm[sm.proj == proj]
        for a, st in styles.items():
            r = _at(k, a).sort_values("block")
            if len(r):
                ax.plot(r.block, r.act_absmax_smoothed, st, marker="o", ms=3, label=f"alpha {a}")
        r = k.drop_duplicates("layer").sort_values("block")
        ax.plot(r.block, r.act_absmax, "k-", lw=2, label="before smoothing")
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("max |x| over calibration tokens (log)")
        ax.set_title(f"{kind}: activation range before / after smoothing", fontsize=9)
        ax.legend(fontsize=7)
    qplot.save(fig, out / "layer_ranges.png")


def alpha_table(runs: pd.DataFrame) -> str:
    """The markdown table: per alpha (and the unsmoothed baseline), each series' ratio (paired se), KL, top-1."""
    c = curves(runs)
    lines = ["| alpha | " + " | ".join(f"{SERIES[n]}: ppl ratio (paired se) | KL | top-1" for n in c) + " |",
             "|--:|" + "--:|--:|--:|" * len(c)]

    def cells(r):
        if r is None:
            return " | | "
        return f"{float(r.ppl_ratio):.4f} ({float(r.ppl_ratio_se):.4f}) | {float(r.kl):.4f} | {float(r.top1):.3f}"

    lines.append("| RTN (no smoothing) | " + " | ".join(cells(c[n][1]) for n in c) + " |")
    alphas = sorted({float(a) for n in c for a in c[n][0].alpha})
    for a in alphas:
        vals = []
        for n in c:
            r = _at(c[n][0], a)
            vals.append(cells(r.iloc[0] if len(r) else None))
        lines.append(f"| {a:.1f} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def range_table(sm: pd.DataFrame) -> str:
    """Per alpha of ``RANGE_ALPHAS`` and input site (q/k/v, gate/up): the smoothed input's max / median channel ratio
    and absmax, blocks 0-1 listed and the other blocks' median, and the smoothed weights' max / median row ratio."""
    if not len(sm):
        return "(no smoothing rows)"
    n = int(sm["block"].max()) + 1
    late = f"blocks 2-{n - 1} (median)"
    rows = []
    for a in RANGE_ALPHAS:
        r = _at(sm, a)
        for site, proj in (("q/k/v", "q_proj"), ("gate/up", "gate_proj")):
            s = r[r.proj == proj]
            if not len(s):
                continue
            early, rest = s[s.block <= 1], s[s.block >= 2]
            rows.append({"alpha": a, "input": site,
                         "act max / median, blocks 0-1": " / ".join(f"{v:.1f}" for v in early.act_ratio_smoothed),
                         f"act max / median, {late}": f"{rest.act_ratio_smoothed.median():.1f}",
                         "act absmax, blocks 0-1": " / ".join(f"{v:.0f}" for v in early.act_absmax_smoothed),
                         f"act absmax, {late}": f"{rest.act_absmax_smoothed.median():.1f}",
                         f"weight max / median row, {late}": f"{rest.weight_ratio_smoothed.median():.1f}"})
    return pd.DataFrame(rows).to_markdown(index=False)


def readme(runs: pd.DataFrame, sm: pd.DataFrame, channels: pd.DataFrame | None, layer: str, study,
           source: str = STUDY) -> str:
    """The study's README.md: what ran (``source``: the study file, as ``study.json`` records it), the alpha
    table, the activation ranges, the plots, the findings."""
    fl = runs[runs.method == "float"]
    f_ppl = f"{float(fl.perplexity.iloc[0]):.2f} +- {float(fl.perplexity_se.iloc[0]):.2f}" if len(fl) else "?"
    r0 = runs[runs.method != "float"].iloc[0]
    f = facts(runs, sm, channels)
    f["ch_block"] = layer.split("/")[1]
    env = f"jax {r0.get('jax_version', '?')}, {r0.get('backend', '?')}"
    return f"""# Ablation 3 on Gemma 3 270M: SmoothQuant's alpha

{study.description}.

**Setup.** The study `{source}`, run with

    qlab sweep {STUDY} --out {OUT}
    python experiments/ablation_smoothquant_gemma3.py --readme

(the second writes this file and the plots; without `--readme` the script runs the sweep too): {len(runs)} runs,
{f['wall_min']:.0f} min summed over the runs' `wall_s` ({env}); the first run of a sweep process also loads the
model, evaluates float and captures the calibration statistics ({f['wall_first']} s here), the others took
{f['wall_lo']:.0f}-{f['wall_hi']:.0f} s (times: `runs.csv`). Every `ptq_smoothquant` run (`runs.csv`: `smooth`,
`alpha`, `act`, `act_scales`) quantizes the weights of every attention / MLP projection int8 per output channel
(symmetric absmax; the tied embedding and the attention's own products float) and their inputs int8, either with
static per-tensor scales (`act_scales = "static"`: one range per layer, the calibration maximum of the layer's input
after smoothing; the paper's O3 activations) or dynamic per-token (`act = "int8/ch"`). `smooth = "norm_inputs"`
smooths the inputs that follow a norm, as the paper does: q/k/v (after the pre-attention RMSNorm) and gate/up (after
the pre-feedforward RMSNorm); o_proj and down_proj are RTN. `smooth = "none"` is the unsmoothed W8A8 baseline ("RTN"
below) under the same activation calibration. Gemma 3 270M (float baseline dequantized from the Q4_K_M GGUF, as in
every qlab Gemma study); calibration: 32 windows of 256 tokens of Emma (BOS + text, seed 0, the windows of the other
Gemma studies), one float pass capturing each projection's per-channel input absmax; evaluation on the first
{int(r0['eval_tokens'])} tokens of Pride and Prejudice (float perplexity {f_ppl}).

Perplexity ratio to float (paired standard error over tokens), KL(float || quantized) per token and top-1 agreement
with float (`runs.csv` also holds each perplexity with its own se):

{alpha_table(runs)}

![alpha sweep](alpha_sweep.png)

Activation ranges per smoothed input, from the calibration maxima (the smoothing columns of `layers.csv`, on each
smoothed layer's row): the max / median channel ratio of the smoothed input (the spread a per-tensor scale must
cover) and its absolute maximum, blocks 0 and 1 listed, the other blocks as their median, with the smoothed weights'
max / median row ratio:

{range_table(sm)}

![layer ranges](layer_ranges.png)

Per-channel activation maxima of `{layer}` before smoothing and after, at alpha
{' and '.join(str(a) for a in CHANNEL_ALPHAS)} (log scale; `channels.csv`, from the same calibration capture):

![channels](channels.png)

{findings(f)}"""


def findings(f: dict) -> str:
    """The findings, their figures from :func:`facts` (a figure missing from a partial study shows as ``?``)."""

    class Facts(dict):
        def __missing__(self, key):
            return float("nan")

    fmt = Facts(f)
    try:
        return FINDINGS.format_map(fmt)
    except (ValueError, TypeError, IndexError):  # a partial study: a figure is missing
        return "## What it shows\n\n(the findings need every run of the study)\n"


#: the findings, written after the runs; the figures are filled in from the tables (:func:`facts`)
FINDINGS = """## What it shows

| paper | qlab (Gemma 3 270M, W8 per-channel) | agrees? |
|---|---|---|
| O3 (static per-tensor activations): U shape in alpha, best 0.4-0.6 (OPT-175B) | static per-tensor: RTN {st_rtn:.3f}, alpha 0 {st_a0:.3f}, falling to {st_best:.3f} +- {st_best_se:.3f} at {st_best_alpha:.1f} (within one paired se of it: alpha {st_near}), rising to {st_prev:.3f} / {st_last:.3f} at {st_prev_alpha:.1f} / {st_last_alpha:.1f}; KL {st_kl_rtn:.3f} (RTN) -> {st_kl_best:.3f} ({st_best_alpha:.1f}) -> {st_kl_last:.3f} ({st_last_alpha:.1f}) | partly: a shallow U with its bottom at {st_near}, not 0.4-0.6; neighbouring alphas differ by about one paired se ({st_se_lo:.3f}-{st_se_hi:.3f}), so the U's shape is clear only across the range |
| per-token activations hide much of the effect | per-token: ratio {pt_lo:.3f}-{pt_hi:.3f} at every alpha (RTN {pt_rtn:.3f}), no monotone trend (the values scatter by a few of their paired se, {pt_se:.3f}); KL halves, {pt_kl_rtn:.3f} (RTN) -> {pt_kl_lo:.3f}-{pt_kl_hi:.3f} for alpha >= 0.2 | yes |
| SmoothQuant W8A8 close to float (O3, OPT-175B) | static per-tensor stays {st_best_pct:.0f}% above float at its best; per-token is within {pt_pct_lo:.0f}-{pt_pct_hi:.0f}% with or without smoothing | no (static) |

- **Why the U is shallow and its bottom late.** Before smoothing, the normed inputs have channel max/median
  ratios of {act_ratio_lo:.1f}-{act_ratio_hi:.1f} over blocks {late} (q/k/v: median {qkv_ratio_late:.1f}; gate/up: {gu_ratio_late:.1f}) and
  absolute maxima far above the rest of the model in blocks 0-1 (q/k/v input max {q_max_01}, against a median
  of {q_max_late:.0f} in the other blocks): the outlier channels the paper describes (in `channels.png`, block {ch_block}'s
  q/k/v input: max/median {ch_ratio:.1f}, largest on dimension {ch_dim}, one of the 14 systematic outlier dimensions
  of `results/ablations/llm_int8`; {ch_ratio_05:.1f} after alpha 0.5, {ch_ratio_08:.1f} after 0.8), plus the whole-vector
  scale of blocks 0-1 that `results/ablations/llm_int8` found (every one of the 640 dimensions above 6 there).
  The weights are flat (q_proj / gate_proj max/median row ratio {w_ratio_lo:.1f}-{w_ratio_hi:.1f}, median {w_ratio_qkv:.1f} / {w_ratio_gu:.1f}),
  so migrating costs them little, and with per-channel weight scales the smoothed rows (max/median
  {w_sm_q_08:.1f} / {w_sm_g_08:.1f} at alpha 0.8, {w_sm_q_10:.1f} / {w_sm_g_10:.1f} at 1.0) still quantize well: the right arm of the U rises
  late and only a little, as MiniLM's per-channel columns showed. At alpha 0.5 the smoothed inputs still have
  max/median {a_sm_q_05:.1f} (q/k/v) and {a_sm_q01_05} in blocks 0-1 (ranges {a_max_q01_05}); at 0.8 they are nearly
  flat ({a_sm_lo_08:.1f}-{a_sm_hi_08:.1f}), and the static series is best around there (alpha {st_near}).
- **Why static per-tensor W8A8 stays far from float.** SmoothQuant (as the paper) leaves o_proj and down_proj
  unsmoothed, and their static per-tensor ranges are large: the largest static range of the model after
  smoothing is {st_range} (`static_range_max` in `runs.csv`: {st_range_who}; {st_range_a0:.0f} at
  alpha 0{st_range_a0_src}, and {st_range_rtn:.0f} before smoothing{st_range_rtn_src}).
  `results/ablations/llm_int8` found 286 and 41 outlier features (maxima 78 and 97) in the attention output of
  blocks 0 and 1, o_proj's input. Smoothing removes at most {st_gap_removed:.0f}% of the log-perplexity gap of RTN
  (ratio {st_rtn:.3f} -> {st_best:.3f}); the rest is not attributed layer by layer here (no per-layer error was
  measured in this study).
- **Per-token scales** already handle the outlier channels token by token, so perplexity is flat in alpha within
  its paired se, as the paper says; KL, whose se (about {pt_kl_se:.3f}) is small against its changes, still halves with
  smoothing.
- **Folding.** Scales are per layer, stored as a runtime divide of each layer's input (as qlab.ptq.smoothquant does
  and as the MiniLM study ran), not one scale shared by q/k/v and folded into Gemma's RMSNorm gain; that the folded
  form is exact in float on Gemma 3 (max |logit diff| 0.6-1.2e-6 of the largest logit at alpha 0 / 0.5 / 0.85 / 1)
  is checked by `tests/test_ablation_sanity.py` on the tiny Gemma 3. Per-layer scales are at least as good for each
  layer as a shared one, so the curves are if anything optimistic for the folded model.
- Departures: weights int8 *per channel* (the paper's O3 has per-tensor weights), which flattens the right arm; one
  270M model and 1,024 evaluation tokens (paper: OPT-175B, zero-shot accuracy and WikiText); static ranges are the
  calibration maxima over 32 x 256 tokens of Emma (no percentile clipping); fake-quantized float32 products, the
  attention's own products and the tied embedding float.
- Time: per run `quant_s` median {quant_med:.0f} s ({quant_lo:.0f}-{quant_hi:.0f}) and `eval_s` (both models in one pass) median
  {eval_med:.0f} s ({eval_lo:.0f}-{eval_hi:.0f}), in `runs.csv`. The sweep ran on 2 CPU cores shared with other jobs, in two
  processes: the first was killed for memory (the machine's other jobs) after its first run, and the second
  resumed the study.
"""


def write(out: Path, study) -> None:
    """``channels.csv`` (computed once, from the study's calibration capture: loads the model), the plots and
    ``README.md`` from the stored runs."""
    from qlab import plot as qplot

    out = Path(out)
    runs, layers = qx.load_results(out, layers=True)
    sm = smoothing(runs, layers)
    layer = channel_layer(sm if len(sm) else layers)
    path = out / "channels.csv"
    if not path.is_file():
        atomic_write_text(path, channel_table(runs, layer).to_csv(index=False))
    channels = pd.read_csv(path)
    plot(out, runs, sm)
    qplot.save(qplot.channel_maxima(channels, layer, log=True), out / "channels.png")
    recorded = json.loads((out / "study.json").read_text()).get("source") if (out / "study.json").is_file() else None
    atomic_write_text(out / "README.md", readme(runs, sm, channels, layer, study, recorded or STUDY))
    print(alpha_table(runs))


if __name__ == "__main__":
    qx.study_script(__doc__, ROOT / STUDY, ROOT / OUT, write)
