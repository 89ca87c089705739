"""Gemma 3 270M with its tied embedding quantized (the projections float): model size and perplexity.

    .venv/bin/python benchmarks/gemma3_embedding.py [--model gemma3] [--tokens 1024] [--gptq]

Runs the lm study family (qlab.experiments.lm) with rule sets that name only the embedding (``embed``: 262,144 x 640,
62% of the parameters, tied with the output head): float, RTN at int8/ch (one scale per token row) and int4/g32
(groups of 32 along the row), and with ``--gptq`` GPTQ int4/g32 calibrated on the head's inputs (8 x 256 tokens of
Emma, one float pass). Perplexity on the first ``--tokens`` tokens of Pride and Prejudice. The last line compares
the int8 embedding with float.
"""

from __future__ import annotations

import argparse
import tempfile

from qlab.experiments import sweep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3", choices=("gemma3", "gemma3_tiny"))
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--gptq", action="store_true")
    args = ap.parse_args()
    data = "austen" if args.model == "gemma3" else "tiny_text"
    rule_sets = {f"embed_{n}": [{"pattern": "embed", "weight": spec}]
                 for n, spec in (("int8ch", "int8/ch"), ("int4g32", "int4/g32"))}
    runs = [{"method": "float"}] + [{"method": "ptq_rtn", "rules": r} for r in rule_sets]
    if args.gptq:
        runs.append({"method": "ptq_gptq", "rules": "embed_int4g32", "calibration": "emma" if data == "austen"
                     else "tiny_text", "calibration_seqs": 8, "calibration_len": 256 if data == "austen" else 16,
                     "sequential": False})
    study = {"name": "gemma3_embedding", "rule_sets": rule_sets,
             "base": {"model": args.model, "data": data, "eval_tokens": args.tokens}, "include": runs}
    with tempfile.TemporaryDirectory() as out:
        tab = sweep(study, out=out, progress=False)
    tab["setting"] = tab["method"] + " " + tab["rules"].fillna("")
    cols = ["setting", "model_mib", "perplexity", "perplexity_se", "perplexity_increase", "quant_s", "eval_s"]
    print(tab[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    fl = tab[tab.method == "float"].iloc[0]
    e8 = tab[tab.rules == "embed_int8ch"].iloc[0]
    print(f"summary: int8/ch embedding {e8.model_mib:.1f} MiB vs float {fl.model_mib:.1f} MiB "
          f"({e8.model_mib / fl.model_mib:.3f}x); perplexity {e8.perplexity:.3f} vs {fl.perplexity:.3f} "
          f"(+{e8.perplexity - fl.perplexity:.3f}, float se {fl.perplexity_se:.3f})")


if __name__ == "__main__":
    main()
