"""qlab's CPU kernel for fake quantization, built on first use and called through XLA's FFI.

XLA:CPU runs ``fake_quant`` as a reduction pass and an elementwise pass that each run below memory
bandwidth (``benchmarks/fake_quant.py``). ``kernels/fake_quant_cpu.cc`` does both passes per group
while the group is in cache. It covers the most common spec family: a static integer format,
symmetric, absmax range, round to nearest, f32/f16/bf16 scale, per tensor, per channel on the first
or last axis, or per group (padded or not) on any axis; any float input (computed in float32). Its values are bit-identical
to the XLA path (``tests/test_native.py``).

It is an optional backend registered for the CPU platform only: ``qlab.quantize`` / ``fake_quant``
trace one primitive (:func:`dispatch`) whose lowering is the XLA path on every platform, and on CPU
the kernel. Nothing is compiled while tracing, nor when lowering for GPU or TPU (``jax.export`` for
``"cuda"`` works on a CPU-only host and holds no custom call).

The shared library is compiled, the first time a covered call is lowered for CPU, with the system
C++ compiler (``$CXX``, else ``c++``) against jaxlib's FFI headers into ``$QLAB_CACHE`` (default
``~/.cache/qlab``)/kernels, once per source, jaxlib version and CPU; ``make install`` builds it. If it
cannot be built, a warning says why and the CPU lowering is the XLA path (same values, slower).
``QLAB_NATIVE=0`` turns the kernel off.

Example:
    >>> import qlab.numerics.native as native
    >>> native.status()["enabled"] in (True, False)
    True
"""

from __future__ import annotations

import ctypes
import fcntl
import functools
import hashlib
import math
import os
import pathlib
import platform
import shlex
import subprocess
import tempfile
import warnings

import jax
import jaxlib
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax.interpreters import ad, batching, mlir

from qlab.numerics.granularity import PerChannel, PerGroup, PerTensor
from qlab.numerics.ranges import reciprocal  # the XLA path's 1/divisor rule
from qlab.numerics.spec import QuantSpec, plain_absmax_int

__all__ = ["status", "build", "enabled", "kernel_view", "fake_quant_view", "FAKE_QUANT_MAX_ELEMENTS", "dispatch", "fake_quant_cpu", "quantize_cpu"]

_SOURCE = pathlib.Path(__file__).with_name("kernels") / "fake_quant_cpu.cc"
_TARGET = "qlab_fake_quant_int"
_QTARGET = "qlab_quantize_int"
_SCALE_KINDS = {"f32": 0, "f16": 1, "bf16": 2}
# fake_quant dispatches the kernel for arrays of at most this many elements (1 MiB of float32).
# The kernel writes in place of its input: free when x is donated or dead, and for a live x XLA
# first copies it, a cache-resident memcpy at this size. For larger arrays no variant of the call
# beat the XLA path both into a fresh buffer and in place of a donated input (in place: the XLA copy
# of a live input loses the fresh case; a fresh output loses the donated one), so they take the XLA
# path (benchmarks/fake_quant.py shows both paths side by side). quantize's kernel wins at every size.
FAKE_QUANT_MAX_ELEMENTS = 1 << 18
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-std=c++17", "-shared", "-fPIC", "-w"]


def _cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("QLAB_CACHE", pathlib.Path.home() / ".cache" / "qlab")) / "kernels"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _library_path(cxx: str) -> pathlib.Path:
    key = hashlib.sha256()
    for part in (_SOURCE.read_bytes(), jaxlib.__version__.encode(), cxx.encode(), " ".join(_FLAGS).encode(),
                 platform.machine().encode(), _cpu_id().encode()):
        key.update(part)
    return _cache_dir() / f"fake_quant_cpu-{key.hexdigest()[:16]}.so"


def build() -> pathlib.Path:
    """Compile the kernel library if it is not cached yet and return its path; raises with the
    compiler's message if it cannot. Safe to call from several processes at once.

    Example:
        >>> build().suffix
        '.so'
    """
    cxx = os.environ.get("CXX", "c++")
    out = _library_path(cxx)
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if out.exists():
            return out
        tmp = tempfile.NamedTemporaryFile(dir=out.parent, suffix=".so", delete=False).name
        cmd = [*shlex.split(cxx), *_FLAGS, f"-I{jax.ffi.include_dir()}", str(_SOURCE), "-o", tmp]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            os.unlink(tmp)
            raise RuntimeError(f"qlab: cannot run the C++ compiler {cxx!r} ({e}); set CXX or install g++") from e
        if res.returncode != 0:
            os.unlink(tmp)
            raise RuntimeError(f"qlab: compiling {_SOURCE.name} failed:\n{' '.join(cmd)}\n{res.stderr[-2000:]}")
        os.replace(tmp, out)
    return out


