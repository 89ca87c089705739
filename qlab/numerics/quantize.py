"""quantize / dequantize / fake_quant, and the QTensor they share.

All arithmetic runs in float32 whatever the input dtype; outputs come back in the input dtype.
``fake_quant(x, spec)`` is bit-identical to ``dequantize(quantize(x, spec))`` for every finite
or infinite input (a NaN has no integer code: quantize stores code 0 for it, fake_quant
propagates the NaN so that training notices).

Non-finite values never set a range: absmax, min-max and percentiles look at finite values
only, +-inf then saturates to the largest code. An all-zero (or all non-finite) group gets
scale 1, so zeros come back as zeros and nothing divides by zero.

Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.array([[0.1, -0.5, 0.25, 1.0]])
    >>> q = quantize(x, "int4/ch0")
    >>> q.codes.tolist()
    [[1, -4, 2, 7]]
    >>> bool((dequantize(q) == fake_quant(x, "int4/ch0")).all())
    True
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from qlab.numerics import native
from qlab.numerics.formats import IntFormat
from qlab.numerics.granularity import from_view, to_view
from qlab.numerics.spec import MSE, Absmax, Fixed, MinMax, Percentile, QuantSpec, as_spec

__all__ = ["QTensor", "quantize", "dequantize", "fake_quant", "fake_quant_range", "quant_error", "sqnr_db",
           "TracedIntFormat"]

_F32 = jnp.float32


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class QTensor:
    """Quantized array: integer/bit-pattern ``codes`` + ``scale`` (+ ``zero_point``) + ``spec``.

    ``codes`` has the original shape (int8/uint8); ``scale`` and ``zero_point`` have the
    grouped-view shape of the spec's granularity (see ``qlab.numerics.granularity``);
    ``tensor_scale`` is the optional second-level f32 scale (NVFP4).

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize(jnp.ones((4, 256)), "int4/g128")
        >>> q.packed_bytes   # 1024 codes * 4 bits + 8 scales * 16 bits
        528
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    tensor_scale: jax.Array | None
    spec: QuantSpec
    shape: tuple
    dtype: np.dtype

    def tree_flatten(self):
        return (self.codes, self.scale, self.zero_point, self.tensor_scale), (
            self.spec,
            self.shape,
            self.dtype,
        )

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def packed_bytes(self) -> int:
        """Bytes this tensor occupies packed: codes at ``bits`` bits, scales, zero points."""
        from qlab.numerics.packing import packed_nbytes

        return packed_nbytes(self.spec, self.shape)

    @property
    def bits_per_weight(self) -> float:
        from qlab.numerics.packing import bits_per_weight

        return bits_per_weight(self.spec, self.shape)

    def __repr__(self):
        return (
            f"QTensor(spec={str(self.spec)!r}, shape={self.shape}, dtype={np.dtype(self.dtype).name}, "
            f"scale_shape={tuple(self.scale.shape)}, packed_bytes={self.packed_bytes})"
        )


# ---------------------------------------------------------------------------------------
# Ranges


def _finite(x):
    return jnp.isfinite(x)


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


def _absmax(xv, axes):
    # |x| < inf is False for inf and NaN: one fused select, no branch (a lax.cond here made
    # XLA:CPU copy the whole output to fix up layouts)
    a = jnp.abs(xv)
    return _reduce(jnp.where(a < jnp.inf, a, 0.0), axes, jnp.maximum, jnp.max)


def _minmax(xv, axes):
    fin = jnp.abs(xv) < jnp.inf
    lo = _reduce(jnp.where(fin, xv, 0.0), axes, jnp.minimum, jnp.min)
    hi = _reduce(jnp.where(fin, xv, 0.0), axes, jnp.maximum, jnp.max)
    return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)


def _base_range(xv, axes, spec: QuantSpec):
    """(lo, hi) before any clip search; symmetric specs return (-amax, amax)."""
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
        xn = jnp.where(_finite(xv), xv, jnp.nan)
        if spec.symmetric:
            a = jnp.nanpercentile(jnp.abs(xn), rng.q, axis=axes, keepdims=True)
            a = jnp.nan_to_num(a, nan=0.0)
            return -a, a
        lo = jnp.nan_to_num(jnp.nanpercentile(xn, 100 - rng.q, axis=axes, keepdims=True), nan=0.0)
        hi = jnp.nan_to_num(jnp.nanpercentile(xn, rng.q, axis=axes, keepdims=True), nan=0.0)
        return jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    if spec.symmetric:
        a = _absmax(xv, axes)
        return -a, a
    return _minmax(xv, axes)


