"""Char-level Transformer on Jane Austen's novels: validation perplexity, float vs W8A8 vs W4 g32.

1. Train a small float Transformer (pre-LN, learned positions) on random windows.
2. PTQ (round-to-nearest, no training) and QAT (fine-tuned from the float weights, STE) for
   W8A8 (int8 per-channel weights incl. embeddings, int8 per-tensor dynamic activations, all
   linear layers; the attention einsums q.k and p.v quantized too via call-site rules) and
   W4 g32 (int4 weights in groups of 32 along the contraction axis, float activations).
Outputs results/qat/austen.csv and results/qat/austen.md.

    python experiments/qat_austen.py [--float-steps 800] [--qat-steps 200] [--val-chars 40000]
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import pandas as pd
from flax import nnx

from qlab import nn as qnn
from qlab.data import char_splits, load_austen
from qlab.evaluate import nll
from qlab.models import Transformer, TransformerConfig
from qlab.train import train

OUT = pathlib.Path(__file__).resolve().parents[1] / "results" / "qat"

SCHEMES = {
    "W8A8": [qnn.Rule(".*", weight="int8/ch", act="int8")],
    "W4g32": [qnn.Rule(".*/einsum_.*"), qnn.Rule(".*", weight="int4/g32")],
}


def md_table(df):
    def fmt(v):
        return ("" if v != v else f"{v:.4f}") if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--float-steps", type=int, default=800)
    ap.add_argument("--qat-steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--val-chars", type=int, default=40000, help="validation characters evaluated")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--qat-lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    corpus = char_splits(load_austen())
    val = corpus.val[: args.val_chars]
    cfg = TransformerConfig(vocab_size=corpus.vocab_size, d_model=args.d_model, n_layers=args.layers, n_heads=4,
                            d_ff=4 * args.d_model, max_len=args.seq_len)
    common = dict(loss="lm", seq_len=args.seq_len, batch_size=args.batch_size, seed=args.seed, progress=False)

    def ppl(m):
        m.eval()
        return math.exp(nll(m, val, seq_len=args.seq_len, batch_size=32))

    model = Transformer(cfg, rngs=nnx.Rngs(args.seed))
    h = train(model, corpus.train, steps=args.float_steps, learning_rate=args.lr, **common)
    p_float = ppl(model)
    print(f"float: val ppl {p_float:.3f} ({h.seconds:.0f}s)", flush=True)
    size_f = qnn.model_size(qnn.quantize_model(model, [qnn.Rule(".*")]))
    rows = [dict(method="float", scheme="float", val_ppl=p_float, train_steps=args.float_steps,
                 train_seconds=h.seconds, model_mib=size_f["packed_mib"])]
    for scheme, rules in SCHEMES.items():
        qm = qnn.quantize_model(model, rules)
        size = qnn.model_size(qm)
        p_ptq = ppl(qm)
        rows.append(dict(method="ptq_rtn", scheme=scheme, val_ppl=p_ptq, train_steps=0, train_seconds=0.0,
                         model_mib=size["packed_mib"]))
        print(f"{scheme} PTQ-RTN: {p_ptq:.3f}", flush=True)
        qm.train()
        h = train(qm, corpus.train, steps=args.qat_steps, learning_rate=args.qat_lr, **common)
        p_qat = ppl(qm)
        rows.append(dict(method="qat", scheme=scheme, val_ppl=p_qat, train_steps=args.qat_steps,
                         train_seconds=h.seconds, model_mib=size["packed_mib"]))
        print(f"{scheme} QAT: {p_qat:.3f} ({h.seconds:.0f}s)", flush=True)
    # the float model fine-tuned for the same extra steps, for a fair comparison with QAT
    h = train(model, corpus.train, steps=args.qat_steps, learning_rate=args.qat_lr, **common)
    rows.append(dict(method="float+ft", scheme="float", val_ppl=ppl(model), train_steps=args.float_steps + args.qat_steps,
                     train_seconds=h.seconds, model_mib=size_f["packed_mib"]))
    df = pd.DataFrame(rows)
    df["seed"] = args.seed
    df.to_csv(out / "austen.csv", index=False)
    wall = time.time() - t0
    n_params = size_f["params"]
    md = [
        "# QAT on Jane Austen (char-level Transformer)",
        "",
        f"Command: `python experiments/qat_austen.py --float-steps {args.float_steps} --qat-steps {args.qat_steps} "
        f"--val-chars {args.val_chars}` ({wall / 60:.1f} min wall, {os.cpu_count()} shared CPU cores, jax {jax.__version__}).",
        "",
        f"Model: {args.layers} layers, d_model {args.d_model}, 4 heads, d_ff {4 * args.d_model}, context {args.seq_len}, "
        f"vocab {corpus.vocab_size} chars, {n_params:,} params. Float: {args.float_steps} Adam steps (lr {args.lr}), "
        f"batch {args.batch_size}x{args.seq_len} random windows of the six novels' training split. QAT: "
        f"{args.qat_steps} more steps (lr {args.qat_lr}) from the float weights, STE. Validation: perplexity "
        f"on the first {len(val):,} characters of the validation split (non-overlapping windows). Small budget: "
        "absolute perplexities are far from converged; the comparison between rows is the point.",
        "W8A8 = rule `.*` int8/ch weights + int8 activations (all Linear layers, the token and position Embed tables, the attention "
        "einsums q.k and p.v); W4g32 = int4 weights, groups of 32, float activations, einsums left float.",
        "",
        md_table(df.drop(columns=["seed"])),
        "",
    ]
    (out / "austen.md").write_text("\n".join(md))
    print(df.to_string())
    print(f"wall {wall:.0f}s")


if __name__ == "__main__":
    main()