@functools.cache
def _load():
    """(True, path) once the FFI target is registered, else (False, reason)."""
    if os.environ.get("QLAB_NATIVE", "1") == "0":
        return False, "turned off by QLAB_NATIVE=0"
    if not hasattr(jax, "ffi") or not hasattr(jax.ffi, "ffi_call"):
        return False, f"jax {jax.__version__} has no jax.ffi"
    try:
        path = build()
        lib = ctypes.cdll.LoadLibrary(str(path))
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(lib.QlabFakeQuantInt), platform="cpu")
        jax.ffi.register_ffi_target(_QTARGET, jax.ffi.pycapsule(lib.QlabQuantizeInt), platform="cpu")
    except Exception as e:  # no compiler, headers, ...: say so once, then use the XLA path
        warnings.warn(f"qlab: the CPU fake-quant kernel is unavailable, fake_quant runs the XLA path "
                      f"(same values, slower): {e}", RuntimeWarning, stacklevel=3)
        return False, str(e)
    return True, str(path)


def status() -> dict:
    """Whether the CPU kernel is in use, and its library path or the reason it is not.

    Example:
        >>> sorted(status())
        ['detail', 'enabled']
    """
    ok, detail = _load()
    return {"enabled": ok, "detail": detail}


def kernel_view(spec: QuantSpec, shape, dtype):
    """``(n, inner, group)`` when the kernel computes ``fake_quant(x, spec)`` for a float ``x`` of this
    shape (the array seen as ``[outer, n, inner]``, groups of ``group`` along ``n``), else None.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.spec import parse_spec
        >>> kernel_view(parse_spec("int4/g128a0"), (256, 64), jnp.float32)
        (256, 64, 128)
    """
    if not jnp.issubdtype(dtype, jnp.floating) or len(shape) == 0 or math.prod(shape) == 0:
        return None
    if not plain_absmax_int(spec):
        return None
    nd, g = len(shape), spec.granularity
    if isinstance(g, PerTensor):
        return math.prod(shape), 1, math.prod(shape)
    if isinstance(g, PerChannel):
        ax = (-1 if g.axis is None else g.axis) % nd
        if ax == nd - 1:  # reduce every leading axis
            return math.prod(shape[:-1]), shape[-1], math.prod(shape[:-1])
        if ax == 0:
            return math.prod(shape[1:]), 1, math.prod(shape[1:])
        return None
    if isinstance(g, PerGroup):
        ax = (-1 if g.axis is None else g.axis) % nd
        if shape[ax] % g.size and not g.pad:
            return None  # the XLA path raises the error
        return shape[ax], math.prod(shape[ax + 1:]), g.size
    return None


def fake_quant_view(spec: QuantSpec, shape, dtype):
    """:func:`kernel_view` where ``fake_quant`` dispatches the kernel: arrays of at most
    ``FAKE_QUANT_MAX_ELEMENTS`` elements, where it is faster than the XLA path into a fresh buffer
    and in place of a donated input alike; None elsewhere (the XLA path runs).

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.spec import parse_spec
        >>> spec = parse_spec("int8/ch0")
        >>> fake_quant_view(spec, (64, 64), jnp.float32), fake_quant_view(spec, (4096, 4096), jnp.float32)
        ((64, 1, 64), None)
    """
    if math.prod(shape) > FAKE_QUANT_MAX_ELEMENTS:
        return None
    return kernel_view(spec, shape, dtype)


def enabled() -> bool:
    """True when the kernel library is built (or was cached) and registered; builds it on first call.

    Example:
        >>> enabled() == status()["enabled"]
        True
    """
    return _load()[0]


# ---------------------------------------------------------------------------------------
# Per-platform dispatch: one primitive whose lowering is the XLA reference on every platform but
# CPU, where it is the kernel when that can be built. Tracing never builds anything; only lowering
# for CPU does (jax.export for "cuda" / "tpu" on a CPU host never sees a compiler or a custom call).

_dispatch_p = jex.core.Primitive("qlab_cpu_kernel_or_xla")
_dispatch_p.multiple_results = True


def dispatch(reference, kernel, *args):
    """``reference(*args)`` (a tuple of arrays, written with XLA ops), lowered on CPU as
    ``kernel(*args)`` when the kernel is :func:`enabled`, and as ``reference`` everywhere else:
    both must return the same shapes, dtypes and values. ``kernel`` is traced only while lowering
    for CPU; ``vmap`` maps both, a derivative is that of ``reference``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> double = dispatch(lambda v: (v * 2.0,), lambda v: (v + v,), jnp.arange(3.0))
        >>> double[0].tolist()
        [0.0, 2.0, 4.0]
    """
    return tuple(_dispatch_p.bind(*args, reference=reference, kernel=kernel))