# ---------------------------------------------------------------------------------------
# Scales


def _store_scale(s, spec: QuantSpec, qmax_abs: float):
    """Round a positive scale to its storage dtype; zero/non-finite scales become 1."""
    ok = (s > 0) & jnp.isfinite(s)
    s = jnp.where(ok, s, 1.0)
    d = spec.scale_dtype
    if d == "f32":
        return s
    if d == "f16":
        return jnp.clip(s, 2.0**-24, 65504.0).astype(jnp.float16).astype(_F32)
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


def _reciprocal(v):
    """``1 / v`` in float32, for a Python number or an array. Scales divide as ``x * (1 / s)``
    (as PyTorch's fake_quantize and AQT do), written out rather than left to XLA, which rewrites
    some divisions that way and not others: one rule everywhere, which the CPU kernel
    (``qlab.numerics.native``) follows too. It differs from ``x / s`` only in the last bit."""
    if isinstance(v, (int, float)):
        return float(np.float32(1) / np.float32(v))
    return 1.0 / v


def _num(v):
    """A Python number as float; a traced value (``bits=`` override) as it is."""
    return float(v) if isinstance(v, (int, float)) else v


def _scale_and_zero(lo, hi, spec: QuantSpec, tscale):
    """Scale (stored precision) and zero point (or None) for a clip range [lo, hi]."""
    fmt = spec.fmt
    if spec.symmetric:
        amax = jnp.maximum(-lo, hi)
        denom = _num(spec.absmax_divisor)
        raw = amax * _reciprocal(denom)
        if tscale is not None:
            raw = raw / tscale
        return _store_scale(raw, spec, denom), None
    qmin, qmax = _num(fmt.qmin), _num(fmt.qmax)
    raw = (hi - lo) / (qmax - qmin)
    scale = _store_scale(raw, spec, qmax - qmin)
    if spec.zero_point == "int":
        zp = jnp.clip(qmin - jnp.round(lo / scale), qmin, qmax)
    else:
        zp = (qmin - lo / scale).astype(_F32)
        if spec.scale_dtype in ("f16", "bf16"):
            zp = zp.astype(jnp.float16 if spec.scale_dtype == "f16" else jnp.bfloat16).astype(_F32)
    return scale, zp


def _effective(scale, tscale):
    return scale if tscale is None else scale * tscale


def _tensor_scale(xv, spec: QuantSpec):
    """NVFP4-style second-level scale: maps the tensor's absmax to qmax * max(scale dtype)."""
    amax = _absmax(xv, tuple(range(xv.ndim))).reshape(())
    smax = {"e4m3": 448.0, "e8m0": 2.0**127, "f16": 65504.0, "bf16": 3.0e38, "f32": 3.0e38}[spec.scale_dtype]
    ts = amax / (spec.fmt.max_abs * smax)
    return jnp.where((ts > 0) & jnp.isfinite(ts), ts, 1.0).astype(_F32)


# ---------------------------------------------------------------------------------------
# Core


def _round_codes(v, spec: QuantSpec, noise):
    return spec.fmt.round(v, noise)


def _qparams(xv, axes, spec: QuantSpec, noise, given_range=None, clip_ratio=None):
    """(scale, zero_point, tensor_scale, clip range) for the grouped view ``xv``.

    The clip range ``(lo, hi)`` is where the straight-through gradient passes; an unsigned
    symmetric format clips at 0 from below. ``given_range`` skips the range method;
    ``clip_ratio`` (a possibly traced scalar) multiplies the range that was chosen.
    """
    tscale = _tensor_scale(xv, spec) if spec.tensor_scale else None
    if given_range is None:
        lo, hi = _base_range(xv, axes, spec)
        if isinstance(spec.range, MSE):
            lo, hi = _mse_search(xv, axes, spec, lo, hi, tscale)
    else:
        lo, hi = (jnp.asarray(v, _F32) for v in given_range)
        if spec.symmetric:
            a = jnp.maximum(-lo, hi)
            lo, hi = -a, a
        else:
            lo, hi = jnp.minimum(lo, 0.0), jnp.maximum(hi, 0.0)
    if clip_ratio is not None:
        lo, hi = lo * clip_ratio, hi * clip_ratio
    scale, zp = _scale_and_zero(lo, hi, spec, tscale)
    if spec.symmetric and isinstance(spec.fmt, IntFormat) and not spec.fmt.signed:
        lo = jnp.zeros_like(lo)
    return scale, zp, tscale, (lo, hi)


