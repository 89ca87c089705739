"""Ablation 1 (issue #15): GPTQ on Gemma 3 270M: bits x granularity x act-order x calibration size and domain.

    python experiments/ablation_gptq.py [--readme] [--out results/ablations/gptq]

Runs the study ``experiments/ablation_gptq.toml`` with ``qlab.sweep`` (resumable; the same as
``qlab sweep experiments/ablation_gptq.toml --out results/ablations/gptq``), then writes the tables
(:func:`run_table`, :func:`grid_table`), ``gptq.png`` and ``README.md``. ``--readme`` only rewrites the tables,
plot and README from the stored runs; the runs of the study that are not stored are listed as not run.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qlab.experiments as qx  # noqa: E402

STUDY = "experiments/ablation_gptq.toml"
OUT = "results/ablations/gptq"
GRANULARITIES = ("ch", "g128", "g64", "g32")


def run_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per run: ``method`` (float / rtn / gptq / gptq+act), ``weight``, ``bits``, ``gran``,
    ``calibration``, ``seqs``, perplexity +- se, the paired ratio to float +- se, KL, top-1, ``collapsed`` and
    ``wall_s``.

    Example:
        >>> r = pd.DataFrame({"method": ["float", "ptq_gptq"], "weight": [None, "int3/g128"],
        ...                   "act_order": [None, True], "calibration": [None, "emma"],
        ...                   "calibration_seqs": [None, 32], "perplexity": [17.0, 20.0], "perplexity_se": [1, 1],
        ...                   "ppl_ratio": [1.0, 1.2], "ppl_ratio_se": [0, 0.01], "kl": [0, 0.1], "top1": [1, 0.8],
        ...                   "collapsed": [False, False], "wall_s": [10.0, 60.0]})
        >>> run_table(r)[["method", "bits", "gran", "seqs"]].values.tolist()
        [['float', 32, '-', 0], ['gptq+act', 3, 'g128', 32]]
    """
    t = runs.copy()
    name = {"float": "float", "ptq_rtn": "rtn", "ptq_gptq": "gptq"}
    t["m"] = [name.get(m, m) + ("+act" if m == "ptq_gptq" and a == True else "")  # noqa: E712 (True or 1.0)
              for m, a in zip(t["method"], t["act_order"])]
    w = t["weight"].fillna("float")
    t["bits"] = [32 if x == "float" else int(x.split("/")[0][3:]) for x in w]
    t["gran"] = [x.split("/")[1] if "/" in x else "-" for x in w]
    gptq = t["method"] == "ptq_gptq"
    t["cal"] = np.where(gptq, t["calibration"].astype(object), "-")
    t["seqs"] = np.where(gptq, t["calibration_seqs"].fillna(0), 0).astype(int)
    t = t.assign(weight=w).rename(columns={"perplexity": "ppl", "perplexity_se": "ppl_se", "ppl_ratio": "ratio",
                                           "ppl_ratio_se": "ratio_se"})
    cols = ["m", "weight", "bits", "gran", "cal", "seqs", "ppl", "ppl_se", "ratio", "ratio_se", "kl", "top1",
            "collapsed", "wall_s"]
    t = t[cols].rename(columns={"m": "method", "cal": "calibration"})
    order = {"float": 0, "rtn": 1, "gptq": 2, "gptq+act": 3}
    t["_o"] = t["method"].map(order)
    t["_g"] = t["gran"].map({g: i for i, g in enumerate(GRANULARITIES)}).fillna(-1)
    t = t.sort_values(["calibration", "seqs", "_o", "bits", "_g"], ascending=[True, True, True, False, True])
    return t.drop(columns=["_o", "_g"]).reset_index(drop=True)


def _cell(r) -> str:
    if r is None:
        return "not run"
    if bool(r["collapsed"]):
        return f"collapsed ({r['ppl']:.3g})"
    return f"{r['ratio']:.3f} +- {r['ratio_se']:.3f}"


