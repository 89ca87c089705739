"""Measured sensitivity: every layer x candidate in one compiled program against one-at-a-time (goal: >= 3x).

``qlab.analysis.measured_sensitivity`` swaps each (layer, candidate)'s effective weight into the float model's
state and runs ONE jitted loss over (state leaves, batch): it compiles once per batch shape. One-at-a-time is what a
user writes without it: ``quantize_model`` with one rule for that layer, then a fresh jitted loss of that model
(one model structure, so one compile, per pair). Both are timed end to end (effective weights, compiles, evaluations)
on the Fashion-MNIST CNN of the image family (trained ``--steps`` steps, or its initial weights with 0) with
``--images`` validation images as held-out data, and the two score tables are checked to agree. The one program
saves the compiles; the evaluations themselves cost the same, so the ratio is large where compiling dominates
(little held-out data, a slow-compiling model) and near 1 where the forward passes do.

    python benchmarks/sensitivity.py [--steps 0] [--images 5000] [--candidates int2/ch,...,int8/ch]

Gemma 3 270M (every projection x 6 candidates, 4k calibration tokens): ``--gemma`` (needs the model package; hours
on 2 shared CPU cores, since each of the 756 evaluations is a forward pass over 4k tokens).
"""

from __future__ import annotations

import argparse
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from qlab import analysis
from qlab import nn as qnn
from qlab.experiments import expand, image
from qlab.train import lm_loss, xent_loss


def one_at_a_time(model, table, loss_fn, batches) -> pd.DataFrame:
    """The baseline: per (layer, candidate), quantize_model with one rule and a fresh jitted loss."""

    def mean_loss(m):
        graphdef, state = nnx.split(m)
        f = jax.jit(lambda s, b: loss_fn(nnx.merge(graphdef, s), b))
        return float(np.mean([float(f(state, b)) for b in batches]))

    base = mean_loss(model)
    scores = []
    for r in table.itertuples():
        if not r.usable or r.candidate == analysis.KEEP:
            scores.append(0.0 if r.usable else np.nan)
            continue
        q = qnn.quantize_model(model, [qnn.Rule(re.escape(r.layer), weight=r.candidate)], allow_unmatched=True)
        scores.append(mean_loss(q) - base)
    return table.assign(score=scores)


def _image_case(steps: int, images: int):
    run = expand({"base": {"model": "cnn", "data": "fashion_mnist", "steps": max(steps, 1), "batch_size": 64}})[0]
    ds = image.dataset(run)
    model = image.float_model(run)[0] if steps > 0 else image.build_model(run, 0)
    x, y = ds.val.images[:images], ds.val.labels[:images]
    return model, xent_loss, [(jnp.asarray(x[i:i + 500]), jnp.asarray(y[i:i + 500])) for i in range(0, len(x), 500)], \
        x[:1], f"Fashion-MNIST CNN, {len(x)} validation images"


def _gemma_case(tokens: int):
    from qlab.experiments import lm  # deferred: loads Gemma only when asked for

    run = expand({"base": {"model": "gemma3", "data": "austen", "method": "ptq_gptq", "calibration_seqs": tokens // 256,
                           "calibration_len": 256}})[0]
    model = lm.lm_model("gemma3")[0]
    calib = lm._calibration("gemma3", run["calibration"], int(run["calibration_seqs"]), 256)
    return model, lm_loss, [jnp.asarray(calib[i:i + 4]) for i in range(0, len(calib), 4)], None, \
        f"Gemma 3 270M, {tokens} calibration tokens"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=0, help="float training steps of the CNN (0: initial weights)")
    ap.add_argument("--candidates", default="int2/ch,int3/ch,int4/ch,int5/ch,int6/ch,int8/ch")
    ap.add_argument("--images", type=int, default=5000, help="held-out images (CNN)")
    ap.add_argument("--gemma", action="store_true", help="Gemma 3 270M, measured only (no one-at-a-time baseline)")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args(argv)
    cands = args.candidates.split(",")
    model, loss_fn, batches, example, what = _gemma_case(args.tokens) if args.gemma else _image_case(args.steps, args.images)
    table = analysis.candidate_table(model, cands, example)
    n = int((table["usable"] & (table["candidate"] != analysis.KEEP)).sum())
    t0 = time.perf_counter()
    batched = analysis.measured_sensitivity(model, table, loss_fn, batches)
    t_batched = time.perf_counter() - t0
    rows = [dict(way="measured_sensitivity (one program)", pairs=n, seconds=t_batched)]
    if not args.gemma:
        t0 = time.perf_counter()
        single = one_at_a_time(model, table, loss_fn, batches)
        t_single = time.perf_counter() - t0
        rows.append(dict(way="one at a time (quantize_model + jit per pair)", pairs=n, seconds=t_single))
        err = float(np.nanmax(np.abs(batched["score"].to_numpy() - single["score"].to_numpy())))
    df = pd.DataFrame(rows)
    df["s_per_pair"] = df["seconds"] / df["pairs"]
    print(f"{what}: {table['layer'].nunique()} layers x {len(cands)} candidates ({n} evaluations), "
          f"{len(batches)} batches; backend {jax.default_backend()}")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if args.gemma:
        print(f"summary: Gemma 3 270M measured sensitivity {t_batched / 60:.1f} min (goal < 15 min)")
    else:
        print(f"summary: one program {t_batched:.1f} s vs one at a time {t_single:.1f} s: "
              f"{t_single / t_batched:.1f}x (goal >= 3x); scores agree to {err:.2g}")


if __name__ == "__main__":
    main()
