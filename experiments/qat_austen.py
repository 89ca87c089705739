"""Char-level Transformer on Jane Austen's novels: validation perplexity, float vs W8A8 vs W4 g32.

1. Train a small float Transformer (pre-LN, learned positions) on random windows.
2. PTQ (round-to-nearest, no training) and QAT (fine-tuned from the float weights, STE) for
   W8A8 (int8 per-channel weights incl. embeddings, int8 per-tensor dynamic activations, all
   linear layers; the attention einsums q.k and p.v quantized too via call-site rules) and
   W4 g32 (int4 weights in groups of 32 along the contraction axis, float activations).
Writes the study layout of ``results/qat_austen/`` (see ``results/README.md``): ``runs/<hash>.json`` as each run
finishes, then ``runs.csv``, ``study.json`` and ``README.md``.

    python experiments/qat_austen.py [--float-steps 800] [--qat-steps 200] [--val-chars 40000]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import pandas as pd  # noqa: E402
from flax import nnx  # noqa: E402

from qlab import nn as qnn  # noqa: E402
from qlab.data import char_splits, load_austen  # noqa: E402
from qlab.evaluate import nll  # noqa: E402
from qlab.experiments import config_hash  # noqa: E402
from qlab.experiments.results import atomic_write_text, markdown_table, rebuild_tables, write_run  # noqa: E402
from qlab.models import Transformer, TransformerConfig  # noqa: E402
from qlab.train import train  # noqa: E402

STUDY = "qat_austen"
SCRIPT = "experiments/qat_austen.py"
OUT = ROOT / "results" / STUDY

SCHEMES = {
    "W8A8": [qnn.Rule(".*", weight="int8/ch", act="int8")],
    "W4g32": [qnn.Rule(".*/einsum_.*"), qnn.Rule(".*", weight="int4/g32")],
}
#: Command-line defaults (what `command` leaves out).
DEFAULTS = dict(float_steps=800, qat_steps=200, batch_size=32, seq_len=128, d_model=128, layers=2, val_chars=40000,
                lr=2e-3, qat_lr=3e-4, seed=0)
#: Each scheme's rules as plain text for the result table (einsum call sites are the attention products).
SCHEME_COLUMNS = {
    "float": dict(weight=None, act=None, rules=None),
    "W8A8": dict(weight="int8/ch", act="int8", rules=".*: int8/ch weights, int8 acts (incl. embeddings, einsums)"),
    "W4g32": dict(weight="int4/g32", act=None, rules=".*/einsum_.*: float; .*: int4/g32 weights"),
}


def command(args: dict) -> str:
    """The command line that reproduces a run of this script with ``args`` (the three main flags always, the others
    where they differ from :data:`DEFAULTS`).

    >>> command({"float_steps": 600, "qat_steps": 150, "val_chars": 40000, "d_model": 32, "seed": 0})
    'python experiments/qat_austen.py --float-steps 600 --qat-steps 150 --val-chars 40000 --d-model 32'
    """
    main_flags = ("float_steps", "qat_steps", "val_chars")
    extra = [k for k in args if k not in main_flags and k in DEFAULTS and args[k] != DEFAULTS[k]]
    return " ".join([f"python {SCRIPT}"] + [f"--{k.replace('_', '-')} {args[k]}" for k in [*main_flags, *extra]])


def run_config(args: dict, method: str, scheme: str) -> dict:
    """The config columns of one run, spelled out, with its ``config_hash`` (over the columns and the
    script's arguments, since every run starts from the same float model).

    >>> args = dict(float_steps=10, qat_steps=5, batch_size=4, seq_len=16, d_model=16, layers=1, val_chars=100,
    ...             lr=2e-3, qat_lr=3e-4, seed=0)
    >>> row = run_config(args, "float+ft", "float")
    >>> row["train_steps"], row["learning_rate"], row["weight"]
    (15, 0.0003, None)
    """
    steps = {"float": args["float_steps"], "qat": args["qat_steps"],
             "float+ft": args["float_steps"] + args["qat_steps"]}.get(method, 0)
    row = dict(study=STUDY, method=method, scheme=scheme, model="transformer", data="austen", **SCHEME_COLUMNS[scheme],
               layers=args["layers"], d_model=args["d_model"], seq_len=args["seq_len"], batch_size=args["batch_size"],
               train_steps=steps, learning_rate={"float": args["lr"]}.get(method, args["qat_lr"] if steps else None),
               val_chars=args["val_chars"], seed=args["seed"])
    row["config_hash"] = config_hash({**row, "script_args": args})
    return row


def readme(runs: pd.DataFrame, study: dict) -> str:
    """The study's README.md: what ran, how long, the table and what it shows."""
    args = study["args"]

    def pick(method, scheme, column="val_ppl"):
        sel = runs[(runs.method == method) & (runs.scheme == scheme)]
        return float(sel[column].iloc[0]) if len(sel) else float("nan")

    cols = ["method", "scheme", "weight", "act", "val_ppl", "model_mib", "train_steps", "train_seconds"]
    cpu = f", {study['cpu_user_s'] / 60:.1f} min user CPU" if study.get("cpu_user_s") else ""
    base = pick("float+ft", "float")
    return f"""# QAT on Jane Austen (char-level Transformer)

What ran: `{study['command']}` ({study['wall_s'] / 60:.1f} min wall{cpu}, {study['environment']}).
Model: {args['layers']} layers, d_model {args['d_model']}, 4 heads, d_ff {4 * args['d_model']}, context {args['seq_len']},
{study['vocab_size']} characters, {study['params']:,} params. Float: {args['float_steps']} Adam steps (lr {args['lr']}),
batch {args['batch_size']}x{args['seq_len']} random windows of the six novels' training split. QAT: {args['qat_steps']} more steps
(lr {args['qat_lr']}) from the float weights, STE; `float+ft` is the float model trained for the same extra steps.
Validation: perplexity on the first {args['val_chars']:,} characters of the validation split (non-overlapping windows).
W8A8 = rule `.*` int8/ch weights + int8 activations (all Linear layers, the token and position Embed tables, the
attention einsums q.k and p.v); W4g32 = int4 weights in groups of 32, float activations, einsums left float.
`model_mib` counts every parameter (LayerNorms, biases at 32 bits; quantized weights packed with their f16 scales).
One seed ({args['seed']}). Every run is a row of `runs.csv`.

{markdown_table(runs[[c for c in cols if c in runs]])}

What it shows:
- The fair baseline for QAT is `float+ft` ({base:.3f}): W8A8 QAT matches it ({pick('qat', 'W8A8'):.3f}) at
  {pick('qat', 'W8A8', 'model_mib') / pick('float+ft', 'float', 'model_mib'):.2f}x the float bytes; W4 g32 QAT costs
  {pick('qat', 'W4g32') - base:+.3f} perplexity at {pick('qat', 'W4g32', 'model_mib') / pick('float+ft', 'float', 'model_mib'):.2f}x.
- Post-training RTN: W8A8 {pick('ptq_rtn', 'W8A8'):.3f} against float {pick('float', 'float'):.3f}; W4 g32
  {pick('ptq_rtn', 'W4g32'):.3f}, which QAT brings to {pick('qat', 'W4g32'):.3f}.
- Small budget: absolute perplexities are far from converged; the comparison between rows is the point.
"""


def write_study(out, rows: list[dict], args: dict, wall_s: float, environment: str, vocab_size: int, params: int,
                cpu_user_s: float | None = None):
    """Write the study layout for ``rows`` (each already stored by ``write_run``): ``runs.csv`` in run order,
    ``study.json`` (script, arguments, timing, runs) and ``README.md``."""
    out = pathlib.Path(out)
    runs, _ = rebuild_tables(out, [r["config_hash"] for r in rows])
    config_keys = list(run_config(args, "float", "float"))
    study = dict(name=STUDY, description="Char-level Transformer on Austen: QAT vs RTN at W8A8 and W4 g32",
                 source=SCRIPT, command=command(args), args=args, wall_s=wall_s, cpu_user_s=cpu_user_s,
                 environment=environment, vocab_size=vocab_size, params=params,
                 runs=[{k: r.get(k) for k in config_keys} for r in rows])
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

    corpus = char_splits(load_austen())
    val = corpus.val[: ns.val_chars]
    cfg = TransformerConfig(vocab_size=corpus.vocab_size, d_model=ns.d_model, n_layers=ns.layers, n_heads=4,
                            d_ff=4 * ns.d_model, max_len=ns.seq_len)
    common = dict(loss="lm", seq_len=ns.seq_len, batch_size=ns.batch_size, seed=ns.seed, progress=False)
    rows = []

    def record(row):
        write_run(out, row)
        rows.append(row)

    def ppl(m):
        m.eval()
        return math.exp(nll(m, val, seq_len=ns.seq_len, batch_size=32))

    model = Transformer(cfg, rngs=nnx.Rngs(ns.seed))
    h = train(model, corpus.train, steps=ns.float_steps, learning_rate=ns.lr, **common)
    p_float = ppl(model)
    print(f"float: val ppl {p_float:.3f} ({h.seconds:.0f}s)", flush=True)
    size_f = qnn.model_size(qnn.quantize_model(model, [qnn.Rule(".*")]))
    record(dict(run_config(args, "float", "float"), val_ppl=p_float, train_seconds=h.seconds,
                model_mib=size_f["packed_mib"]))
    for scheme, rules in SCHEMES.items():
        qm = qnn.quantize_model(model, rules)
        size = qnn.model_size(qm)
        p_ptq = ppl(qm)
        record(dict(run_config(args, "ptq_rtn", scheme), val_ppl=p_ptq, train_seconds=0.0, model_mib=size["packed_mib"]))
        print(f"{scheme} PTQ-RTN: {p_ptq:.3f}", flush=True)
        qm.train()
        h = train(qm, corpus.train, steps=ns.qat_steps, learning_rate=ns.qat_lr, **common)
        p_qat = ppl(qm)
        record(dict(run_config(args, "qat", scheme), val_ppl=p_qat, train_seconds=h.seconds,
                    model_mib=size["packed_mib"]))
        print(f"{scheme} QAT: {p_qat:.3f} ({h.seconds:.0f}s)", flush=True)
    # the float model fine-tuned for the same extra steps, for a fair comparison with QAT
    h = train(model, corpus.train, steps=ns.qat_steps, learning_rate=ns.qat_lr, **common)
    record(dict(run_config(args, "float+ft", "float"), val_ppl=ppl(model), train_seconds=h.seconds,
                model_mib=size_f["packed_mib"]))
    wall = time.time() - t0
    env = f"{os.cpu_count()} shared CPU cores, jax {jax.__version__}, {platform.machine()}"
    runs = write_study(out, rows, args, wall, env, corpus.vocab_size, size_f["params"], cpu_user_s=os.times().user)
    print(runs.to_string())
    print(f"wall {wall:.0f}s")


if __name__ == "__main__":
    main()
