"""GPTQ speed and reconstruction error: qlab.ptq (and qwix.contrib.gptq where installed) vs RTN.

Two Gemma-3-270M-shaped layers, a 2048x640 (down_proj: in 2048, out 640) and a 640x2048 (up_proj) kernel,
with a Hessian from 4096 random correlated input rows. For each implementation: the first call (compile +
run) and the best of ``--repeats`` later calls, and the relative output error ``||X W - X Q||^2 / ||X W||^2``
(the quantity GPTQ minimises) next to RTN's. ``--model`` also times whole-model GPTQ W4 g128 of Gemma 3 270M
(``qlab.ptq.gptq``: 126 layers) on ``--calib-seqs`` x ``--calib-len`` tokens, calibrated block by block
on the quantized predecessors (``sequential=True``, as the paper) and, with ``--one-pass``, in one float pass too.

    python benchmarks/gptq.py [--spec int4/g128] [--repeats 2] [--no-qwix] [--model --calib-seqs 8 [--one-pass]]

qwix (``pip install -e .[bench]``) runs ``qwix.contrib.gptq_core.quantize_weight`` as qwix calls it (eagerly,
a Python loop over the input columns) with ``HowToQuantize(int4, channelwise out, tiles of G along in)``.
Note the scale conventions differ: qwix maps a group's absmax to ``qmax + 0.5`` (7.5 for int4), qlab's default
spec to ``qmax`` (7): qwix's step is 7 % smaller, which alone lowers its error, so the errors compare the
two conventions as much as the two GPTQ implementations.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import qlab
from qlab import ptq


def correlated_inputs(key, rows, n_in):
    k1, k2, k3 = jax.random.split(key, 3)
    A = jax.random.normal(k1, (n_in, n_in)) / np.sqrt(n_in)
    ch = jnp.exp(0.7 * jax.random.normal(k2, (n_in,)))
    return (jax.random.normal(k3, (rows, n_in)) @ A + 0.3 * jax.random.normal(k3, (rows, n_in))) * ch


def rel_err(X, W, Q):
    Y = X @ W
    return float(jnp.sum((Y - X @ Q) ** 2) / jnp.sum(Y**2))


def timed(fn, repeats):
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return out, first, best


def qwix_gptq(W, H, spec):
    """qwix's GPTQ on our (in, out) kernel; returns the dequantized (in, out) weight."""
    from qwix._src.core import qarray
    from qwix.contrib import gptq_core

    g = spec.granularity
    tiles = {1: g.size} if isinstance(g, qlab.PerGroup) else {}
    how = qarray.HowToQuantize(qtype={4: jnp.int4, 8: jnp.int8, 2: jnp.int2}[spec.bits] if spec.bits in (2, 4, 8)
                               else jnp.int4, channelwise_axes=(0,), tiled_axes=tiles)
    q, _ = gptq_core.quantize_weight(W.T, H, how)
    return qarray.dequantize(q).T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", default="int4/g128")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--no-qwix", action="store_true")
    ap.add_argument("--model", action="store_true", help="also time whole-model GPTQ on Gemma 3 270M")
    ap.add_argument("--calib-seqs", type=int, default=8)
    ap.add_argument("--calib-len", type=int, default=256)
    ap.add_argument("--one-pass", action="store_true", help="--model: also time one-float-pass calibration")
    args = ap.parse_args()
    spec = qlab.parse_spec(args.spec).resolve(1, 0)
    try:
        import qwix  # noqa: F401

        have_qwix = not args.no_qwix
    except ImportError:
        have_qwix = False
    rows = []
    for n_in, n_out in ((2048, 640), (640, 2048)):
        k = jax.random.split(jax.random.key(n_in), 2)
        X = correlated_inputs(k[0], args.rows, n_in)
        W = jax.random.normal(k[1], (n_in, n_out)) / np.sqrt(n_in)
        H = X.T @ X
        shape = f"{n_in}x{n_out}"
        q, first, best = timed(lambda: ptq.rtn_weight(W, spec).codes, args.repeats)
        rows.append(("rtn (qlab.quantize)", shape, first, best, rel_err(X, W, qlab.dequantize(ptq.rtn_weight(W, spec)))))
        for name, kw in (("qlab gptq", {}), ("qlab gptq act_order", {"act_order": True})):
            q, first, best = timed(lambda: ptq.gptq_weight(W, H, spec, **kw), args.repeats)
            rows.append((name, shape, first, best, rel_err(X, W, qlab.dequantize(q))))
        if have_qwix:
            try:
                Q, first, best = timed(lambda: qwix_gptq(W, H, spec), 0)
                rows.append(("qwix gptq (eager)", shape, first, float("nan"), rel_err(X, W, Q)))
            except Exception as e:  # report, do not hide
                print(f"qwix failed on {shape}: {type(e).__name__}: {e}")
    print(f"GPTQ {spec} with a {args.rows}-row Hessian; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"{jax.device_count()} device(s)")
    print(f"{'implementation':24s} {'layer':>10s} {'first s':>9s} {'best s':>9s} {'rel out err':>12s}")
    for name, shape, first, best, err in rows:
        print(f"{name:24s} {shape:>10s} {first:9.2f} {best:9.2f} {err:12.5f}")
    if args.model:
        for sequential in (True, False) if args.one_pass else (True,):
            model_timing(args.calib_seqs, args.calib_len, sequential)
    by = {(n, s): (f, b, e) for n, s, f, b, e in rows}
    parts = []
    for shape in ("2048x640", "640x2048"):
        g, r = by[("qlab gptq", shape)], by[("rtn (qlab.quantize)", shape)]
        p = f"{shape}: qlab gptq {g[1]:.2f}s, out err {g[2] / r[2]:.2f}x RTN's"
        if ("qwix gptq (eager)", shape) in by:
            qw = by[("qwix gptq (eager)", shape)]
            p += (f", qwix {qw[0]:.1f}s ({qw[0] / g[1]:.0f}x qlab's best; err {qw[2] / g[2]:.2f}x qlab's, "
                  "with qwix's absmax->qmax+0.5 scales)")
        parts.append(p)
    print("summary: " + "; ".join(parts))


def model_timing(calib_seqs, calib_len=256, sequential=True):
    from qlab.data.text import load_austen
    from qlab.models.gemma3 import load_gemma3
    from qlab.nn import Rule

    model, tok = load_gemma3()
    ids = np.asarray(tok.encode(load_austen("emma")).ids, np.int32)
    n = 4 * calib_len
    calib = [jnp.asarray(ids[i * n:(i + 1) * n].reshape(4, calib_len)) for i in range(max(1, calib_seqs // 4))]
    rules = [Rule("embed"), Rule(r"layers/\d+/(attn|mlp)/\w+_proj", weight="int4/g128")]
    t0 = time.perf_counter()
    qm = ptq.gptq(model, rules, calib, forward=lambda m, b: m.features(b), sequential=sequential)
    total = time.perf_counter() - t0
    per_layer = ptq.ptq_info(qm).seconds.sum()
    mode = "block by block" if sequential else "one float pass"
    print(f"whole-model GPTQ int4/g128 on Gemma 3 270M ({len(calib) * 4} x {calib_len} calibration tokens, {mode}): "
          f"{total:.0f}s total, of which {per_layer:.0f}s in the 126 per-layer GPTQ calls")


if __name__ == "__main__":
    main()
