"""Learned quantizers: LSQ, LSQ+ and PACT, as pure functions of plain arrays.

Their parameters (step size, offset, clip) are ordinary arrays here; ``qlab.nn`` stores them
as Flax variables so optax trains them.

* LSQ (Esser et al., 2020): ``y = clip(round(x/s), Qn, Qp) * s``, straight-through rounding,
  the step's gradient scaled by ``g = 1/sqrt(N * Qp)``; initial step ``2*mean|x|/sqrt(Qp)``.
* LSQ+ (Bhalgat et al., 2020): a learned offset ``b``: ``y = clip(round((x-b)/s), Qn, Qp)*s + b``.
* PACT (Choi et al., 2018): a learned clip ``alpha``: ``y = quant(clip(x, 0, alpha))`` with
  ``alpha / Qp`` as the step; ``d y / d alpha`` is 1 where ``x >= alpha``.

Example:
    >>> import jax.numpy as jnp
    >>> w = jnp.array([0.1, -0.4, 0.8])
    >>> s = lsq_init_step(w, "int4")
    >>> lsq_fake_quant(w, s, "int4").shape
    (3,)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qlab.numerics.formats import IntFormat, get_format

__all__ = [
    "round_ste",
    "scale_grad",
    "lsq_init_step",
    "lsq_fake_quant",
    "lsq_grad_scale",
    "pact_fake_quant",
]


def round_ste(x):
    """Round to nearest even with an identity (straight-through) gradient.

    Example:
        >>> import jax
        >>> float(jax.grad(round_ste)(1.3))
        1.0
    """
    return x + jax.lax.stop_gradient(jnp.round(x) - x)


@jax.custom_vjp
def scale_grad(x, g):
    """Identity in the forward pass (bit-exact); multiplies the gradient by ``g`` in the
    backward pass. ``g`` may be traced (e.g. a per-variant LSQ gradient scale); it gets no gradient.

    Example:
        >>> import jax
        >>> float(jax.grad(lambda v: scale_grad(v, 0.5))(2.0))
        0.5
    """
    return x


def _scale_grad_fwd(x, g):
    return x, g


def _scale_grad_bwd(g, ct):
    return (ct * g).astype(ct.dtype), None


scale_grad.defvjp(_scale_grad_fwd, _scale_grad_bwd)


def _int_fmt(fmt) -> IntFormat:
    f = get_format(fmt)
    if not isinstance(f, IntFormat):
        raise ValueError(f"LSQ/PACT fmt: integer formats only (int1..int8, uint1..uint8), got {f.name}")
    return f


def lsq_init_step(x, fmt, axis=None):
    """LSQ's initial step ``2 * mean(|x|) / sqrt(Qp)`` (per channel when ``axis`` is given:
    the mean runs over every other axis).

    Example:
        >>> import jax.numpy as jnp
        >>> float(lsq_init_step(jnp.array([1.0, -1.0]), "int3"))   # Qp = 3
        1.1547005...
    """
    f = _int_fmt(fmt)
    qp = max(f.qmax, 1)
    a = jnp.abs(jnp.asarray(x, jnp.float32))
    if axis is None:
        m = jnp.mean(a)
    else:
        axes = tuple(i for i in range(a.ndim) if i != axis % a.ndim)
        m = jnp.mean(a, axis=axes, keepdims=True)
    return jnp.maximum(2 * m / math.sqrt(qp), 1e-8)


def lsq_grad_scale(x, step, fmt) -> float:
    """LSQ's gradient scale ``1/sqrt(N * Qp)``, N = elements sharing one step.

    Example:
        >>> import jax.numpy as jnp
        >>> round(lsq_grad_scale(jnp.zeros((4, 4)), jnp.ones(()), "int4"), 4)   # 1/sqrt(16*7)
        0.0945
    """
    f = _int_fmt(fmt)
    n = max(1, int(jnp.size(x)) // max(1, int(jnp.size(step))))
    return 1.0 / math.sqrt(n * max(f.qmax, 1))


def lsq_fake_quant(x, step, fmt, *, offset=None, grad_scale=None):
    """LSQ (or LSQ+ with ``offset``) fake quantization; gradients reach ``x``, ``step`` and
    ``offset``. The step is kept positive by taking its absolute value (plus a tiny floor).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> g = jax.grad(lambda s: lsq_fake_quant(jnp.array([0.33, 5.0]), s, "int4").sum())(0.1)
        >>> bool(g != 0)
        True
    """
    f = _int_fmt(fmt)
    x = jnp.asarray(x)
    gs = lsq_grad_scale(x, step, f) if grad_scale is None else grad_scale
    s = scale_grad(jnp.abs(jnp.asarray(step, jnp.float32)) + 1e-12, gs)
    xf = x.astype(jnp.float32)
    if offset is not None:
        b = scale_grad(jnp.asarray(offset, jnp.float32), gs)
        xf = xf - b
    v = jnp.clip(xf / s, f.qmin, f.qmax)
    y = round_ste(v) * s
    if offset is not None:
        y = y + b
    return y.astype(x.dtype)


def pact_fake_quant(x, alpha, fmt="uint8"):
    """PACT: clip to ``[0, alpha]`` (or ``[-alpha, alpha]`` for a signed format) and quantize
    with step ``alpha / Qp``. The gradient reaches ``alpha`` from the clipped region.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.array([0.5, 3.0])
        >>> float(jax.grad(lambda a: pact_fake_quant(x, a, "uint4").sum())(2.0))
        1.0
    """
    f = _int_fmt(fmt)
    x = jnp.asarray(x)
    a = jnp.abs(jnp.asarray(alpha, jnp.float32)) + 1e-12
    lo = -a if f.signed else jnp.zeros_like(a)
    xc = jnp.clip(x.astype(jnp.float32), lo, a)
    # the paper's gradient: d y / d alpha = 1 where x is clipped, 0 inside the range
    step = jax.lax.stop_gradient(a / max(f.qmax, 1))
    y = round_ste(xc / step) * step
    return y.astype(x.dtype)
