"""Fake-quant speed: qlab's CPU kernel and the XLA path side by side, relative to ``x * 1.0001``.

For each array size, spec and mode it prints one row: min and median time of the reference
``x * 1.0001``, then the min-time ratio to it of the XLA path (``fake_quant_xla``), of the CPU kernel
called directly (``qlab.numerics.native``, even where dispatch would not pick it), and of
``qlab.fake_quant`` as dispatched, with the path dispatch took. The last line summarises the ratios.
Modes: ``fresh`` writes a new buffer (the input stays live); ``inplace`` donates the input so XLA
may reuse it. The cases run interleaved (each repeat times every case once, in turn), so load
changes on the shared machine hit all of them alike: compare ratios from one run. Where ``qwix``
is installed (``pip install -e .[bench]``) its fake quantization runs in the same table.

    python benchmarks/fake_quant.py [--sizes 512,4096] [--repeats 20]

What decides dispatch (``native.FAKE_QUANT_MAX_ELEMENTS``): the kernel writes in place of its input,
free when the input is donated or dead; for a live input XLA copies it first. Up to 2^18 elements
that copy is cache-resident and the kernel wins in both modes. For larger arrays, in place loses
the fresh case to that copy, and a fresh output loses the donated case (a new 64 MB buffer is
page-faulted on every call), so dispatch picks the XLA path there. XLA:CPU does a reduction pass
and an elementwise pass; the kernel does both passes of a group while it is in cache (per-channel
groups span the whole array, so it reads ``x`` twice; ``benchmarks/read_floor.cc`` measures the
floor of a read-only pass).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import qlab
from qlab.numerics import native
from qlab.numerics.quantize import fake_quant_xla


def _time_interleaved(fns, make_input, repeats, donate):
    """{name: (min, median)} seconds; each repeat runs every case once, in turn, so that load
    changes on a shared machine hit all cases alike and the ratios stay comparable."""
    x = None if donate else make_input()  # donated: a fresh input per call
    for fn in fns.values():
        jax.block_until_ready(fn(make_input() if donate else x))  # compile
    ts = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            x = make_input() if donate else x
            jax.block_until_ready(x)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(x))
            ts[name].append(time.perf_counter() - t0)
    return {name: (min(v), statistics.median(v)) for name, v in ts.items()}


def _qwix_fns():
    try:
        from qwix._src.core import qarray  # noqa: F401
    except Exception:
        return {}
    fns = {}
    try:
        from qwix._src.core import qarray

        def make(qtype, tiled):
            def f(x):
                how = qarray.HowToQuantize(
                    qtype=qtype,
                    channelwise_axes=[1],
                    tiled_axes={0: 128} if tiled else {},
                    calibration_method="absmax",
                )
                q = qarray.quantize(x, how)
                return qarray.dequantize(q)

            return f

        fns["qwix int8/ch"] = make(jnp.int8, False)
        fns["qwix int8/g128"] = make(jnp.int8, True)
        fns["qwix int4/ch"] = make(jnp.int4, False)
        fns["qwix int4/g128"] = make(jnp.int4, True)
    except Exception as e:  # API drift: say so rather than hide it
        print(f"# qwix present but its fake-quant could not be set up: {e}")
        return {}
    return fns


SPECS = ("int8/ch", "int8/g128", "int4/ch", "int4/g128")


def _kernel_fn(spec, shape):
    view = native.kernel_view(spec, shape, jnp.float32)
    return None if view is None or not native.enabled() else (lambda x: native.fake_quant_cpu(x, spec, view))


def _rows_for_size(n, repeats):
    """[(spec, mode, ref (min, med) s, {path: min ratio}, dispatched path)] for float32[n, n]."""
    key = jax.random.key(0)

    def make_input():
        return jax.random.normal(key, (n, n), jnp.float32)

    cases = {"ref": lambda x: x * 1.0001}
    dispatched = {}
    for s in SPECS:
        # weights are (in, out): per-channel = per output column, groups along the input axis
        spec = qlab.parse_spec(s).resolve(channel_axis=1, contract_axis=0)
        cases[("xla", s)] = (lambda sp: (lambda x: fake_quant_xla(x, sp)))(spec)
        cases[("qlab", s)] = (lambda sp: (lambda x: qlab.fake_quant(x, sp)))(spec)
        kernel = _kernel_fn(spec, (n, n))
        if kernel is not None:
            cases[("kernel", s)] = kernel
        hlo = jax.jit(cases[("qlab", s)]).lower(jax.ShapeDtypeStruct((n, n), jnp.float32)).as_text()
        dispatched[s] = "kernel" if "qlab_fake_quant_int" in hlo else "xla"
    for name, f in _qwix_fns().items():
        cases[("qwix", name)] = f
        dispatched[name] = "(qwix, in the qlab column)"
    rows = []
    for mode in ("fresh", "inplace"):
        donate = mode == "inplace"
        fns = {name: jax.jit(f, donate_argnums=(0,) if donate else ()) for name, f in cases.items()}
        t = _time_interleaved(fns, make_input, repeats, donate)
        ref = t.pop("ref")
        by_spec = {}
        for (path, s), (tmin, _) in t.items():
            by_spec.setdefault(s, {})[path] = tmin / ref[0]
        for s, ratios in by_spec.items():
            rows.append((s, mode, ref, ratios, dispatched.get(s, "-")))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="512,4096", help="comma-separated n: arrays float32[n, n]")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    print(f"# qlab CPU kernel: {native.status()}; fake_quant dispatches it up to "
          f"{native.FAKE_QUANT_MAX_ELEMENTS} elements")
    print("# xla / kernel / qlab: min time as a multiple of the reference x*1.0001's (ref) in the same run; "
          "qlab = qlab.fake_quant, which runs the path named last")
    print(f"{'array':12s} {'spec':16s} {'mode':8s} {'ref min ms':>10s} {'ref med ms':>10s} "
          f"{'xla':>6s} {'kernel':>7s} {'qlab':>6s}  dispatched")
    worst = {}  # (path fake_quant dispatches, mode) -> worst kernel / XLA-path min-time ratio
    for n in (int(v) for v in args.sizes.split(",")):
        for s, mode, (rmin, rmed), ratios, path in _rows_for_size(n, args.repeats):
            cells = " ".join(f"{ratios[p]:{w}.2f}" if p in ratios else f"{'-':>{w}s}"
                             for p, w in (("xla", 6), ("kernel", 7), ("qlab", 6)))
            if "qwix" in ratios:
                cells = f"{'-':>6s} {'-':>7s} {ratios['qwix']:6.2f}"
            print(f"{f'{n}x{n}':12s} {s:16s} {mode:8s} {rmin * 1e3:10.3f} {rmed * 1e3:10.3f} {cells}  {path}")
            if "kernel" in ratios and "xla" in ratios:
                key = (path, mode)
                worst[key] = max(worst.get(key, 0.0), ratios["kernel"] / ratios["xla"])

    def fmt(path):
        got = [f"{m} {worst[(path, m)]:.2f}x" for m in ("fresh", "inplace") if (path, m) in worst]
        return ", ".join(got) or "no such case"

    print(f"summary: kernel / XLA path, worst min-time ratio over sizes {args.sizes}, specs {', '.join(SPECS)}: "
          f"where fake_quant dispatches the kernel (<= {native.FAKE_QUANT_MAX_ELEMENTS} elements) {fmt('kernel')}; "
          f"where it runs the XLA path {fmt('xla')}")


if __name__ == "__main__":
    main()
