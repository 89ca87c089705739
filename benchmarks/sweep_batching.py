"""Batched variants vs sequential runs: 8 trainings that differ only in seed and learning rate.

sequential: 8 x ``qlab.train.train`` (one jitted step, dispatched once per step per variant; the step
            compiles once and is reused by the later runs).
batched:    ``qlab.experiments.methods.train_variants``: one compiled program, ``jax.vmap`` over the 8
            variants of a ``lax.scan`` over the steps (what ``qlab sweep --batch`` uses).
Each mode runs in a fresh process and is timed from just before training to just after, compile
included. Prints a table and one summary line.

    .venv/bin/python benchmarks/sweep_batching.py [--variants 8] [--steps 1000] [--hidden 64]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _worker(mode: str, variants: int, steps: int, hidden: list[int]) -> dict:
    import jax
    import numpy as np
    from flax import nnx

    from qlab import evaluate
    from qlab.data import digits_dataset
    from qlab.experiments.methods import train_variants
    from qlab.models import MLP
    from qlab.train import train

    ds = digits_dataset(seed=0)
    jax.block_until_ready(jax.numpy.ones(1) + 1)  # backend initialised outside the timing
    seeds = list(range(variants))
    lrs = [1e-3 * (1.5 ** (i % 4)) for i in seeds]
    models = [MLP(64, hidden=tuple(hidden), out=10, rngs=nnx.Rngs(s)) for s in seeds]
    t0 = time.perf_counter()
    if mode == "sequential":
        for m, s, lr in zip(models, seeds, lrs):
            train(m, ds, steps=steps, batch_size=64, learning_rate=lr, seed=s, progress=False)
    else:
        train_variants(models, ds, steps=steps, batch_size=64, learning_rates=lrs, seeds=seeds)
    jax.block_until_ready(nnx.state(models[-1]))
    wall = time.perf_counter() - t0
    acc = [evaluate.accuracy(m, *ds.test) for m in models]
    return {"mode": mode, "variants": variants, "steps": steps, "devices": jax.device_count(), "wall_s": wall,
            "variant_steps_per_s": variants * steps / wall, "mean_accuracy": float(np.mean(acc))}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", type=int, default=8)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--hidden", type=int, nargs="+", default=[64])
    ap.add_argument("--worker", choices=["sequential", "batched"], help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a.worker, a.variants, a.steps, a.hidden)))
        return 0
    rows = []
    for mode in ("sequential", "batched"):
        cmd = [sys.executable, __file__, "--worker", mode, "--variants", str(a.variants), "--steps", str(a.steps),
               "--hidden", *map(str, a.hidden)]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ.copy())
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"MLP 64-{'-'.join(map(str, a.hidden))}-10 on digits, batch 64, {a.steps} steps, {a.variants} variants "
          f"(seed x learning rate), compile included")
    print(f"{'mode':<11} {'devices':>7} {'wall s':>8} {'variant-steps/s':>16} {'mean acc':>9}")
    for r in rows:
        print(f"{r['mode']:<11} {r['devices']:>7} {r['wall_s']:>8.2f} {r['variant_steps_per_s']:>16.0f} {r['mean_accuracy']:>9.4f}")
    ratio = rows[0]["wall_s"] / rows[1]["wall_s"]
    print(f"summary: batched/sequential throughput = {ratio:.2f}x ({a.variants} variants, {a.steps} steps, compile included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