def grid_table(t: pd.DataFrame, calibration: str = "emma", seqs: int = 32) -> pd.DataFrame:
    """Bits x granularity (rows) against RTN / GPTQ / GPTQ + act-order (columns): ``ratio +- paired se`` at one
    calibration setting (GPTQ) and RTN.

    Example:
        >>> t = pd.DataFrame({"method": ["rtn"], "bits": [4], "gran": ["ch"], "calibration": ["-"], "seqs": [0],
        ...                   "ratio": [1.5], "ratio_se": [0.05], "ppl": [25.0], "collapsed": [False]})
        >>> grid_table(t).iloc[0].tolist()
        ['int4/ch', '1.500 +- 0.050', 'not run', 'not run']
    """
    rows = []
    for bits in (4, 3):
        for g in GRANULARITIES:
            row = {"weight": f"int{bits}/{g}"}
            for m in ("rtn", "gptq", "gptq+act"):
                sel = t[(t.method == m) & (t.bits == bits) & (t.gran == g)]
                if m != "rtn":
                    sel = sel[(sel.calibration == calibration) & (sel.seqs == seqs)]
                row[m.replace("gptq+act", "gptq act-order")] = _cell(sel.iloc[0] if len(sel) else None)
            rows.append(row)
    return pd.DataFrame(rows)


def calib_table(t: pd.DataFrame) -> pd.DataFrame:
    """GPTQ ratio +- se for each (weight, act-order) measured at more than one calibration setting (columns: Emma at
    each size, then the other texts at 32 sequences)."""
    g = t[t.method.str.startswith("gptq")]
    settings = [("emma", s) for s in sorted(g[g.calibration == "emma"].seqs.unique())]
    settings += [(c, 32) for c in ("kjv", "fortunes") if ((g.calibration == c) & (g.seqs == 32)).any()]
    keys = g.groupby(["weight", "method"]).size()
    rows = []
    for (w, m), _ in keys.items():
        sub = g[(g.weight == w) & (g.method == m)]
        if len(sub) < 2:
            continue
        row = {"weight": w, "act-order": m == "gptq+act"}
        for c, s in settings:
            sel = sub[(sub.calibration == c) & (sub.seqs == s)]
            row[f"{c} x{s}"] = _cell(sel.iloc[0] if len(sel) else None)
        rows.append(row)
    out = pd.DataFrame(rows)
    if len(out):
        out["_b"] = -out.weight.str.slice(3, 4).astype(int)
        out = out.sort_values(["_b", "weight", "act-order"]).drop(columns="_b")
    return out.reset_index(drop=True)


def times(runs: pd.DataFrame, t: pd.DataFrame) -> pd.DataFrame:
    """Wall time per part of the study (summed ``wall_s`` and per run; ``shared_s``, the one calibration capture a
    setting's first run pays, summed apart)."""
    part = np.select([t.method == "float", t.method == "rtn",
                      (t.calibration == "emma") & (t.seqs == 32)],
                     ["float", "RTN", "GPTQ, Emma x 32"], default="")
    part = [p or (f"GPTQ, Emma x {s}" if c == "emma" else f"GPTQ, {c} x {s}")
            for p, c, s in zip(part, t.calibration, t.seqs)]
    d = pd.DataFrame({"part": part, "wall_s": t.wall_s})
    g = d.groupby("part", sort=False)["wall_s"].agg(["count", "sum", "median", "max"])
    g.columns = ["runs", "total min", "median s / run", "max s / run"]
    g["total min"] = g["total min"] / 60
    return g.reset_index()


