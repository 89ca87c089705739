"""Allocation time: 1,000 layers x 10 candidates (goal: under a second for "dp").

Random but realistic tables: each layer has a weight of 256..4096 x 256..4096 params, the candidates
int2..int8/ch, int4/g128, nf4/g64, mxfp4 and keep at their packed bytes, and a damage that falls
with bits. Prints a table (method, budget, seconds, bytes, damage, exact) and a last summary line.

    python benchmarks/allocation.py [--layers 1000] [--repeat 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from qlab.analysis import allocate
from qlab.numerics import packed_nbytes

CANDIDATES = ["int2/ch1", "int3/ch1", "int4/ch1", "int5/ch1", "int6/ch1", "int8/ch1", "int4/g128a0",
              "nf4/g64a0", "mxfp4", "keep"]


def random_table(layers: int, seed: int = 0) -> pd.DataFrame:
    """A sensitivity-shaped table (layer, candidate, params, bytes, usable, score) without a model."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(layers):
        shape = (int(rng.choice([256, 512, 1024, 2048, 4096])), int(rng.choice([256, 512, 1024, 2048, 4096])))
        n = shape[0] * shape[1]
        sens = rng.lognormal(0, 1.5)
        for c in CANDIDATES:
            nbytes = 4 * n if c == "keep" else packed_nbytes(c, shape)
            score = 0.0 if c == "keep" else sens * n * 2.0 ** (-2 * 8 * nbytes / n) * rng.uniform(0.8, 1.2)
            rows.append(dict(layer=f"blocks/{i}/w", candidate=c, params=n, bytes=nbytes, usable=True, score=score))
    return pd.DataFrame(rows)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    table = random_table(args.layers)
    out = []
    for bpw in (3.0, 4.25, 6.0):
        for method in ("dp", "greedy", "milp"):
            times = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                a = allocate(table, budget_bpw=bpw, method=method)
                times.append(time.perf_counter() - t0)
            out.append(dict(method=method, budget_bpw=bpw, seconds=min(times), bytes=a.total_bytes,
                            budget_bytes=a.budget_bytes, damage=a.damage, exact=a.exact))
    df = pd.DataFrame(out)
    print(f"{args.layers} layers x {len(CANDIDATES)} candidates")
    print(df.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    dp, gr, mi = (df[df.method == m].reset_index(drop=True) for m in ("dp", "greedy", "milp"))
    print(f"summary: dp max {dp.seconds.max():.3f} s (goal < 1 s), greedy max {gr.seconds.max():.3f} s, "
          f"milp max {mi.seconds.max():.3f} s; damage excess over milp (optimal): dp "
          f"{float((dp.damage / mi.damage).max() - 1):.2e}, greedy {float((gr.damage / mi.damage).max() - 1):.2e}; "
          f"budget never exceeded: "
          f"{bool((df.bytes <= df.budget_bytes).all())}")


if __name__ == "__main__":
    main()
