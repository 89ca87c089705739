"""PTQ of Gemma 3 270M: perplexity on held-out Austen text, float vs RTN / GPTQ (+act-order) / AWQ / HQQ.

    python experiments/gemma3_ptq.py [--only FILTER] [--force] [--out results/gemma3_ptq]

Runs the study ``experiments/gemma3_ptq.toml`` with ``qlab.sweep`` (resumable: finished runs are kept; the
same as ``qlab sweep experiments/gemma3_ptq.toml``), then writes ``README.md`` in the results folder: the
perplexity table (setting x method, :func:`qlab.experiments.method_table`) and the size / bits columns.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import qlab.experiments as qx  # noqa: E402


def _md(t) -> str:
    return t.astype(object).where(t.notna(), None).to_markdown(missingval="")


def readme(table, study) -> str:
    ppl = _md(qx.method_table(table, "perplexity"))
    size = _md(qx.method_table(table, "bits_per_weight", digits=5))
    base = next(r for r in study.runs if r.get("calibration_seqs"))
    mode = ("block by block (each block on the outputs of its already-quantized predecessors)" if base.get("sequential")
            else "on statistics of one float pass")
    return f"""# Gemma 3 270M post-training quantization

{study.description}

Perplexity on the first {base['eval_tokens']} tokens of Pride and Prejudice (BOS + text). GPTQ and AWQ calibrate on
{base['calibration_seqs']} x {base['calibration_len']} tokens of Emma, {mode}. HQQ runs the same bits and groups with a
float zero point (asym/zp=float). The tied embedding stays float. Produced by `python experiments/gemma3_ptq.py`
(= `qlab sweep experiments/gemma3_ptq.toml` plus this file); every run's row, with its timings, is in `runs.csv`.

## Perplexity

{ppl}

## Bits per weight of the quantized projections (scales and zero points included)

{size}

## Notes

- The float baseline is the Q4_K_M GGUF dequantized to float32, so its weights already sit on another 4-bit grid.
- Symmetric int2 (codes -2..1, absmax mapped to 1) is close to ternary: every method collapses at W2 g64.
- At W8 every method is within the noise of a {base['eval_tokens']}-token evaluation.
- `one_pass_results.csv` (if present) holds the same grid with GPTQ / AWQ calibrated on one float pass
  (`sequential = false`), from the earlier script: W3 g128 GPTQ 87.6, GPTQ act-order 76.9, AWQ 247.5.

![pareto](pareto.png)
![perplexity vs bits](perplexity_vs_bits.png)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", default=str(ROOT / "experiments/gemma3_ptq.toml"))
    ap.add_argument("--out", default=None, help="results folder (default results/gemma3_ptq)")
    ap.add_argument("--only", default=None, help="only runs matching key=value[,key=value] (values: a|b, globs)")
    ap.add_argument("--force", action="store_true")
    a = ap.parse_args()
    study = qx.load_study(a.study)
    out = Path(a.out or ROOT / "results" / study.name)
    table = qx.sweep(study, out=out, only=a.only, force=a.force)
    (out / "README.md").write_text(readme(table, study))
    print(qx.method_table(table, "perplexity").to_string())


if __name__ == "__main__":
    main()
