"""Batched variants vs sequential runs: 8 trainings that differ only in traceable values.

``--vary seed-lr`` (default): float training, variants differ in seed and learning rate.
``--vary bits``: QAT (STE, ``int<b>/ch`` weights on every layer), variants differ in the integer bit
            width (2, 3, 4, 8, cycled) and the seed (and learning rate); in the batched mode the bit
            width is traced state (``qlab.nn.nnx_quant.traced_variant``).

sequential: 8 x ``qlab.train.train`` (one jitted step, dispatched once per step per variant; the step
            compiles once per distinct spec and is reused by the later runs).
batched:    ``qlab.train.train_variants``: one compiled program, ``jax.vmap`` over the 8
            variants of a ``lax.scan`` over the steps (what ``qlab sweep --batch`` uses).
Each mode runs in a fresh process and is timed from just before training to just after, compile
included. Prints a table and one summary line.

    .venv/bin/python benchmarks/sweep_batching.py [--vary seed-lr|bits] [--variants 8] [--steps 1000] [--hidden 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


WIDTHS = (2, 3, 4, 8)


def _worker(mode: str, variants: int, steps: int, hidden: list[int], vary: str = "seed-lr") -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from qlab import evaluate
    from qlab.data import digits_dataset
    from qlab.train import train_variants
    from qlab.models import MLP
    from qlab.train import train

    ds = digits_dataset(seed=0)
    jax.block_until_ready(jax.numpy.ones(1) + 1)  # backend initialised outside the timing
    seeds = list(range(variants))
    lrs = [1e-3 * (1.5 ** (i % 4)) for i in seeds]
    models = [MLP(64, hidden=tuple(hidden), out=10, rngs=nnx.Rngs(s)) for s in seeds]
    if vary == "bits":
        from qlab.nn import Rule, quantize_model

        seeds = [i // len(WIDTHS) for i in range(variants)]
        lrs = [1e-3 * (1 + s) for s in seeds]
        models = [MLP(64, hidden=tuple(hidden), out=10, rngs=nnx.Rngs(s)) for s in seeds]
        models = [quantize_model(m, [Rule(".*", weight=f"int{WIDTHS[i % len(WIDTHS)]}/ch")]) for i, m in enumerate(models)]
    t0 = time.perf_counter()
    if mode == "sequential":
        for m, s, lr in zip(models, seeds, lrs):
            train(m, ds, steps=steps, batch_size=64, learning_rate=lr, seed=s, progress=False)
    elif vary == "bits":
        from qlab.nn import traced_variant
        from qlab.nn.quantizers import QuantOverride

        views = [traced_variant(m, models[0]) for m in models]
        train_variants(views, ds, steps=steps, batch_size=64, learning_rates=lrs, seeds=seeds)
        for m, v in zip(models, views):
            nnx.update(m, nnx.state(v, nnx.Not(QuantOverride)))
    else:
        train_variants(models, ds, steps=steps, batch_size=64, learning_rates=lrs, seeds=seeds)
    jax.block_until_ready(nnx.state(models[-1]))
    wall = time.perf_counter() - t0
    acc = [evaluate.accuracy(m, *ds.test) for m in models]
    return {"mode": mode, "vary": vary, "variants": variants, "steps": steps, "devices": jax.device_count(), "wall_s": wall,
            "variant_steps_per_s": variants * steps / wall, "mean_accuracy": float(np.mean(acc))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--hidden", type=int, nargs="+", default=[64])
    ap.add_argument("--vary", choices=["seed-lr", "bits"], default="seed-lr",
                    help="what the variants differ in: seed x learning rate (float training) or integer bit width "
                         "x seed x learning rate (QAT)")
    ap.add_argument("--worker", choices=["sequential", "batched"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a.worker, a.variants, a.steps, a.hidden, a.vary)))
        return 0
    rows = []
    for mode in ("sequential", "batched"):
        cmd = [sys.executable, __file__, "--worker", mode, "--variants", str(a.variants), "--steps", str(a.steps),
               "--hidden", *map(str, a.hidden), "--vary", a.vary]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    what = ("QAT int<b>/ch STE, bits 2/3/4/8 x seed x learning rate" if a.vary == "bits"
            else "float, seed x learning rate")
    print(f"MLP 64-{'-'.join(map(str, a.hidden))}-10 on digits, batch 64, {a.steps} steps, {a.variants} variants "
          f"({what}), compile included")
    print(f"{'mode':<11} {'devices':>7} {'wall s':>8} {'variant-steps/s':>16} {'mean acc':>9}")
    for r in rows:
        print(f"{r['mode']:<11} {r['devices']:>7} {r['wall_s']:>8.2f} {r['variant_steps_per_s']:>16.0f} {r['mean_accuracy']:>9.4f}")
    ratio = rows[0]["wall_s"] / rows[1]["wall_s"]
    print(f"summary: batched/sequential throughput = {ratio:.2f}x ({a.variants} variants differing in "
          f"{'bits x seed x lr (QAT)' if a.vary == 'bits' else 'seed x lr'}, {a.steps} steps, compile included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
