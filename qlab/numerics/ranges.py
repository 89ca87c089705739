"""Ranges and scales: from a grouped view of ``x`` to a clip range, a stored scale (+ zero point),
and the grid round trip ``x -> codes as floats -> values``.

These are the pieces every quantizer in qlab is built from: ``qlab.quantize`` / ``fake_quant`` (the
XLA path), the CPU kernel (which follows :func:`reciprocal`'s rule) and the PTQ algorithms
(``qlab.ptq``: GPTQ, AWQ, HQQ reuse the same range rules and grid).

Inputs are grouped views (``qlab.numerics.granularity.to_view``) in float32; ``axes`` are the
view's reduced axes, and every range and scale keeps them (``keepdims``), so it broadcasts back
against the view. Non-finite values never set a range: absmax, min-max and percentiles look at
finite values only (+-inf then saturates to the largest code). An all-zero (or all non-finite)
group gets scale 1, so zeros come back as zeros and nothing divides by zero.

Example:
    >>> import jax.numpy as jnp
    >>> from qlab.numerics.spec import parse_spec
    >>> spec = parse_spec("int4/s=f32")
    >>> xv = jnp.array([[0.1, -0.5, 0.25, 1.0]])
    >>> lo, hi = clip_range(xv, (0, 1), spec)
    >>> scale, zp = scale_and_zero_point(lo, hi, spec)
    >>> r = grid_values(xv, scale, zp, None, spec)
    >>> r.tolist(), reconstruct(r, scale, zp, None).tolist()[0][:2]
    ([[1.0, -3.0, 2.0, 7.0]], [0.1428571492433548, -0.4285714626312256])
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from qlab.numerics.spec import MSE, Fixed, Percentile, QuantSpec

__all__ = [
    "absmax",
    "minmax",
    "base_range",
    "mse_search",
    "clip_range",
    "best_clip_ratio",
    "store_scale",
    "reciprocal",
    "signed_extreme",
    "raw_scale",
    "widen_range",
    "scale_and_zero_point",
    "code_params",
    "round_codes",
    "effective_scale",
    "tensor_scale",
    "grid_values",
    "reconstruct",
]

_F32 = jnp.float32


# ---------------------------------------------------------------------------------------
# Finite-value reductions


def _tree_reduce(a, axis, op, jnp_op):
    """Pairwise reduction of a power-of-two ``axis``: XLA:CPU fuses the halving steps into
    vectorised elementwise loops, several times faster than its generic reduce here. The last
    8 are left to a real reduce, which XLA keeps as its own fusion: a pure elementwise tail
    would be fused into the consumer and recomputed for every element."""
    while a.shape[axis] > 8:
        h = a.shape[axis] // 2
        a = op(jax.lax.slice_in_dim(a, 0, h, axis=axis), jax.lax.slice_in_dim(a, h, 2 * h, axis=axis))
    return jnp_op(a, axis=axis, keepdims=True)


def _reduce(a, axes, op, jnp_op):
    """``jnp_op(a, axis=axes, keepdims=True)``, with a faster path for the common single-axis
    reductions of weight groups and channels (see ``benchmarks/fake_quant.py``)."""
    if len(axes) == 1:
        ax = axes[0]
        n = a.shape[ax]
        inner = math.prod(a.shape[ax + 1 :])
        pow2 = n > 1 and n & (n - 1) == 0
        if pow2 and ((inner >= 64 and n <= 256) or (inner == 1 and 64 <= n <= 1024)):
            return _tree_reduce(a, ax, op, jnp_op)
        if inner >= 64 and n > 256 and n % 128 == 0:
            split = a.reshape(a.shape[:ax] + (n // 128, 128) + a.shape[ax + 1 :])
            return jnp_op(_tree_reduce(split, ax + 1, op, jnp_op), axis=ax)
    return jnp_op(a, axis=axes, keepdims=True)


def absmax(xv, axes):
    """Largest ``|x|`` over ``axes`` among finite values (0 where there is none), reduced axes kept.

    Example:
        >>> import jax.numpy as jnp
        >>> absmax(jnp.array([[1.0, -3.0, jnp.inf], [jnp.nan, 0.5, -0.25]]), (1,)).tolist()
        [[3.0], [0.5]]
    """
    # |x| < inf is False for inf and NaN: one fused select, no branch (a lax.cond here made
    # XLA:CPU copy the whole output to fix up layouts)
    a = jnp.abs(xv)
    return _reduce(jnp.where(a < jnp.inf, a, 0.0), axes, jnp.maximum, jnp.max)


def minmax(xv, axes):
    """``(lo, hi)``: min and max over ``axes`` among finite values, widened to include 0.

    Example:
        >>> import jax.numpy as jnp
        >>> lo, hi = minmax(jnp.array([[1.0, 3.0, -jnp.inf]]), (1,))
        >>> lo.tolist(), hi.tolist()
        ([[0.0]], [[3.0]])
    """
    fin = jnp.abs(xv) < jnp.inf
    lo = _reduce(jnp.where(fin, xv, 0.0), axes, jnp.minimum, jnp.min)
    hi = _reduce(jnp.where(fin, xv, 0.0), axes, jnp.maximum, jnp.max)
    return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)


def signed_extreme(xv, axes):
    """The finite value of largest magnitude over ``axes``, with its sign (the first one in
    row-major order on a tie of magnitudes; 0 where there is none), reduced axes kept.

    Example:
        >>> import jax.numpy as jnp
        >>> signed_extreme(jnp.array([[1.0, -3.0, 3.0], [0.5, jnp.inf, 0.25]]), (1,)).tolist()
        [[-3.0], [0.5]]
    """
    a = jnp.abs(xv)
    a = jnp.where(a < jnp.inf, a, -1.0)
    kept = [i for i in range(xv.ndim) if i not in axes]
    order = kept + list(axes)
    flat_shape = tuple(xv.shape[i] for i in kept) + (-1,)
    at = jnp.transpose(a, order).reshape(flat_shape)
    vt = jnp.transpose(xv, order).reshape(flat_shape)
    pick = jnp.argmax(at, axis=-1, keepdims=True)  # first maximum
    e = jnp.take_along_axis(vt, pick, axis=-1)
    e = jnp.where(jnp.take_along_axis(at, pick, axis=-1) >= 0, e, 0.0)  # a -0.0 extreme stays -0.0
    out_shape = tuple(1 if i in axes else n for i, n in enumerate(xv.shape))
    return e.reshape(out_shape)


# ---------------------------------------------------------------------------------------
# Range rules


def _finite_minmax(xv, axes):
    """Min and max of finite values over ``axes`` (0 where there is none), not widened."""
    fin = jnp.abs(xv) < jnp.inf
    any_fin = jnp.any(fin, axis=axes, keepdims=True)
    lo = jnp.min(jnp.where(fin, xv, jnp.inf), axis=axes, keepdims=True)
    hi = jnp.max(jnp.where(fin, xv, -jnp.inf), axis=axes, keepdims=True)
    return jnp.where(any_fin, lo, 0.0), jnp.where(any_fin, hi, 0.0)


def _extreme_range(e, spec: QuantSpec):
    """The clip range of ``absmax_to="signed_extreme"``: the grid ``[qmin, qmax] * e / qmin``,
    sorted; :func:`scale_and_zero_point` recovers ``e`` as its end of larger magnitude."""
    other = e * (spec.fmt.qmax / spec.fmt.qmin)  # the opposite sign, a smaller magnitude
    neg = e < 0  # False for -0.0, which stays the upper end (its sign is the scale's)
    return jnp.where(neg, e, other), jnp.where(neg, other, e)


def base_range(xv, axes, spec: QuantSpec):
    """``(lo, hi)`` of ``spec``'s range method before any clip search (MSE specs: their absmax or
    min-max start); symmetric specs return ``(-amax, amax)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.spec import parse_spec
        >>> lo, hi = base_range(jnp.array([[0.5, -2.0, 1.0]]), (1,), parse_spec("int8"))
        >>> lo.tolist(), hi.tolist()
        ([[-2.0]], [[2.0]])
    """
    rng = spec.range
    if isinstance(rng, Fixed):
        shape = tuple(1 if i in axes else s for i, s in enumerate(xv.shape))
        lo = jnp.full(shape, min(rng.lo, 0.0), _F32)
        hi = jnp.full(shape, max(rng.hi, 0.0), _F32)
        if spec.symmetric:
            a = jnp.maximum(-lo, hi)
            return -a, a
        return lo, hi
    if isinstance(rng, Percentile):
        xn = jnp.where(jnp.isfinite(xv), xv, jnp.nan)
        if spec.symmetric:
            a = jnp.nanpercentile(jnp.abs(xn), rng.q, axis=axes, keepdims=True)
            a = jnp.nan_to_num(a, nan=0.0)
            return -a, a
        lo = jnp.nan_to_num(jnp.nanpercentile(xn, 100 - rng.q, axis=axes, keepdims=True), nan=0.0)
        hi = jnp.nan_to_num(jnp.nanpercentile(xn, rng.q, axis=axes, keepdims=True), nan=0.0)
        return widen_range(lo, hi, spec)
    if spec.symmetric and spec.absmax_to == "signed_extreme":
        return _extreme_range(signed_extreme(xv, axes), spec)
    if spec.symmetric:
        a = absmax(xv, axes)
        return -a, a
    if spec.zero_point == "min":
        return _finite_minmax(xv, axes)
    return minmax(xv, axes)


def best_clip_ratio(err_for, ratios):
    """Per-element argmin over candidate clip ratios, one ratio at a time (memory O(one error
    array), not O(len(ratios))). ``err_for(r)`` returns an error array (e.g. one value per scale
    group); the result has its shape. Used by the MSE range search and by AWQ's clip search.

    Example:
        >>> import jax.numpy as jnp
        >>> best_clip_ratio(lambda r: jnp.array([(r - 0.5) ** 2, (r - 0.9) ** 2]), jnp.array([1.0, 0.9, 0.5])).tolist()
        [0.5, 0.8999999761581421]
    """
    ratios = jnp.asarray(ratios, _F32)

    def body(carry, r):
        best_err, best_r = carry
        e = err_for(r)
        better = e < best_err
        return (jnp.where(better, e, best_err), jnp.where(better, r, best_r)), None

    e0 = err_for(ratios[0])
    (_, best_r), _ = jax.lax.scan(body, (e0, jnp.full_like(e0, ratios[0])), ratios[1:])
    return best_r


def mse_search(xv, axes, spec: QuantSpec, lo, hi, tscale=None):
    """The range ``(lo * r, hi * r)`` whose round trip has the least ``sum |error| ** norm`` per
    group, over ``spec.range``'s grid of ratios ``r`` from 1 down to its ``min_ratio`` (an MSE spec).

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.spec import parse_spec
        >>> spec = parse_spec("int3/mse")
        >>> xv = jnp.array([[0.3, 0.5, -0.4, 0.6, -0.7, 0.2, 4.0]])
        >>> lo, hi = base_range(xv, (1,), spec)
        >>> hi.tolist(), mse_search(xv, (1,), spec, lo, hi)[1].tolist()   # clipped below the absmax
        ([[4.0]], [[3.806060552597046]])
    """
    m: MSE = spec.range

    def err_for(r):
        s, z = scale_and_zero_point(lo * r, hi * r, spec, tscale)
        inv, cz = code_params(lo * r, hi * r, spec) if spec.code_scale == "f32" else (None, z)
        y = reconstruct(grid_values(xv, s, cz, tscale, spec, inv=inv), s, z, tscale, spec.zero_point)
        d = jnp.where(jnp.isfinite(xv), jnp.abs(y - xv), 0.0)
        return jnp.sum(d**m.norm, axis=axes, keepdims=True)

    best_r = best_clip_ratio(err_for, jnp.linspace(1.0, m.min_ratio, m.grid, dtype=_F32))
    return lo * best_r, hi * best_r


def clip_range(xv, axes, spec: QuantSpec, tscale=None):
    """``(lo, hi)`` that ``spec``'s range method picks: :func:`base_range`, then for MSE specs
    :func:`mse_search` (``tscale``: the second-level scale it quantizes with, if any).

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.spec import parse_spec
        >>> lo, hi = clip_range(jnp.array([[0.5, -2.0, 1.0]]), (1,), parse_spec("int8/asym"))
        >>> lo.tolist(), hi.tolist()
        ([[-2.0]], [[1.0]])
    """
    lo, hi = base_range(xv, axes, spec)
    if isinstance(spec.range, MSE):
        lo, hi = mse_search(xv, axes, spec, lo, hi, tscale)
    return lo, hi


# ---------------------------------------------------------------------------------------
# Scales


def store_scale(s, spec: QuantSpec, qmax_abs):
    """Round a positive scale to ``spec.scale_dtype`` (returned as float32); zero or non-finite
    scales become 1. ``qmax_abs`` is the divisor ``s`` was computed with (``amax / qmax_abs``): the
    e8m0 rule (OCP MX) needs it to recover ``amax``.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.spec import parse_spec
        >>> store_scale(jnp.array([0.1, 0.0, jnp.inf]), parse_spec("int8/s=bf16"), 127.0).tolist()
        [0.10009765625, 1.0, 1.0]
    """
    d = spec.scale_dtype
    if spec.code_scale == "f32":  # llama.cpp: a plain cast (codes do not depend on it)
        return s if d == "f32" else s.astype(_STORE[d]).astype(_F32)
    # a negative scale comes only from absmax_to="signed_extreme" (sign kept, magnitude stored)
    ok = (s != 0) & jnp.isfinite(s)
    s = jnp.where(ok, s, 1.0)
    if d == "f32":
        return s
    if d == "f16":
        return jnp.sign(s) * jnp.clip(jnp.abs(s), 2.0**-24, 65504.0).astype(jnp.float16).astype(_F32)
    if d == "bf16":
        return s.astype(jnp.bfloat16).astype(_F32)
    if d == "e4m3":
        return jnp.clip(s, 2.0**-9, 448.0).astype(jnp.float8_e4m3fn).astype(_F32)
    # e8m0, OCP MX rule: the shared exponent is floor(log2(amax)) - floor(log2(qmax)), where
    # s was computed as amax/qmax by the caller; we recover amax to apply the rule exactly.
    amax = s * qmax_abs
    _, e = jnp.frexp(amax)  # amax = f * 2**e, f in [0.5, 1): floor(log2 amax) = e - 1
    if isinstance(qmax_abs, (int, float)):
        qlog = int(math.floor(math.log2(qmax_abs)))
    else:  # traced bit width: floor(log2 q) of a positive integer-valued q, exactly
        qlog = jnp.frexp(qmax_abs)[1] - 1
    exp = jnp.clip(e - 1 - qlog, -127, 127)
    return jnp.where(ok, jnp.ldexp(jnp.ones_like(s), exp.astype(jnp.int32)), 1.0)


_STORE = {"f16": jnp.float16, "bf16": jnp.bfloat16}


def reciprocal(v):
    """``1 / v`` in float32, for a Python number or an array. Scales divide as ``x * (1 / s)``
    (as PyTorch's fake_quantize and AQT do), written out rather than left to XLA, which rewrites
    some divisions that way and not others: one rule everywhere, which the CPU kernel
    (``qlab.numerics.native``) follows too. It differs from ``x / s`` only in the last bit.

    Example:
        >>> reciprocal(127)
        0.007874015718698502
    """
    if isinstance(v, (int, float)):
        return float(np.float32(1) / np.float32(v))
    return 1.0 / v


def _num(v):
    """A Python number as float; a traced value (``bits=`` override) as it is."""
    return float(v) if isinstance(v, (int, float)) else v


def widen_range(lo, hi, spec: QuantSpec):
    """An asymmetric clip range widened to include 0 (so that 0 has an exact code), except for
    ``zero_point="min"``, which keeps the group's own minimum.

    Example:
        >>> from qlab.numerics.spec import parse_spec
        >>> [float(v) for v in widen_range(1.0, 3.0, parse_spec("uint4/asym"))]
        [0.0, 3.0]
        >>> [float(v) for v in widen_range(1.0, 3.0, parse_spec("q4_1"))]
        [1.0, 3.0]
    """
    if spec.zero_point == "min":
        return lo, hi
    return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)


def raw_scale(lo, hi, spec: QuantSpec, tscale=None):
    """The float32 scale for the clip range ``[lo, hi]`` before storage rounding: ``amax / divisor``
    (symmetric; as ``amax * (1 / divisor)`` unless ``code_scale="f32"``, which divides as
    llama.cpp does), ``extreme / qmin`` (``signed_extreme``) or ``(hi - lo) / (qmax - qmin)``.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.spec import parse_spec
        >>> float(raw_scale(jnp.array(-7.0), jnp.array(8.0), parse_spec("q4_0")))   # 8 / -8
        -1.0
    """
    fmt = spec.fmt
    if spec.symmetric:
        denom = _num(spec.absmax_divisor)
        if spec.absmax_to == "signed_extreme":
            e = jnp.where(hi >= -lo, hi, lo)
            raw = e / _divisor(_num(fmt.qmin), spec, e)
        elif spec.code_scale == "f32":
            amax = jnp.maximum(-lo, hi)
            raw = amax / _divisor(denom, spec, amax)
        else:
            raw = jnp.maximum(-lo, hi) * reciprocal(denom)
        return raw if tscale is None else raw / tscale
    span = hi - lo
    return span / _divisor(_num(fmt.qmax) - _num(fmt.qmin), spec, span)


def _divisor(d, spec: QuantSpec, like):
    """``d`` for a division that must stay one: XLA rewrites ``x / constant`` and
    ``x / broadcast(y)`` as ``x * (1 / ...)``, which ``code_scale="f32"`` (llama.cpp's
    ``amax / 127``) must not see; a full array behind a barrier is neither."""
    if spec.code_scale != "f32" or not isinstance(d, float):
        return d
    return jax.lax.optimization_barrier(jnp.full(jnp.shape(like), d, _F32))


def code_params(lo, hi, spec: QuantSpec):
    """``(1 / scale, zero point)`` that ``code_scale="f32"`` specs compute codes with: the float32
    scale before storage rounding (``1 / 0`` taken as 0, as llama.cpp) and, for ``zero_point="min"``,
    the float32 minimum.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.spec import parse_spec
        >>> inv, zp = code_params(jnp.array(0.0), jnp.array(0.0), parse_spec("q8_0"))
        >>> float(inv), zp
        (0.0, None)
    """
    raw = raw_scale(lo, hi, spec)
    inv = jnp.where(raw == 0, 0.0, 1.0 / jnp.where(raw == 0, 1.0, raw))
    return inv, (lo if spec.zero_point == "min" else None)


def scale_and_zero_point(lo, hi, spec: QuantSpec, tscale=None):
    """``(scale, zero_point)`` for the clip range ``[lo, hi]``: the scale rounded to its storage
    dtype (:func:`store_scale`), the zero point None for symmetric specs, else an integer (or, for
    ``zp=float``, a float in the scale's precision). ``tscale``: second-level scale (NVFP4) or None.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.spec import parse_spec
        >>> s, z = scale_and_zero_point(jnp.array(-1.0), jnp.array(3.0), parse_spec("uint4/asym/s=f32"))
        >>> float(s), float(z)
        (0.2666666805744171, 4.0)
    """
    fmt = spec.fmt
    raw = raw_scale(lo, hi, spec, tscale)
    if spec.symmetric:
        return store_scale(raw, spec, _num(spec.absmax_divisor)), None
    qmin, qmax = _num(fmt.qmin), _num(fmt.qmax)
    scale = store_scale(raw, spec, qmax - qmin)
    if spec.zero_point == "min":
        zp = jnp.asarray(lo, _F32)
        return scale, (zp if spec.scale_dtype == "f32" else zp.astype(_STORE[spec.scale_dtype]).astype(_F32))
    if spec.zero_point == "int":
        zp = jnp.clip(qmin - jnp.round(lo / scale), qmin, qmax)
    else:
        zp = (qmin - lo / scale).astype(_F32)
        if spec.scale_dtype in ("f16", "bf16"):
            zp = zp.astype(jnp.float16 if spec.scale_dtype == "f16" else jnp.bfloat16).astype(_F32)
    return scale, zp


def effective_scale(scale, tscale):
    """The scale values are multiplied by: ``scale``, times the second-level ``tscale`` if any.

    Example:
        >>> effective_scale(0.5, None), effective_scale(0.5, 4.0)
        (0.5, 2.0)
    """
    return scale if tscale is None else scale * tscale


def tensor_scale(xv, spec: QuantSpec):
    """NVFP4-style second-level scale (float32 scalar): maps the tensor's absmax to
    ``qmax * max(scale dtype)``, so that the per-group scales fit their dtype; 1 for an all-zero tensor.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.spec import parse_spec
        >>> float(tensor_scale(jnp.array([[-2688.0, 1.0]]), parse_spec("nvfp4")))
        1.0
    """
    amax = absmax(xv, tuple(range(xv.ndim))).reshape(())
    smax = {"e4m3": 448.0, "e8m0": 2.0**127, "f16": 65504.0, "bf16": 3.0e38, "f32": 3.0e38}[spec.scale_dtype]
    ts = amax / (spec.fmt.max_abs * smax)
    return jnp.where((ts > 0) & jnp.isfinite(ts), ts, 1.0).astype(_F32)


# ---------------------------------------------------------------------------------------
# The grid round trip


def grid_values(xv, scale, zp, tscale, spec: QuantSpec, noise=None, inv=None):
    """Grid values (codes as floats) of ``xv``: ``round(xv * (1 / scale) [+ zp])`` with the format's
    rounding (``noise``: uniform [0, 1) draws for stochastic rounding); ``inv`` is ``1 / scale``
    when the caller has it already.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.spec import parse_spec
        >>> grid_values(jnp.array([0.26, -9.0]), 0.5, None, None, parse_spec("int4")).tolist()
        [1.0, -8.0]
    """
    inv = reciprocal(effective_scale(scale, tscale)) if inv is None else inv
    if zp is not None and spec.zero_point == "min":
        v = (xv - zp) * inv
    else:
        v = xv * inv
        if zp is not None:
            v = v + zp
    return round_codes(v, spec, noise)


def round_codes(v, spec: QuantSpec, noise=None):
    """Grid values of ``v`` (values already divided by the scale) under ``spec.rounding``:
    the format's own rounding (to nearest even, or stochastic with ``noise``), or for integer
    formats ``half_away`` (exactly, as C's ``roundf``) or ``biased_trunc`` (llama.cpp's
    ``(int)(v - qmin + 0.5f) + qmin``, its addition rounded in float32); saturating.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.spec import parse_spec
        >>> v = jnp.array([2.5, -2.5, 0.49999997])
        >>> [round_codes(v, parse_spec(s)).tolist() for s in ("int4", "int4/half_away", "int4/biased_trunc")]
        [[2.0, -2.0, 0.0], [3.0, -3.0, 0.0], [3.0, -2.0, 1.0]]
    """
    if spec.rounding not in ("half_away", "biased_trunc"):
        return spec.fmt.round(v, noise)
    qmin, qmax = spec.fmt.qmin, spec.fmt.qmax
    if spec.rounding == "half_away":
        a = jnp.abs(v)
        f = jnp.floor(a)
        r = jnp.sign(v) * (f + (a - f >= 0.5))  # a - f is exact: no rounding at the half
    else:
        # v rounded to float32 before the addition, as llama.cpp's reference: LLVM would otherwise
        # contract x * (1 / d) + 8.5 into one FMA, which rounds once and differs at near-ties. A
        # division by 1 (a divisor it cannot see is 1; XLA drops optimization barriers here) is no
        # multiply-add operand.
        v = v / jnp.where(jnp.isnan(v), 2.0, 1.0)
        r = jnp.trunc(v + (0.5 - qmin)) + qmin
    r = jnp.clip(r, qmin, qmax)
    return jnp.where(r == 0, 0.0, r)


def reconstruct(r, scale, zp, tscale, zero_point="int"):
    """Values of grid values ``r``: ``((r [- zp]) * scale) [* tscale]``; with ``zero_point="min"``
    (the spec's kind of zero point) ``r * scale + zp``. A second-level ``tscale`` multiplies
    last, so each product is correctly rounded (as NVFP4 readers compute ``(code * block scale)
    * tensor scale``; ``code * (block scale * tensor scale)`` would round twice).

    Example:
        >>> import jax.numpy as jnp
        >>> reconstruct(jnp.array([1.0, -8.0]), 0.5, None, None).tolist()
        [0.5, -4.0]
        >>> reconstruct(jnp.array([1.0, 15.0]), 0.5, 1.0, None, "min").tolist()
        [1.5, 8.5]
    """
    if zp is not None and zero_point == "min":
        return r * effective_scale(scale, tscale) + zp
    if zp is not None:
        r = r - zp
    y = r * scale
    return y if tscale is None else y * tscale