def plot(out: Path, t: pd.DataFrame):
    from qlab.plot import figure, save

    fig = figure(figsize=(13, 4.2))
    ax1, ax2, ax3 = fig.subplots(1, 3)
    x = np.arange(len(GRANULARITIES))
    styles = {"rtn": ("s", ":"), "gptq": ("o", "--"), "gptq+act": ("^", "-")}
    for bits, color in ((4, "C0"), (3, "C3")):
        for m, (mk, ls) in styles.items():
            sel = t[(t.method == m) & (t.bits == bits)]
            if m != "rtn":
                sel = sel[(sel.calibration == "emma") & (sel.seqs == 32)]
            sel = sel.set_index("gran").reindex(GRANULARITIES)
            ok = sel.ratio.notna() & ~sel.collapsed.fillna(False).astype(bool)
            ax1.errorbar(x[ok.to_numpy()], sel.ratio[ok], yerr=sel.ratio_se[ok], marker=mk, ls=ls, color=color,
                         label=f"int{bits} {m}", capsize=2)
    ax1.set_xticks(x, ["per-channel", "g128", "g64", "g32"])
    ax1.set_yscale("log")
    ax1.set_ylabel("perplexity / float perplexity (paired se)")
    ax1.set_title("granularity: RTN vs GPTQ (act-order off / on), Emma x 32", fontsize=9)
    ax1.legend(fontsize=7)
    g = t[t.method.str.startswith("gptq") & (t.calibration == "emma")]
    for (w, m), sub in g.groupby(["weight", "method"]):
        if sub.seqs.nunique() < 2:
            continue
        sub = sub.sort_values("seqs")
        color = "C0" if w.startswith("int4") else "C3"
        ax2.errorbar(sub.seqs, sub.ratio, yerr=sub.ratio_se, marker=styles[m][0], ls=styles[m][1], color=color,
                     label=f"{w} {m}", capsize=2)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks([8, 32, 128], ["8", "32", "128"])
    ax2.set_xlabel("calibration sequences of 256 tokens (Emma)")
    ax2.set_title("calibration size", fontsize=9)
    if ax2.get_legend_handles_labels()[0]:
        ax2.legend(fontsize=7)
    else:
        ax2.text(0.5, 0.5, "not run", ha="center", transform=ax2.transAxes)
    d = t[t.method.str.startswith("gptq") & (t.seqs == 32)]
    combos = [(w, m) for (w, m), sub in d.groupby(["weight", "method"]) if sub.calibration.nunique() > 1]
    cals = [c for c in ("emma", "kjv", "fortunes") if c in set(d.calibration)]
    width = 0.8 / max(len(cals), 1)
    for j, c in enumerate(cals):
        vals = [d[(d.weight == w) & (d.method == m) & (d.calibration == c)] for w, m in combos]
        y = [v.ratio.iloc[0] if len(v) else np.nan for v in vals]
        e = [v.ratio_se.iloc[0] if len(v) else np.nan for v in vals]
        ax3.bar(np.arange(len(combos)) + j * width, y, width, yerr=e, label=c, color=f"C{j + 4}", capsize=2)
    ax3.set_xticks(np.arange(len(combos)) + width * (len(cals) - 1) / 2, [f"{w}\n{m}" for w, m in combos],
                   fontsize=7)
    ax3.set_title("calibration text (32 x 256 tokens); eval: Pride and Prejudice", fontsize=9)
    if combos:
        ax3.legend(fontsize=7)
    else:
        ax3.text(0.5, 0.5, "not run", ha="center", transform=ax3.transAxes)
    save(fig, out / "gptq.png")


def _md(t: pd.DataFrame) -> str:
    return t.to_markdown(index=False, floatfmt=".4g")


def missing(study, runs: pd.DataFrame) -> list[str]:
    """Labels of the study's runs with no stored result."""
    done = set(runs.config_hash)
    out = []
    for r in study.runs:
        if r.config_hash not in done:
            extra = "" if r.method.name != "ptq_gptq" else (
                f" act_order={r['act_order']} calibration={r['calibration']} x{r['calibration_seqs']}")
            out.append(f"{r.method.name} {r['weight'] or ''}{extra}")
    return out