def _materialize(v):
    """``v`` unchanged (``v / 1.0`` is exact; NaN stays NaN), but behind a division, which XLA
    counts as expensive and so will not fuse into a consumer that reuses each element: a small
    per-group array (the stored f16/bf16/e4m3 scale, the zero point) is then computed once,
    instead of its clip/convert chain being recomputed for every element of ``x`` in the
    elementwise pass (~25% of that pass on XLA:CPU, ``benchmarks/fake_quant.py``)."""
    return v / jnp.where(jnp.isnan(v), 2.0, 1.0)


def _in_input_shape(x32, xv, spec, scale, zp, tscale, noise):
    """Broadcast the scale, its reciprocal (and zero point, noise) back to the input's own shape
    when no padding is involved, so the elementwise pass reads ``x`` without a reshaped view:
    XLA:CPU then writes the result in place of a donated input instead of copying it. The
    arithmetic is unchanged, so values are bit-identical to the grouped-view path.

    Returns ``(x, scale, 1 / scale, zero_point, noise, back)`` where ``back`` maps results to ``x``'s shape.
    """
    eff = _effective(scale, tscale)
    padded = spec.granularity.view(x32.shape)[2]
    if padded != tuple(x32.shape):
        return xv, eff, _reciprocal(eff), zp, noise, lambda v: from_view(v, spec.granularity, x32.shape)

    def expand(v):
        return None if v is None else jnp.broadcast_to(v, xv.shape).reshape(x32.shape)

    m = _materialize(eff)
    zpe = None if zp is None else expand(_materialize(zp))
    nz = None if noise is None else noise.reshape(x32.shape)
    return x32, expand(m), expand(_reciprocal(m)), zpe, nz, lambda v: v


def _grid_values(xv, scale, zp, tscale, spec, noise, inv=None):
    """Grid values (codes as floats) of ``xv``: ``round(xv * (1 / scale) [+ zp])``; ``inv`` is
    ``1 / scale`` when the caller has it already."""
    v = xv * (_reciprocal(_effective(scale, tscale)) if inv is None else inv)
    if zp is not None:
        v = v + zp
    return _round_codes(v, spec, noise)


def _reconstruct(r, scale, zp, tscale):
    if zp is not None:
        r = r - zp
    return r * _effective(scale, tscale)


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


def _mse_search(xv, axes, spec: QuantSpec, lo, hi, tscale):
    m: MSE = spec.range

    def err_for(r):
        s, z = _scale_and_zero(lo * r, hi * r, spec, tscale)
        y = _reconstruct(_grid_values(xv, s, z, tscale, spec, None), s, z, tscale)
        d = jnp.where(_finite(xv), jnp.abs(y - xv), 0.0)
        return jnp.sum(d**m.norm, axis=axes, keepdims=True)

    best_r = best_clip_ratio(err_for, jnp.linspace(1.0, m.min_ratio, m.grid, dtype=_F32))
    return lo * best_r, hi * best_r


def _noise(key, shape, spec: QuantSpec):
    if spec.rounding != "stochastic":
        return None
    if key is None:
        raise ValueError(
            "QuantSpec.rounding='stochastic' needs a PRNG key: pass key=jax.random.key(seed)"
        )
    return jax.random.uniform(key, shape, _F32)


def _check_input(x):
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"x: expected a floating-point array, got dtype {x.dtype}")
    return x


def quantize(x, spec, *, key=None) -> QTensor:
    """Quantize ``x`` to codes + scales under ``spec`` (a QuantSpec or a spec string).

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize(jnp.linspace(-1, 1, 256).reshape(2, 128), "int8/g128")
        >>> q.codes.dtype, q.scale.shape
        (dtype('int8'), (2, 1, 1))
    """
    spec = as_spec(spec)
    x = _check_input(x)
    noise = _noise(key, spec.granularity.view(x.shape)[0], spec)
    return _quantize(x, spec, noise)


