"""The cost of sharding itself: a data-parallel ``qlab.train`` step on 4 forced host devices against one device,
at the same global batch (not a speedup: the 4 "devices" share this machine's cores).

Model: MLP 1024-1024-1024-10, global batch 256, Adam; float, W8A8 (int8 per-channel weights, int8 per-token
activations, integer matmul) and W4 g128 (float activations). Meshes: one device, data=4, and
data=2 x fsdp=2. Per config the step time is ``(t(S + 1 steps) - t(1 step)) / S`` of two ``train`` calls (the same
compile in both), the minimum over rounds interleaved across configs so load changes hit all alike.

    python benchmarks/sharding.py [--steps 40] [--rounds 3]

Prints a table and ends with one summary line: the worst sharded / one-device step-time ratio.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402 -- XLA_FLAGS must be set before jax is imported
import pathlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from qlab.distributed import make_mesh  # noqa: E402
from qlab.models import MLP  # noqa: E402
from qlab.nn import Rule, quantize_model  # noqa: E402
from qlab.train import train  # noqa: E402

SCHEMES = {"float": None, "W8A8": dict(weight="int8/ch", act="int8"), "W4g128": dict(weight="int4/g128")}
MESHES = {"1 device": None, "data=4": dict(data=4), "data=2,fsdp=2": dict(data=2, fsdp=2)}


def model(scheme):
    m = MLP(1024, hidden=(1024, 1024), out=10, rngs=nnx.Rngs(0))
    return m if SCHEMES[scheme] is None else quantize_model(m, [Rule(".*", **SCHEMES[scheme])])


def wall(scheme, mesh, steps, data):
    m = model(scheme)
    t = time.perf_counter()
    train(m, data, steps=steps, batch_size=256, progress=False, mesh=mesh)
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    assert jax.device_count() == 4, jax.devices()
    rng = np.random.default_rng(0)
    data = (rng.normal(size=(4096, 1024)).astype(np.float32), rng.integers(0, 10, 4096).astype(np.int32))
    meshes = {k: None if v is None else make_mesh(**v) for k, v in MESHES.items()}
    best: dict = {}
    for _ in range(args.rounds):
        for scheme in SCHEMES:
            for name, mesh in meshes.items():
                step = (wall(scheme, mesh, args.steps + 1, data) - wall(scheme, mesh, 1, data)) / args.steps
                best[scheme, name] = min(best.get((scheme, name), float("inf")), step)
    print(f"| scheme | {' | '.join(f'{k} ms' for k in MESHES)} | {' | '.join(f'{k} / 1 device' for k in MESHES if k != '1 device')} |")
    print("|---" * (2 * len(MESHES)) + "|")
    ratios = []
    for scheme in SCHEMES:
        base = best[scheme, "1 device"]
        r = [best[scheme, k] / base for k in MESHES if k != "1 device"]
        ratios += r
        print(f"| {scheme} | {' | '.join(f'{1e3 * best[scheme, k]:.1f}' for k in MESHES)} | "
              f"{' | '.join(f'{x:.2f}x' for x in r)} |")
    print(f"summary: sharded / one-device step time at global batch 256 on 4 forced host devices: worst "
          f"{max(ratios):.2f}x, median {float(np.median(ratios)):.2f}x (goal: overhead under 10%, <= 1.10x)")


if __name__ == "__main__":
    main()