def readme(runs: pd.DataFrame, study, notes: str = "") -> str:
    t = run_table(runs)
    fl = t[t.method == "float"].iloc[0]
    miss = missing(study, runs)
    minutes = runs["wall_s"].sum() / 60
    miss_txt = ("All runs of the study are stored." if not miss else
                f"**Not run** ({len(miss)} of {len(study.runs)} runs of the study, for lack of time: the study "
                "resumes with the same command): " + "; ".join(miss) + ".")
    return f"""# Ablation 1: GPTQ granularity, act-order and calibration (Gemma 3 270M)

{study.description}.

**Question.** How much of the round-to-nearest loss does GPTQ recover on a small modern LM, and how do its knobs
matter: the group size (per-channel, g128, g64, g32), act-order (quantizing columns in order of decreasing Hessian
diagonal, "desc_act"), the number of calibration sequences and the domain of the calibration text? GPTQ (Frantar
et al. 2023, OPT WikiText-2): 4-bit and 3-bit RTN collapse first on the small models, GPTQ recovers most of the
gap; groups (g128, g64, g32) help further at 3 bits; act-order matters most on models with outliers (OPT-66B:
4-bit 9.55 -> 9.34, 3-bit 14.16 -> 9.95). Reference defaults: block 128, damping 0.01 x mean diag(H), 128
calibration sequences of 2,048 tokens.

**Setup.** `{STUDY}`, run with `qlab sweep {STUDY} --out {OUT}` (then `python experiments/ablation_gptq.py
--readme` for this file and `gptq.png`): {len(runs)} runs stored, {minutes:.0f} min summed over their wall times
(2 CPU cores; the first 27 runs shared them with other jobs, and the sweep was OOM-killed three times by the shared memory and resumed). Every attention / MLP projection (126 matrices) quantized, symmetric absmax
scales, the tied embedding float. GPTQ with qlab's defaults (block 128, damping 0.01 x mean diag(H)) and one-pass
calibration (`sequential = false`: every projection's input Hessian captured once from the float model, not
block by block on the already-quantized predecessors as the paper does); calibration windows of
{int(runs.calibration_len.dropna().iloc[0]) if runs.calibration_len.notna().any() else 256} tokens at fixed random
offsets of Emma (same author as the evaluation text), the King James Bible or Debian fortunes. Perplexity on the
first {int(runs.eval_tokens.iloc[0])} tokens of Pride and Prejudice (float {fl['ppl']:.2f} +- {fl['ppl_se']:.2f});
`ratio` is the paired perplexity ratio to float +- its standard error over tokens (paired, far smaller than either
perplexity's se, which is about 8%); a difference under about two paired se is a tie. `collapsed`: perplexity above
the vocabulary size. {miss_txt}

## Results

Ratio to float, bits x granularity, GPTQ calibrated on 32 x 256 tokens of Emma:

{_md(grid_table(t))}

Calibration size and domain (GPTQ ratio to float; Emma at 8 / 32 / 128 sequences, the other texts at 32):

{_md(calib_table(t)) if len(calib_table(t)) else "None of these runs was done (see the runs not run above)."}

Every run:

{_md(t)}

Wall time by part (the first run of each calibration setting includes the one float-pass capture of its Hessians):

{_md(times(runs, t))}

![gptq](gptq.png)

## What it shows

{notes}
"""