# Jitted with the spec static: eager calls compile once per (spec, shape, dtype) instead of
# dispatching op by op; inside a user's jit they inline.
@functools.partial(jax.jit, static_argnums=1)
def _quantize(x, spec: QuantSpec, noise) -> QTensor:
    view = _kernel_view(x, spec, noise)
    if view is None:
        return _quantize_xla(x, spec, noise)

    def xla(v):
        q = _quantize_xla(v, spec, None)
        return q.codes, q.scale

    codes, scale = jax.lax.platform_dependent(x, cpu=lambda v: native.quantize_cpu(v, spec, view), default=xla)
    return QTensor(codes, scale, None, None, spec, tuple(x.shape), x.dtype)


def _kernel_view(x, spec: QuantSpec, noise):
    """The CPU kernel's view of ``x`` (``qlab.numerics.native``) when it covers this call, else None."""
    if noise is not None:
        return None
    view = native.kernel_view(spec, x.shape, x.dtype)
    return view if view is not None and native.enabled() else None


def _quantize_xla(x, spec: QuantSpec, noise) -> QTensor:
    x32 = x.astype(_F32)
    xv, axes = to_view(x32, spec.granularity)
    scale, zp, tscale, _ = _qparams(xv, axes, spec, noise)
    xe, eff, inv, zpe, ne, back = _in_input_shape(x32, xv, spec, scale, zp, tscale, noise)
    r = _grid_values(xe, eff, zpe, None, spec, ne, inv)
    r = jnp.where(jnp.isnan(r), 0.0 if zpe is None else zpe, r)
    codes = back(spec.fmt.encode(r))
    return QTensor(codes, scale, zp, tscale, spec, tuple(x.shape), x.dtype)


def dequantize(q: QTensor):
    """Values of a QTensor, in its original dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([0.5, -1.0, 0.25])
        >>> dequantize(quantize(x, "int8")).dtype
        dtype('float32')
    """
    return _dequantize(q)


@jax.jit
def _dequantize(q: QTensor):
    spec = q.spec
    cv, _ = to_view(q.codes, spec.granularity)
    r = spec.fmt.decode(cv)
    y = _reconstruct(r, q.scale, q.zero_point, q.tensor_scale)
    return from_view(y, spec.granularity, q.shape).astype(q.dtype)


class TracedIntFormat(IntFormat):
    """An :class:`IntFormat` whose bit width is a traced int32 scalar (``fake_quant(..., bits=b)``):
    ``qmin`` / ``qmax`` / ``max_abs`` are traced float32 values derived from it with the base
    format's signedness and narrow-range convention; rounding and encoding are IntFormat's own.
    Built inside a trace only (it is not hashable, so it never reaches a static argument).

    Example:
        >>> import jax.numpy as jnp
        >>> f = TracedIntFormat(IntFormat(8, narrow=True), jnp.int32(4))
        >>> float(f.qmin), float(f.qmax)
        (-7.0, 7.0)
    """

    def __init__(self, base: IntFormat, bits):
        object.__setattr__(self, "signed", base.signed)
        object.__setattr__(self, "narrow", base.narrow)
        object.__setattr__(self, "bits", jnp.asarray(bits, jnp.int32))

    __hash__ = None

    @property
    def _half(self):  # 2 ** (bits - 1), exact
        return jnp.left_shift(jnp.int32(1), self.bits - 1)

    @property
    def qmin(self):
        if not self.signed:
            return 0
        return (-self._half + (1 if self.narrow else 0)).astype(_F32)

    @property
    def qmax(self):
        h = self._half
        return (h - 1 if self.signed else 2 * h - 1).astype(_F32)

    @property
    def max_abs(self):
        q = self.qmax
        return q if not self.signed else jnp.where(q > 0, q, -self.qmin)


def _with_traced_bits(spec: QuantSpec, bits) -> QuantSpec:
    """A copy of ``spec`` (no validation rerun) whose format is a TracedIntFormat of ``bits``."""
    out = copy.copy(spec)
    object.__setattr__(out, "fmt", TracedIntFormat(spec.fmt, bits))
    return out


