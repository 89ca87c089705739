"""QAT vs post-training RTN on Fashion-MNIST (CNN), and LSQ vs STE at low bit widths.

1. Train the float CNN (conv32-pool-conv64-pool-dense128-dense10).
2. For W8A8, W4A8, W3A8, W2A8 (weights per output channel, activations int8 per tensor, dynamic):
   PTQ = round-to-nearest fake-quant of the float weights, no training;
   QAT = the same rules, fine-tuned from the float weights (STE), and for 3 and 2 bits also
   with LSQ weight quantizers (learned per-channel steps).

Writes the study layout of ``results/qat_fashion_mnist/`` (see ``results/README.md``): ``runs/<hash>.json``
as each run finishes, then ``runs.csv``, ``study.json`` and ``README.md``.

    python experiments/qat_fashion_mnist.py                 # defaults (see --help)
    python experiments/qat_fashion_mnist.py --train-size 5000 --float-epochs 1 --qat-epochs 1   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from flax import nnx  # noqa: E402

from qlab import nn as qnn  # noqa: E402
from qlab.data import Split, fashion_mnist_dataset  # noqa: E402
from qlab.evaluate import accuracy  # noqa: E402
from qlab.experiments import config_hash  # noqa: E402
from qlab.experiments.results import atomic_write_text, markdown_table, rebuild_tables, write_run  # noqa: E402
from qlab.models import CNN, CNNConfig  # noqa: E402
from qlab.train import train  # noqa: E402

STUDY = "qat_fashion_mnist"
SCRIPT = "experiments/qat_fashion_mnist.py"
OUT = ROOT / "results" / STUDY
#: Command-line defaults (what `command` leaves out); --train-size is a subset of the 55,000 training images.
DEFAULTS = dict(train_size=20000, float_epochs=4, qat_epochs=1, batch_size=128, lr=1e-3, qat_lr=3e-4, seed=0)
#: (weight bits, weight quantizer) of the QAT runs; each "ste" run also gets a PTQ (RTN) run at its bits.
CONFIGS = [(8, "ste"), (4, "ste"), (3, "ste"), (2, "ste"), (3, "lsq"), (2, "lsq")]


def rules_for(wbits: int, abits: int = 8, quantizer: str = "ste"):
    return [qnn.Rule(".*", weight=f"int{wbits}/ch", act=f"int{abits}", weight_quantizer=quantizer)]


def command(args: dict) -> str:
    """The command line that reproduces a run of this script with ``args`` (the three main flags always, the others
    where they differ from :data:`DEFAULTS`).

    >>> command({"train_size": 20000, "float_epochs": 3, "qat_epochs": 1})
    'python experiments/qat_fashion_mnist.py --train-size 20000 --float-epochs 3 --qat-epochs 1'
    """
    main_flags = ("train_size", "float_epochs", "qat_epochs")
    extra = [k for k in args if k not in main_flags and k in DEFAULTS and args[k] != DEFAULTS[k]]
    return " ".join([f"python {SCRIPT}"] + [f"--{k.replace('_', '-')} {args[k]}" for k in [*main_flags, *extra]])


def run_config(args: dict, method: str, weight_bits: int, act_bits: int, quantizer: str, n_train: int) -> dict:
    """The config columns of one run, spelled out, with its ``config_hash`` (over the columns and the
    script's arguments, since every run starts from the same float model). ``n_train``: training images.

    >>> args = dict(train_size=100, float_epochs=2, qat_epochs=1, batch_size=32, lr=1e-3, qat_lr=3e-4, seed=0)
    >>> row = run_config(args, "qat", 4, 8, "lsq", 100)
    >>> row["weight"], row["act"], row["epochs"], row["learning_rate"], len(row["config_hash"])
    ('int4/ch', 'int8', 1, 0.0003, 12)
    """
    trained = method != "ptq_rtn"
    row = dict(study=STUDY, method=method, model="cnn", data="fashion_mnist",
               weight=None if method == "float" else f"int{weight_bits}/ch",
               act=None if method == "float" else f"int{act_bits}",
               weight_bits=weight_bits, act_bits=act_bits, quantizer=quantizer,
               train_size=n_train if trained else 0,
               epochs={"float": args["float_epochs"], "qat": args["qat_epochs"]}.get(method, 0),
               batch_size=args["batch_size"],
               learning_rate={"float": args["lr"], "qat": args["qat_lr"]}.get(method),
               seed=args["seed"])
    row["config_hash"] = config_hash({**row, "script_args": args})
    return row


def readme(runs: pd.DataFrame, study: dict) -> str:
    """The study's README.md: what ran, how long, the table and what it shows."""
    args = study["args"]

    def pick(method, bits, quantizer, column="test_accuracy"):
        sel = runs[(runs.method == method) & (runs.weight_bits == bits) & (runs.quantizer == quantizer)]
        return float(sel[column].iloc[0]) if len(sel) else float("nan")

    def acc(method, bits, quantizer):
        return 100 * pick(method, bits, quantizer)

    cols = ["method", "weight", "act", "quantizer", "test_accuracy", "converted_accuracy", "model_mib", "epochs",
            "train_seconds"]
    table = markdown_table(runs[[c for c in cols if c in runs]])
    lo = min(b for b, _ in CONFIGS)
    cpu = f", {study['cpu_user_s'] / 60:.1f} min user CPU" if study.get("cpu_user_s") else ""
    return f"""# QAT on Fashion-MNIST (CNN conv32-conv64-dense128)

What ran: `{study['command']}` ({study['wall_s'] / 60:.1f} min wall{cpu}, {study['environment']}).
The float CNN trains {args['float_epochs']} epochs (Adam lr {args['lr']}, batch {args['batch_size']}) on
{args['train_size']} of the 55,000 training images (seeded subset); test: the official 10,000. Weights int-b per
output channel (f16 scales), activations int8 per tensor, dynamic range. PTQ = round-to-nearest of the float weights
(no training). QAT = fine-tuned from the float weights for {args['qat_epochs']} epoch(s), Adam lr {args['qat_lr']};
STE = `qlab.fake_quant` straight-through, LSQ = learned per-channel steps. `converted_accuracy`: the QAT model
turned into int codes + scales by `qlab.nn.convert`. One seed ({args['seed']}). Every run is a row of `runs.csv`.

{table}

What it shows:
- At {lo} bits round-to-nearest collapses ({acc('ptq_rtn', lo, 'rtn'):.1f}%) and QAT recovers almost all of it
  (STE {acc('qat', lo, 'ste'):.1f}%, LSQ {acc('qat', lo, 'lsq'):.1f}%); at 3 bits STE gets {acc('qat', 3, 'ste'):.1f}% and LSQ {acc('qat', 3, 'lsq'):.1f}%.
  As in the LSQ paper, learned steps help most at 2 bits; unlike it, the first and last layers are quantized too
  (the paper keeps them at 8 bits), and this is one seed.
- Rows at one bit width have equal bytes. Across widths, QAT W3A8 ({acc('qat', 3, 'ste'):.1f}%) is
  {acc('qat', 4, 'ste') - acc('qat', 3, 'ste'):.1f} points below W4A8 at {pick('qat', 3, 'ste', 'model_mib') / pick('qat', 4, 'ste', 'model_mib'):.2f}x its bytes.
- QAT rows train {args['qat_epochs']} epoch(s) beyond the float row and the float CNN is not converged, so QAT beating float
  says more about the extra training than about quantization: compare QAT rows with each other and with PTQ at
  the same bits.
"""


def write_study(out, rows: list[dict], args: dict, wall_s: float, environment: str, cpu_user_s: float | None = None):
    """Write the study layout for ``rows`` (each already stored by ``write_run``): ``runs.csv`` in run order,
    ``study.json`` (script, arguments, timing, runs) and ``README.md``."""
    out = pathlib.Path(out)
    runs, _ = rebuild_tables(out, [r["config_hash"] for r in rows])
    config_keys = list(run_config(args, "float", 32, 32, "-", 0))
    study = dict(name=STUDY, description="Fashion-MNIST CNN: QAT (STE, LSQ) vs post-training RTN at W8/4/3/2 A8",
                 source=SCRIPT, command=command(args), args=args, wall_s=wall_s, cpu_user_s=cpu_user_s,
                 environment=environment, runs=[{k: r.get(k) for k in config_keys} for r in rows])
    atomic_write_text(out / "study.json", json.dumps(study, indent=1))
    atomic_write_text(out / "README.md", readme(runs, study))
    return runs


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for key, default in DEFAULTS.items():
        ap.add_argument("--" + key.replace("_", "-"), type=type(default), default=default)
    ap.add_argument("--out", default=str(OUT))
    ns = ap.parse_args(argv)
    out = pathlib.Path(ns.out)
    args = {k: v for k, v in vars(ns).items() if k != "out"}

    t0 = time.time()
    ds = fashion_mnist_dataset(seed=ns.seed)
    tr = ds.train
    if ns.train_size and ns.train_size < len(tr):
        idx = np.random.default_rng(ns.seed).permutation(len(tr))[: ns.train_size]
        tr = Split(tr.images[idx], tr.labels[idx])
    xt, yt = ds.test
    common = dict(batch_size=ns.batch_size, seed=ns.seed, progress=False)
    rows = []

    def record(row):
        write_run(out, row)
        rows.append(row)

    model = CNN(CNNConfig.fashion_mnist(), rngs=nnx.Rngs(ns.seed))
    h = train(model, tr, epochs=ns.float_epochs, learning_rate=ns.lr, **common)
    acc_float = accuracy(model, xt, yt)
    print(f"float: test acc {acc_float:.4f} ({h.seconds:.0f}s)", flush=True)
    size_f = qnn.model_size(qnn.quantize_model(model, [qnn.Rule(".*")]))
    record(dict(run_config(args, "float", 32, 32, "-", len(tr)), test_accuracy=acc_float, train_seconds=h.seconds,
                model_mib=size_f["packed_mib"]))

    for wbits, quantizer in CONFIGS:
        qm = qnn.quantize_model(model, rules_for(wbits, 8, quantizer))
        size = qnn.model_size(qm)
        if quantizer == "ste":
            acc_ptq = accuracy(qm, xt, yt)
            record(dict(run_config(args, "ptq_rtn", wbits, 8, "rtn", len(tr)), test_accuracy=acc_ptq, train_seconds=0.0,
                        model_mib=size["packed_mib"]))
            print(f"W{wbits}A8 PTQ-RTN: {acc_ptq:.4f}", flush=True)
        h = train(qm, tr, epochs=ns.qat_epochs, learning_rate=ns.qat_lr, **common)
        qm.eval()
        acc_qat = accuracy(qm, xt, yt)
        acc_conv = accuracy(qnn.convert(qm), xt, yt)
        record(dict(run_config(args, "qat", wbits, 8, quantizer, len(tr)), test_accuracy=acc_qat, train_seconds=h.seconds,
                    model_mib=size["packed_mib"], converted_accuracy=acc_conv))
        print(f"W{wbits}A8 QAT-{quantizer}: {acc_qat:.4f} (converted {acc_conv:.4f}, {h.seconds:.0f}s)", flush=True)

    wall = time.time() - t0
    env = f"{os.cpu_count()} shared CPU cores, jax {jax.__version__}, {platform.machine()}"
    runs = write_study(out, rows, args, wall, env, cpu_user_s=os.times().user)
    print(runs.to_string())
    print(f"wall {wall:.0f}s")


if __name__ == "__main__":
    main()
