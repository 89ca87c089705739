"""quantize / dequantize / fake_quant / fake_quant_range: the ops, their straight-through gradient,
traced bit-width overrides, and the dispatch between the XLA path and the optional CPU kernel.

The range and scale rules they apply live in ``qlab.numerics.ranges``; the QTensor they return in
``qlab.numerics.qtensor``; error metrics in ``qlab.numerics.metrics``.

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
import functools

import jax
import jax.numpy as jnp
import numpy as np

from qlab.numerics import native
from qlab.numerics.formats import IntFormat
from qlab.numerics.granularity import PerChannel, PerGroup, PerTensor, from_view, to_view
from qlab.numerics.qtensor import QTensor
from qlab.numerics.ranges import (
    clip_range,
    code_params,
    effective_scale,
    grid_values,
    reciprocal,
    reconstruct,
    scale_and_zero_point,
    tensor_scale,
    widen_range,
)
from qlab.numerics.spec import Absmax, MinMax, QuantSpec, as_spec

__all__ = ["QTensor", "quantize", "dequantize", "dequantize_rows", "fake_quant", "fake_quant_range", "quantize_xla",
           "fake_quant_xla", "check_overrides", "TracedIntFormat"]

_F32 = jnp.float32


# ---------------------------------------------------------------------------------------
# Core


def _qparams(xv, axes, spec: QuantSpec, noise, given_range=None, clip_ratio=None):
    """(scale, zero_point, tensor_scale, clip range, code params) for the grouped view ``xv``;
    code params are ``ranges.code_params`` for ``code_scale="f32"`` specs, else None.

    The clip range ``(lo, hi)`` is where the straight-through gradient passes; an unsigned
    symmetric format clips at 0 from below. ``given_range`` skips the range method;
    ``clip_ratio`` (a possibly traced scalar) multiplies the range that was chosen.
    """
    tscale = tensor_scale(xv, spec) if spec.tensor_scale else None
    if given_range is None:
        lo, hi = clip_range(xv, axes, spec, tscale)
    else:
        lo, hi = (jnp.asarray(v, _F32) for v in given_range)
        if spec.symmetric and spec.absmax_to != "signed_extreme":
            a = jnp.maximum(-lo, hi)
            lo, hi = -a, a
        elif not spec.symmetric:
            lo, hi = widen_range(lo, hi, spec)
    if clip_ratio is not None:
        lo, hi = lo * clip_ratio, hi * clip_ratio
    scale, zp = scale_and_zero_point(lo, hi, spec, tscale)
    code = code_params(lo, hi, spec) if spec.code_scale == "f32" else None
    if spec.symmetric and isinstance(spec.fmt, IntFormat) and not spec.fmt.signed:
        lo = jnp.zeros_like(lo)
    return scale, zp, tscale, (lo, hi), code


def _materialize(v):
    """``v`` unchanged (``v / 1.0`` is exact; NaN stays NaN), but behind a division, which XLA
    counts as expensive and so will not fuse into a consumer that reuses each element: a small
    per-group array (the stored f16/bf16/e4m3 scale, the zero point) is then computed once,
    instead of its clip/convert chain being recomputed for every element of ``x`` in the
    elementwise pass (~25% of that pass on XLA:CPU, ``benchmarks/fake_quant.py``)."""
    return v / jnp.where(jnp.isnan(v), 2.0, 1.0)


def _in_input_shape(x32, xv, spec, scale, zp, tscale, noise, code=None):
    """Broadcast the scale, its reciprocal (and zero point, noise) back to the input's own shape
    when no padding is involved, so the elementwise pass reads ``x`` without a reshaped view:
    XLA:CPU then writes the result in place of a donated input instead of copying it. The
    arithmetic is unchanged, so values are bit-identical to the grouped-view path.

    ``code``: ``(1 / scale, zero point)`` that codes are computed with, when they are not the
    stored ones (``code_scale="f32"``).

    Returns ``(x, scale, 1 / effective scale for codes, zero point for codes, zero point, noise,
    back)`` where ``back`` maps results to ``x``'s shape; values are ``reconstruct(codes, scale,
    zero point, tscale)`` (the tensor scale multiplies last).
    """
    eff = effective_scale(scale, tscale)
    padded = spec.granularity.view(x32.shape)[2]
    if padded != tuple(x32.shape):
        inv, czp = (reciprocal(eff), zp) if code is None else code
        return xv, scale, inv, czp, zp, noise, lambda v: from_view(v, spec.granularity, x32.shape)

    def expand(v):
        return None if v is None else jnp.broadcast_to(v, xv.shape).reshape(x32.shape)

    m = _materialize(eff)
    s = m if tscale is None else _materialize(scale)
    zpe = None if zp is None else expand(_materialize(zp))
    nz = None if noise is None else noise.reshape(x32.shape)
    if code is None:
        return x32, expand(s), expand(reciprocal(m)), zpe, zpe, nz, lambda v: v
    inv, czp = code
    return x32, expand(s), expand(_materialize(inv)), expand(czp), zpe, nz, lambda v: v


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
    # whether the kernel can be built is decided when lowering for CPU (native.dispatch), not here
    view = None if noise is not None else native.kernel_view(spec, x.shape, x.dtype)
    if view is None:
        return _quantize_xla(x, spec, noise)

    def xla(v):
        q = _quantize_xla(v, spec, None)
        return q.codes, q.scale

    codes, scale = native.dispatch(xla, lambda v: native.quantize_cpu(v, spec, view), x)
    return QTensor(codes, scale, None, None, spec, tuple(x.shape), x.dtype)




def _quantize_xla(x, spec: QuantSpec, noise) -> QTensor:
    x32 = x.astype(_F32)
    xv, axes = to_view(x32, spec.granularity)
    scale, zp, tscale, _, code = _qparams(xv, axes, spec, noise)
    xe, _, inv, czp, zpe, ne, back = _in_input_shape(x32, xv, spec, scale, zp, tscale, noise, code)
    r = grid_values(xe, None, czp, None, spec, ne, inv)
    r = jnp.where(jnp.isnan(r), 0.0 if zpe is None or spec.zero_point == "min" else zpe, r)
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


def dequantize_rows(q: QTensor, ids):
    """``dequantize(q)[ids]`` for a 2-D QTensor (an embedding table), dequantizing only the gathered rows
    when each scale covers part of one row or is shared by all rows (per tensor, per row ``ch0``, per
    column ``ch1``, groups along the row ``g<G>a1``): the codes and their scales are gathered first. Other
    layouts (groups or blocks spanning rows) dequantize the whole table, then gather.

    Example:
        >>> import jax.numpy as jnp
        >>> q = quantize(jnp.arange(32.0).reshape(4, 8), "int4/g4a1")
        >>> ids = jnp.array([[3, 0]])
        >>> bool((dequantize_rows(q, ids) == dequantize(q)[ids]).all()), dequantize_rows(q, ids).shape
        (True, (1, 2, 8))
    """
    if len(q.shape) != 2:
        raise ValueError(f"dequantize_rows: needs a 2-D QTensor (rows x features), got shape {q.shape}")
    ids = jnp.asarray(ids)
    g = q.spec.granularity
    n_rows = q.shape[0]

    def take(a):  # a per-row array (leading dim = rows) is gathered; a shared one is kept
        return a if a is None or a.shape[0] == 1 else jnp.take(a, ids.reshape(-1), axis=0)

    separable = (isinstance(g, PerTensor) or isinstance(g, PerChannel)
                 or (isinstance(g, PerGroup) and g.axis == 1))
    if not separable or n_rows == 1:
        return jnp.take(dequantize(q), ids, axis=0)
    rows = QTensor(take(q.codes), take(q.scale), take(q.zero_point), q.tensor_scale, q.spec,
                   (int(ids.size), q.shape[1]), q.dtype)
    return dequantize(rows).reshape(ids.shape + (q.shape[1],))


@jax.jit
def _dequantize(q: QTensor):
    spec = q.spec
    cv, _ = to_view(q.codes, spec.granularity)
    r = spec.fmt.decode(cv)
    y = reconstruct(r, q.scale, q.zero_point, q.tensor_scale, spec.zero_point)
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


def check_overrides(spec: QuantSpec, bits, clip_ratio, where: str):
    """The ``bits`` / ``clip_ratio`` overrides of :func:`fake_quant`, validated against ``spec``
    (concrete values only; traced ones pass as they are): ``(bits int32, clip_ratio f32)`` with
    None entries allowed, or None when both are None. ``where`` names the caller in error messages.

    Example:
        >>> from qlab.numerics.spec import parse_spec
        >>> bits, ratio = check_overrides(parse_spec("int8"), 4, None, "demo")
        >>> int(bits), ratio
        (4, None)
        >>> check_overrides(parse_spec("int8"), None, None, "demo") is None
        True
    """
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
    common specs on arrays where it is the faster path (``native.fake_quant_view``; bit-identical;
    it returns no clip range: those specs are mask-free)."""
    plain = noise is None and ov is None and given_range is None
    view = native.fake_quant_view(spec, x.shape, x.dtype) if plain else None
    if view is not None:
        (y,) = native.dispatch(lambda v: (_fq_xla(v, spec, None)[0],),
                               lambda v: (native.fake_quant_cpu(v, spec, view),), x)
        return y, None
    return _fq_xla(x, spec, noise, given_range, ov)