def _overrides(spec: QuantSpec, bits, clip_ratio, where: str):
    """Validated ``(bits int32, clip_ratio f32)`` (None entries allowed) or None when both are None."""
    if bits is None and clip_ratio is None:
        return None
    if bits is not None:
        if not isinstance(spec.fmt, IntFormat):
            raise ValueError(
                f"{where}: bits= overrides integer formats only (int1..int8, uint1..uint8, int2n..int8n), "
                f"not {spec.fmt.name} (spec {spec})"
            )
        if not isinstance(bits, jax.core.Tracer):
            b = np.asarray(bits)
            lo = 2 if spec.fmt.narrow else 1
            if b.size == 0 or not np.issubdtype(b.dtype, np.integer) or b.min() < lo or b.max() > 8:
                raise ValueError(f"{where}: bits={bits!r} must be integers in {lo}..8 for {spec.fmt.name}")
        bits = jnp.asarray(bits, jnp.int32)
    if clip_ratio is not None:
        if not isinstance(clip_ratio, jax.core.Tracer):
            c = np.asarray(clip_ratio, np.float64)
            if c.size == 0 or not (np.all(c > 0) and np.all(c <= 1)):
                raise ValueError(f"{where}: clip_ratio={clip_ratio!r} must be in (0, 1]")
        clip_ratio = jnp.asarray(clip_ratio, _F32)
    return bits, clip_ratio


def _fq_forward(x, spec: QuantSpec, noise, given_range=None, ov=None):
    """(fake-quantized x, clip range); on CPU the kernel of ``qlab.numerics.native`` computes the
    common specs (bit-identical; it returns no clip range: those specs are mask-free)."""
    view = _kernel_view(x, spec, noise) if ov is None and given_range is None else None
    if view is not None:
        y = jax.lax.platform_dependent(
            x, cpu=lambda v: native.fake_quant_cpu(v, spec, view), default=lambda v: _fq_xla(v, spec, None)[0]
        )
        return y, None
    return _fq_xla(x, spec, noise, given_range, ov)


def _fq_xla(x, spec: QuantSpec, noise, given_range=None, ov=None):
    bits, clip_ratio = (None, None) if ov is None else ov
    if bits is not None:
        spec = _with_traced_bits(spec, bits)
    x32 = x.astype(_F32)
    xv, axes = to_view(x32, spec.granularity)
    scale, zp, tscale, clip = _qparams(xv, axes, spec, noise, given_range, clip_ratio)
    xe, eff, inv, zpe, ne, back = _in_input_shape(x32, xv, spec, scale, zp, tscale, noise)
    r = _grid_values(xe, eff, zpe, None, spec, ne, inv)
    y = _reconstruct(r, eff, zpe, None)
    return back(y).astype(x.dtype), clip


@functools.partial(jax.jit, static_argnums=1)
def _fake_quant_jit(x, spec, noise, given_range, ov=None):
    return _fake_quant(x, spec, noise, given_range, ov)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fake_quant(x, spec, noise, given_range, ov):
    return _fq_forward(x, spec, noise, given_range, ov)[0]


def _mask_free(spec: QuantSpec, given_range, ov=None) -> bool:
    """True when the clipped STE is the identity on finite inputs: absmax and min-max ranges
    contain every finite value by construction, so no mask needs computing in the backward pass
    (a non-finite input then passes its gradient unchanged). A ``clip_ratio`` override shrinks
    the range, so it needs the mask."""
    if spec.ste == "identity":
        return True
    clipped = ov is not None and ov[1] is not None
    return given_range is None and not clipped and isinstance(spec.range, (Absmax, MinMax))


def _fake_quant_fwd(x, spec, noise, given_range, ov):
    y, clip = _fq_forward(x, spec, noise, given_range, ov)
    if _mask_free(spec, given_range, ov):
        return y, (None, None, given_range)
    # keep x and the (small) clip range, not a full-size mask: x is alive for the matmul's
    # backward anyway, and the mask is one fused comparison to recompute
    return y, (x, clip, given_range)


def _fake_quant_bwd(spec, res, g):
    x, clip, given_range = res
    zero_range = None if given_range is None else jax.tree.map(jnp.zeros_like, given_range)
    if x is None:  # mask-free (see _mask_free)
        return g, None, zero_range, None
    lo, hi = clip
    xv, _ = to_view(x.astype(_F32), spec.granularity)
    inside = (xv >= lo) & (xv <= hi)
    gx = jnp.where(from_view(inside, spec.granularity, x.shape), g, jnp.zeros_like(g))
    return gx, None, zero_range, None


_fake_quant.defvjp(_fake_quant_fwd, _fake_quant_bwd)


