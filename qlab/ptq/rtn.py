"""Round-to-nearest (RTN) for a layer kernel, plus the small helpers every PTQ algorithm shares.

Kernels are Flax layout ``(in, out)``: the contraction axis is 0 and the channel axis is 1, so a
per-channel spec gets one scale per output column and ``g128`` groups 128 consecutive *input* rows
of one output column (``spec.resolve(channel_axis=1, contract_axis=0)``).

Every algorithm in ``qlab.ptq`` returns a :class:`qlab.QTensor` whose ``dequantize`` is the weight the
layer uses, so memory is always counted by ``qlab.packed_nbytes`` rules and nothing is stored twice.

Example:
    >>> import jax.numpy as jnp
    >>> W = jnp.linspace(-1, 1, 256 * 8).reshape(256, 8)
    >>> q = rtn(W, "int4/g128")
    >>> q.scale.shape        # (in / 128 groups, 1, out)
    (2, 1, 8)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qlab.numerics.formats import IntFormat
from qlab.numerics.granularity import PerChannel, PerGroup, PerTensor
from qlab.numerics.qtensor import QTensor
from qlab.numerics.quantize import quantize
from qlab.numerics.ranges import clip_range, code_params, grid_values, reconstruct, scale_and_zero_point, tensor_scale
from qlab.numerics.spec import QuantSpec, as_spec

__all__ = [
    "rtn",
    "resolve_weight_spec",
    "group_size",
    "group_params",
    "group_code_params",
    "grid_round",
    "qtensor_from_grid",
    "tensor_scale_of",
]

_F32 = jnp.float32


def resolve_weight_spec(spec, *, require_rows: bool = False) -> QuantSpec:
    """``spec`` (a QuantSpec or string) resolved for an ``(in, out)`` kernel.

    ``require_rows=True`` (GPTQ, HQQ, AWQ) additionally checks that every scale covers whole input
    rows of one output column or whole columns: per-tensor, per-channel on axis 1, or groups along
    axis 0 without padding; deterministic rounding only (``nearest``, ``half_away``, ``biased_trunc``).

    Example:
        >>> resolve_weight_spec("int4/g64").granularity
        PerGroup(size=64, axis=0, pad=False)
    """
    spec = as_spec(spec)
    if spec is None:
        raise ValueError("weight spec is None (keep float): nothing to quantize")
    spec = spec.resolve(channel_axis=1, contract_axis=0)
    if require_rows:
        g = spec.granularity
        ok = (
            isinstance(g, PerTensor)
            or (isinstance(g, PerChannel) and g.axis in (1, -1))
            or (isinstance(g, PerGroup) and g.axis == 0 and not g.pad)
        )
        if not ok:
            raise ValueError(
                f"spec {str(spec)!r}: this algorithm needs per-tensor, per-channel (output axis 1) or "
                f"per-group along the input axis 0 without padding; got {g!r}"
            )
        if spec.rounding == "stochastic":
            raise ValueError(f"spec {str(spec)!r}: rounding='stochastic' is not supported here; use rne, "
                             "half_away or biased_trunc")
    return spec


def group_size(spec: QuantSpec, n_in: int) -> int:
    """Input rows that share one scale: G for groups, ``n_in`` for per-channel and per-tensor.

    Example:
        >>> group_size(resolve_weight_spec("int4/g64"), 256), group_size(resolve_weight_spec("int8/ch"), 256)
        (64, 256)
    """
    g = spec.granularity
    if isinstance(g, PerGroup):
        if n_in % g.size:
            raise ValueError(f"group size {g.size} does not divide the input dimension {n_in}")
        return g.size
    return n_in


def group_params(rows, spec: QuantSpec, tscale=None, *, per_tensor: bool = False):
    """(scale, zero_point) of one scale group from its rows ``(G, out)``: shape ``(1, out)`` each (or
    ``(1, 1)`` for per-tensor), already rounded to their storage dtype, exactly as ``qlab.quantize``
    computes them (same range method, MSE search included). ``zero_point`` is None for symmetric specs.

    Example:
        >>> import jax.numpy as jnp
        >>> spec = resolve_weight_spec("int8/ch/s=f32")
        >>> s, z = group_params(jnp.array([[1.27, -2.54], [0.5, 0.0]]), spec)
        >>> s.tolist(), z
        ([[0.009999999776482582, 0.019999999552965164]], None)
    """
    xv = rows.astype(_F32)[None]  # (1, G, out)
    axes = (0, 1, 2) if per_tensor else (1,)
    lo, hi = clip_range(xv, axes, spec, tscale)
    s, z = scale_and_zero_point(lo, hi, spec, tscale)
    s = s.reshape(1, -1)
    return s, (None if z is None else z.reshape(1, -1))


def group_code_params(rows, spec: QuantSpec, *, per_tensor: bool = False):
    """``(1 / scale, zero point)`` that a ``code_scale="f32"`` spec computes the codes of one scale
    group ``rows (G, out)`` with (``qlab.numerics.ranges.code_params``: the float32 scale before
    storage rounding and, for ``zero_point="min"``, the float32 minimum), shape ``(1, out)`` each
    (zero point None without one); None for other specs.

    Example:
        >>> import jax.numpy as jnp
        >>> inv, zp = group_code_params(jnp.array([[1.27, -2.54], [0.5, 0.0]]), resolve_weight_spec("q8_0"))
        >>> inv.tolist(), zp
        ([[100.0, 50.0]], None)
    """
    if spec.code_scale != "f32":
        return None
    xv = rows.astype(_F32)[None]
    lo, hi = clip_range(xv, (0, 1, 2) if per_tensor else (1,), spec)
    inv, zp = code_params(lo, hi, spec)
    return inv.reshape(1, -1), (None if zp is None else zp.reshape(1, -1))


def grid_round(w, scale, zp, tscale, spec: QuantSpec, code=None):
    """(grid values r, dequantized value q) of ``w`` with the given scales (broadcasting), under
    ``spec``'s rounding and kind of zero point. ``code``: ``(1 / scale, zero point)`` that codes
    are computed with when they are not the stored ones (``code_scale="f32"``, see
    :func:`group_code_params`); values always use the stored scale and zero point.

    Example:
        >>> import jax.numpy as jnp
        >>> r, q = grid_round(jnp.array([[0.26, -9.0]]), 0.5, None, None, resolve_weight_spec("int4"))
        >>> r.tolist(), q.tolist()
        ([[1.0, -8.0]], [[0.5, -4.0]])
    """
    inv, czp = (None, zp) if code is None else code
    r = grid_values(w, scale, czp, tscale, spec, inv=inv)
    return r, reconstruct(r, scale, zp, tscale, spec.zero_point)


def qtensor_from_grid(r, scale_rows, zp_rows, tscale, spec: QuantSpec, dtype=np.float32) -> QTensor:
    """Assemble a QTensor from grid values ``r (in, out)`` and per-row scales ``(in, out)`` (or
    ``(1, out)``/``(1, 1)``) that are constant within each scale group (the view shape is taken from
    the group's first row).

    Example:
        >>> import jax.numpy as jnp
        >>> spec = resolve_weight_spec("int8/ch")
        >>> q = qtensor_from_grid(jnp.array([[1.0, -2.0], [3.0, 4.0]]), jnp.array([[0.5, 0.25]]), None, None, spec)
        >>> q.codes.tolist(), q.scale.shape
        ([[1, -2], [3, 4]], (1, 2))
    """
    n_in, n_out = r.shape
    g = spec.granularity
    codes = spec.fmt.encode(r)
    scale_rows = jnp.broadcast_to(scale_rows, (n_in, n_out)) if scale_rows.shape[0] == 1 else scale_rows
    if zp_rows is not None and zp_rows.shape[0] == 1:
        zp_rows = jnp.broadcast_to(zp_rows, (n_in, n_out))
    if isinstance(g, PerGroup):
        G = g.size
        scale = scale_rows[::G].reshape(n_in // G, 1, n_out)
        zp = None if zp_rows is None else zp_rows[::G].reshape(n_in // G, 1, n_out)
    elif isinstance(g, PerChannel):
        scale = scale_rows[:1]
        zp = None if zp_rows is None else zp_rows[:1]
    elif isinstance(g, PerTensor):
        scale = scale_rows[:1, :1]
        zp = None if zp_rows is None else zp_rows[:1, :1]
    else:  # pragma: no cover - guarded by resolve_weight_spec
        raise ValueError(f"unsupported granularity {g!r}")
    return QTensor(codes, scale.astype(_F32), None if zp is None else zp.astype(_F32), tscale, spec,
                   (n_in, n_out), np.dtype(dtype))


def tensor_scale_of(W, spec: QuantSpec):
    """The second-level per-tensor scale (NVFP4-style ``ts`` specs) or None.

    Example:
        >>> import jax.numpy as jnp
        >>> tensor_scale_of(jnp.ones((16, 4)), resolve_weight_spec("int8/ch")) is None
        True
    """
    return tensor_scale(W.astype(_F32), spec) if spec.tensor_scale else None


def rtn(W, spec) -> QTensor:
    """Round-to-nearest: ``qlab.quantize(W, spec)`` with the spec resolved for an ``(in, out)`` kernel.

    Example:
        >>> import jax.numpy as jnp
        >>> rtn(jnp.ones((64, 4)), "int8/ch").scale.shape
        (1, 4)
    """
    spec = resolve_weight_spec(spec)
    return _quantize_jit(jnp.asarray(W, _F32), spec)


_quantize_jit = jax.jit(quantize, static_argnames=("spec",))


def is_int_asym(spec: QuantSpec) -> bool:
    """True for an asymmetric integer spec (one with a zero point), which HQQ requires.

    Example:
        >>> is_int_asym(resolve_weight_spec("int4/g64/asym")), is_int_asym(resolve_weight_spec("int4/g64"))
        (True, False)
    """
    return isinstance(spec.fmt, IntFormat) and not spec.symmetric