def _dispatch_abstract_eval(*avals, reference, kernel):
    outs = jax.eval_shape(reference, *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals))
    return [jax.core.ShapedArray(o.shape, o.dtype) for o in outs]


def _dispatch_impl(*args, reference, kernel):
    return jax.jit(lambda *a: _dispatch_p.bind(*a, reference=reference, kernel=kernel))(*args)


def _reference_lowering(ctx, *args, reference, kernel):
    return mlir.lower_fun(lambda *a: list(reference(*a)), multiple_results=True)(ctx, *args)


def _cpu_lowering(ctx, *args, reference, kernel):
    fn = kernel if enabled() else reference
    return mlir.lower_fun(lambda *a: list(fn(*a)), multiple_results=True)(ctx, *args)


def _dispatch_batch(args, dims, *, reference, kernel):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)  # None: not mapped
    args = [batching.bdim_at_front(a, d, size) for a, d in zip(args, dims)]
    outs = _dispatch_p.bind(*args, reference=jax.vmap(reference), kernel=jax.vmap(kernel))
    return outs, [0] * len(outs)


def _dispatch_jvp(primals, tangents, *, reference, kernel):
    tangents = [ad.instantiate_zeros(t) for t in tangents]
    out, dout = jax.jvp(lambda *a: tuple(reference(*a)), tuple(primals), tuple(tangents))
    return list(out), list(dout)


_dispatch_p.def_impl(_dispatch_impl)
_dispatch_p.def_abstract_eval(_dispatch_abstract_eval)
mlir.register_lowering(_dispatch_p, _reference_lowering)
mlir.register_lowering(_dispatch_p, _cpu_lowering, platform="cpu")
batching.primitive_batchers[_dispatch_p] = _dispatch_batch
ad.primitive_jvps[_dispatch_p] = _dispatch_jvp


def _attrs(spec: QuantSpec, view) -> dict:
    n, inner, group = view
    fmt = spec.fmt
    return dict(n=np.int64(n), inner=np.int64(inner), group=np.int64(group), qmin=np.float32(fmt.qmin),
                qmax=np.float32(fmt.qmax), inv_denom=np.float32(reciprocal(spec.absmax_divisor)),
                scale_kind=np.int32(_SCALE_KINDS[spec.scale_dtype]))


def _require():
    ok, detail = _load()
    if not ok:
        raise RuntimeError(f"qlab: the CPU fake-quant kernel is unavailable: {detail}")


def fake_quant_cpu(x, spec: QuantSpec, view):
    """The kernel's ``fake_quant(x, spec)`` (forward value only) for a ``view`` from :func:`kernel_view`.
    CPU only: callers pick it with ``jax.lax.platform_dependent``.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics import fake_quant, parse_spec
        >>> s = parse_spec("int4/ch0"); x = jnp.array([[0.1, -0.5, 0.25, 1.0]])
        >>> bool((fake_quant_cpu(x, s, kernel_view(s, x.shape, x.dtype)) == fake_quant(x, s)).all())
        True
    """
    _require()
    # in place of x (see FAKE_QUANT_MAX_ELEMENTS): XLA copies x first where it is still live
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct(x.shape, np.float32), vmap_method="broadcast_all",
                            input_output_aliases={0: 0})
    y = call(x.astype(np.float32), **_attrs(spec, view))
    return y.astype(x.dtype)  # computed in float32 as the XLA path does


def quantize_cpu(x, spec: QuantSpec, view):
    """The kernel's ``quantize``: ``(codes, scale)`` in one pass, those of ``qlab.quantize``:
    ``codes`` int8 (uint8 for unsigned formats), ``scale`` float32 shaped as the granularity's
    view with the reduced axes 1. CPU only, for a ``view`` from :func:`kernel_view`.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics import parse_spec, quantize
        >>> s = parse_spec("int4/ch0"); x = jnp.array([[0.1, -0.5, 0.25, 1.0]])
        >>> codes, scale = quantize_cpu(x, s, kernel_view(s, x.shape, x.dtype))
        >>> codes.tolist() == quantize(x, s).codes.tolist()
        True
    """
    _require()
    code_dtype = np.int8 if spec.fmt.signed else np.uint8
    vshape, axes, _ = spec.granularity.view(x.shape)
    scale_shape = tuple(1 if i in axes else d for i, d in enumerate(vshape))
    out = (jax.ShapeDtypeStruct(x.shape, code_dtype), jax.ShapeDtypeStruct(scale_shape, np.float32))
    call = jax.ffi.ffi_call(_QTARGET, out, vmap_method="broadcast_all")
    return call(x.astype(np.float32), **_attrs(spec, view))