def fake_quant(x, spec, *, key=None, bits=None, clip_ratio=None):
    """Quantize and dequantize in one step, with a straight-through gradient.

    The forward value is bit-identical to ``dequantize(quantize(x, spec, key=key))``. The
    gradient is 1 inside the clip range ``[lo, hi]`` that the range method chose (absmax:
    ``[-absmax, absmax]``, so nothing finite is masked; ``fixed(-1,1)``: ``[-1, 1]``; MSE and
    percentile: the searched range), boundary included (``x == hi`` passes its gradient), and
    0 outside it; with ``spec.ste == "identity"`` it is 1 everywhere. For absmax and min-max
    ranges, which contain every finite input, the backward pass is the identity and computes
    no mask (so a non-finite input passes its gradient unchanged). Scales computed from ``x`` are treated as
    constants (no gradient flows through the range statistics).

    ``bits`` and ``clip_ratio`` may be traced values (``jax.vmap`` over variants of one compiled
    program): ``bits`` (integer formats only, 1..8; 2..8 narrow) replaces the format's bit width,
    keeping its signedness and narrow range (qmin / qmax derived from it); ``clip_ratio`` (in
    (0, 1]) multiplies the chosen range (absmax, min-max, ...), and the gradient mask follows
    that range (finite inputs outside it get 0; a non-finite input gets 0 too). With a concrete
    ``bits`` equal to the spec's and no ``clip_ratio``, the result is bit-identical to the plain call.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.array([0.3, -2.0, 1.0])
        >>> jax.grad(lambda v: fake_quant(v, "int8/fixed(-1,1)").sum())(x).tolist()
        [1.0, 0.0, 1.0]
        >>> fake_quant(x, "int8", bits=2).tolist()   # the int2 grid {-2, -1, 0, 1} * 2.0
        [0.0, -2.0, 0.0]
    """
    spec = as_spec(spec)
    x = _check_input(x)
    ov = _overrides(spec, bits, clip_ratio, "fake_quant")
    noise = _noise(key, spec.granularity.view(x.shape)[0], spec)
    return _fake_quant_jit(x, spec, noise, None, ov)


def fake_quant_range(x, spec, lo, hi, *, key=None, bits=None, clip_ratio=None):
    """``fake_quant`` with a clip range given from outside (e.g. an EMA of activation ranges)
    instead of the spec's range method. ``lo``/``hi`` broadcast against the scale shape of
    ``spec``'s granularity (scalars for per-tensor); symmetric specs use ``max(-lo, hi)``.
    The gradient reaches ``x`` inside ``[lo, hi]`` (none flows to the range: it is a statistic).
    ``bits`` / ``clip_ratio``: traced overrides as in :func:`fake_quant` (the range is scaled by ``clip_ratio``).

    Example:
        >>> import jax.numpy as jnp
        >>> fake_quant_range(jnp.array([1.2, 9.0]), "int4/s=f32", -7.0, 7.0).tolist()
        [1.0, 7.0]
    """
    spec = as_spec(spec)
    x = _check_input(x)
    noise = _noise(key, spec.granularity.view(x.shape)[0], spec)
    ov = _overrides(spec, bits, clip_ratio, "fake_quant_range")
    return _fake_quant_jit(x, spec, noise, (jnp.asarray(lo, _F32), jnp.asarray(hi, _F32)), ov)


def quant_error(x, spec, *, key=None):
    """Mean squared error of ``fake_quant(x, spec)`` against ``x`` (finite entries).

    Example:
        >>> import jax.numpy as jnp
        >>> float(quant_error(jnp.zeros(8), "int4"))
        0.0
    """
    x = jnp.asarray(x)
    y = fake_quant(x, spec, key=key)
    d = jnp.where(jnp.isfinite(x), (y.astype(_F32) - x.astype(_F32)) ** 2, 0.0)
    return jnp.mean(d)


def sqnr_db(x, y):
    """Signal-to-quantization-noise ratio of ``y`` against reference ``x``, in dB.

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(sqnr_db(jnp.ones(4), jnp.ones(4) * 1.01)), 1)
        40.0
    """
    x = jnp.asarray(x, _F32)
    y = jnp.asarray(y, _F32)
    sig = jnp.sum(x**2)
    noise = jnp.sum((x - y) ** 2)
    return 10 * jnp.log10(sig / jnp.maximum(noise, 1e-30))