def _fq_xla(x, spec: QuantSpec, noise, given_range=None, ov=None):
    bits, clip_ratio = (None, None) if ov is None else ov
    if bits is not None:
        spec = _with_traced_bits(spec, bits)
    x32 = x.astype(_F32)
    xv, axes = to_view(x32, spec.granularity)
    scale, zp, tscale, clip, code = _qparams(xv, axes, spec, noise, given_range, clip_ratio)
    xe, se, inv, czp, zpe, ne, back = _in_input_shape(x32, xv, spec, scale, zp, tscale, noise, code)
    r = grid_values(xe, None, czp, None, spec, ne, inv)
    y = reconstruct(r, se, zpe, tscale, spec.zero_point)
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
    ov = check_overrides(spec, bits, clip_ratio, "fake_quant")
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
    ov = check_overrides(spec, bits, clip_ratio, "fake_quant_range")
    return _fake_quant_jit(x, spec, noise, (jnp.asarray(lo, _F32), jnp.asarray(hi, _F32)), ov)


def quantize_xla(x, spec) -> QTensor:
    """``quantize(x, spec)`` computed by the XLA path alone, on every platform: the reference that
    optional backends (the CPU kernel, ``qlab.numerics.native``) match bit for bit.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[0.1, -0.5, 0.25, 1.0]])
        >>> bool((quantize_xla(x, "int4/ch0").codes == quantize(x, "int4/ch0").codes).all())
        True
    """
    return _quantize_xla_jit(_check_input(x), as_spec(spec))


def fake_quant_xla(x, spec):
    """The forward value of ``fake_quant(x, spec)`` computed by the XLA path alone, on every platform
    (deterministic rounding; no gradient rule): the reference the CPU kernel matches bit for bit.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[0.1, -0.5, 0.25, 1.0]])
        >>> bool((fake_quant_xla(x, "int4/ch0") == fake_quant(x, "int4/ch0")).all())
        True
    """
    return _fake_quant_xla_jit(_check_input(x), as_spec(spec))


@functools.partial(jax.jit, static_argnums=1)
def _quantize_xla_jit(x, spec: QuantSpec) -> QTensor:
    return _quantize_xla(x, spec, None)


@functools.partial(jax.jit, static_argnums=1)
def _fake_quant_xla_jit(x, spec: QuantSpec):
    return _fq_xla(x, spec, None)[0]