NOTES = """Paper beside qlab (ratio = perplexity / float perplexity, paired se; Emma x 32 one-pass calibration unless
said):

| finding | paper (GPTQ, OPT, WikiText-2) | qlab (Gemma 3 270M, Pride and Prejudice) | agrees? |
|---|---|---|---|
| RTN collapses first at low bits; GPTQ recovers most of the gap | 4- and 3-bit RTN collapse on the small OPTs, GPTQ recovers most of it | int4/ch RTN 3.75 -> GPTQ 1.50 (act-order 1.37); int4/g128 RTN 2.04 -> 1.26 (1.19); int3/g128 RTN 201 -> 5.08 (4.46); int3/ch RTN collapsed (ppl 4.7e9) -> GPTQ 61.9 (act-order 19.9) | yes |
| groups help further, most at 3 bits | g128 / g64 / g32 improve 3-bit GPTQ | int4: ch 1.50 -> g128 1.26 -> g64 1.16 -> g32 1.15 (the gain flattens by g64); int3: ch 61.9 -> g128 5.08 -> g64 3.32 -> g32 2.88 (act-order 19.9 / 4.46 / 3.02 / 2.17) | yes |
| act-order matters most with outliers | OPT-66B 4-bit 9.55 -> 9.34, 3-bit 14.16 -> 9.95 | at 32 sequences never worse, and largest where GPTQ is stretched: int3/ch 61.9 -> 19.9, int3/g32 2.88 -> 2.17 (about 4 combined se), int4/ch 1.497 -> 1.367 (2.2 se); a tie at int4/g64 and g32; over the 24 (spec, size) pairs it is never worse by more than one combined se (int3/g128 at 128 sequences: 3.62 -> 3.82, 0.6 se) | yes in direction |
| calibration size | the reference code's default is 128 x 2,048 tokens; PAPERS.md quotes no figure on size | 8 / 32 / 128 sequences of 256 tokens: more help most where GPTQ is stretched: int3/ch 6,221 -> 61.9 -> 41.7, int3/g128 18.0 -> 5.08 -> 3.62, int4/ch 1.67 -> 1.50 -> 1.48; at 4 bits with groups 8 sequences are within about two se of 128 | - (no paper figure) |
| calibration domain | PAPERS.md quotes none | 32 sequences of another text cost accuracy, the King James Bible most: int4/ch Emma 1.50, fortunes 1.69, KJV 2.01; int3/g128 5.08, 8.64, 13.5; act-order narrows the gap (int3/g128: 4.46, 4.89, 9.58) | - (no paper figure) |

- Noise: the paired ratio's se is 2-7% of the ratio (up to 18% for the collapsed-looking int3 runs); two GPTQ
  variants are compared here through their separate ratios, so a difference under about two combined se
  (sqrt(se1^2 + se2^2)) is a tie.
- RTN alone gains far more from groups than GPTQ does (int4 ch / g128 / g64 / g32: 3.75 / 2.04 / 1.88 / 1.59;
  int3: collapsed / 201 / 32.3 / 13.2), so GPTQ's lead over RTN shrinks with the group size (int4/g32: 1.15 against
  1.59). RTN int4/g64 and int4/g32 reproduce `results/ablations/formats4` exactly (1.875, 1.585).
- Calibration size against domain: 8 sequences of Emma (2,048 tokens) beat 32 of the King James Bible at int4/ch
  (1.67 against 2.01); the text's domain matters more than its amount here.
- One-pass against block-by-block calibration: the study `results/gemma3_ptq` (same model, same 1,024 tokens, same
  32 x 256 Emma windows, `sequential = true`) measured GPTQ int4/ch 25.47 (act-order 25.21), int4/g128 21.52
  (20.98), int3/g128 66.11 (51.49). One pass gives int4/ch 25.83 (23.60), int4/g128 21.65 (20.51): the same at 4
  bits; at int3/g128 87.65 (76.96) is a third higher than sequential: once the quantized predecessors change each
  block's input a lot (3 bits), calibrating on the float inputs costs accuracy, as the paper's sequential scheme
  assumes.
- Departures: one small model (Gemma 3 270M, not OPT), one evaluation text of 1,024 tokens, RTN in its plain
  symmetric absmax form (the paper's RTN baseline is the same), 256-token calibration windows (the paper's are
  2,048), one-pass calibration (the paper's is sequential). The float baseline is itself dequantized from a
  Q4_K_M GGUF.
- Time: the 27 runs of the first two sessions shared the 2 CPU cores with 2-3 other jobs (and were OOM-killed
  twice, then resumed), so their wall times run 30-300 s; the last 38 ran alone at 31-36 s per GPTQ run (about the
  same with act-order), plus 60-170 s for the first run of each calibration setting, which captures its Hessians
  once (one float pass over the windows) for the runs after it.
"""


def write(out: Path, study) -> None:
    """The tables, ``gptq.png`` and ``README.md`` from the stored runs."""
    runs = qx.load_results(out)
    t = run_table(runs)
    plot(out, t)
    (out / "README.md").write_text(readme(runs, study, NOTES))
    print(grid_table(t).to_string())
    print(calib_table(t).to_string())
    print(times(runs, t).to_string())


if __name__ == "__main__":
    qx.study_script(__doc__, ROOT / STUDY, ROOT / OUT, write)
