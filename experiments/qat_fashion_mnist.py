"""QAT vs post-training RTN on Fashion-MNIST (CNN), and LSQ vs STE at low bit widths.

1. Train the float CNN (conv32-pool-conv64-pool-dense128-dense10).
2. For W8A8, W4A8, W3A8, W2A8 (weights per output channel, activations int8 per tensor, dynamic):
   PTQ = round-to-nearest fake-quant of the float weights, no training;
   QAT = the same rules, fine-tuned from the float weights (STE), and for 3 and 2 bits also
   with LSQ weight quantizers (learned per-channel steps).
Outputs results/qat/fashion_mnist.csv and results/qat/fashion_mnist.md.

    python experiments/qat_fashion_mnist.py                 # defaults (see --help)
    python experiments/qat_fashion_mnist.py --train-size 5000 --float-epochs 1 --qat-epochs 1   # quick
"""

from __future__ import annotations

import argparse
import os
import pathlib
import platform
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import numpy as np
import pandas as pd
from flax import nnx

from qlab import nn as qnn
from qlab.data import Split, fashion_mnist_dataset
from qlab.evaluate import accuracy
from qlab.models import CNN, CNNConfig
from qlab.train import train

OUT = pathlib.Path(__file__).resolve().parents[1] / "results" / "qat"


def md_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no tabulate dependency)."""
    def fmt(v):
        if isinstance(v, float):
            return "" if v != v else f"{v:.4f}"
        return str(v)
    lines = ["| " + " | ".join(map(str, df.columns)) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)


def rules_for(wbits: int, abits: int = 8, quantizer: str = "ste"):
    return [qnn.Rule(".*", weight=f"int{wbits}/ch", act=f"int{abits}", weight_quantizer=quantizer)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-size", type=int, default=20000, help="training subset size (of 55,000)")
    ap.add_argument("--float-epochs", type=int, default=4)
    ap.add_argument("--qat-epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--qat-lr", type=float, default=3e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    t0 = time.time()
    ds = fashion_mnist_dataset(seed=args.seed)
    tr = ds.train
    if args.train_size and args.train_size < len(tr):
        idx = np.random.default_rng(args.seed).permutation(len(tr))[: args.train_size]
        tr = Split(tr.images[idx], tr.labels[idx])
    xt, yt = ds.test
    common = dict(batch_size=args.batch_size, seed=args.seed, progress=False)

    model = CNN(CNNConfig.fashion_mnist(), rngs=nnx.Rngs(args.seed))
    h = train(model, tr, epochs=args.float_epochs, learning_rate=args.lr, **common)
    acc_float = accuracy(model, xt, yt)
    print(f"float: test acc {acc_float:.4f} ({h.seconds:.0f}s)", flush=True)
    size_f = qnn.model_size(qnn.quantize_model(model, [qnn.Rule(".*")]))
    rows = [dict(method="float", weight_bits=32, act_bits=32, quantizer="-", test_accuracy=acc_float,
                 train_seconds=h.seconds, model_mib=size_f["packed_mib"], train_size=len(tr),
                 epochs=args.float_epochs)]

    configs = [(8, "ste"), (4, "ste"), (3, "ste"), (2, "ste"), (3, "lsq"), (2, "lsq")]
    for wbits, quantizer in configs:
        rules = rules_for(wbits, 8, quantizer)
        qm = qnn.quantize_model(model, rules)
        size = qnn.model_size(qm)
        if quantizer == "ste":
            acc_ptq = accuracy(qm, xt, yt)
            rows.append(dict(method="ptq_rtn", weight_bits=wbits, act_bits=8, quantizer="rtn", test_accuracy=acc_ptq,
                             train_seconds=0.0, model_mib=size["packed_mib"], train_size=0, epochs=0))
            print(f"W{wbits}A8 PTQ-RTN: {acc_ptq:.4f}", flush=True)
        h = train(qm, tr, epochs=args.qat_epochs, learning_rate=args.qat_lr, **common)
        qm.eval()
        acc_qat = accuracy(qm, xt, yt)
        cm = qnn.convert(qm)
        acc_conv = accuracy(cm, xt, yt)
        rows.append(dict(method="qat", weight_bits=wbits, act_bits=8, quantizer=quantizer, test_accuracy=acc_qat,
                         train_seconds=h.seconds, model_mib=size["packed_mib"], train_size=len(tr),
                         epochs=args.qat_epochs, converted_accuracy=acc_conv))
        print(f"W{wbits}A8 QAT-{quantizer}: {acc_qat:.4f} (converted {acc_conv:.4f}, {h.seconds:.0f}s)", flush=True)

    df = pd.DataFrame(rows)
    df["seed"] = args.seed
    df.to_csv(out / "fashion_mnist.csv", index=False)
    wall = time.time() - t0
    md = [
        "# QAT on Fashion-MNIST (CNN conv32-conv64-dense128, 421K params)",
        "",
        f"Command: `python experiments/qat_fashion_mnist.py --train-size {args.train_size} --float-epochs "
        f"{args.float_epochs} --qat-epochs {args.qat_epochs}` ({wall / 60:.1f} min wall on {os.cpu_count()} shared "
        f"CPU cores, jax {jax.__version__}, {platform.machine()}).",
        "",
        f"Training subset: {len(tr)} of 55,000 training images (seeded); test: the official 10,000.",
        "Weights int-b per output channel (f16 scales), activations int8 per tensor, dynamic range.",
        "PTQ = round-to-nearest of the float weights (no training). QAT = fine-tuned from the float "
        f"weights for {args.qat_epochs} epoch(s), Adam lr {args.qat_lr}; STE = qlab.fake_quant straight-through, "
        "LSQ = learned per-channel steps (QuantParam).",
        "",
        md_table(df.drop(columns=["seed"])),
        "",
        "QAT rows train one or more epochs beyond the float row: compare them with each other and with PTQ at the "
        "same bit width. `converted_accuracy` = after `qlab.nn.convert` (int codes + scales).",
        "",
    ]
    (out / "fashion_mnist.md").write_text("\n".join(md))
    print(df.to_string())
    print(f"wall {wall:.0f}s")


if __name__ == "__main__":
    main()
