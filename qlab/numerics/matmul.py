"""Integer matmul of quantized operands, with the gradients of the fake-quant matmul.

A W8A8-style linear layer computes ``fake_quant(x) @ fake_quant(w)``. When both operands are symmetric
integers with absmax ranges and their scales factor out of the contraction (per tensor, or per row of ``x``
and per column of ``w``), that product equals ``(codes_x @ codes_w) * s_x * s_w``; the integer product is
exact (int32 accumulation) and the CPU and GPU integer units run it faster than the float32 product.
:func:`quantized_matmul` computes the forward pass that way; its backward pass is the one of the fake-quant
product with straight-through quantizers (absmax ranges clip nothing, so the STE is the identity):
``dx = g @ fq(w).T``, ``dw = fq(x).T @ g``. The forward differs from the float32 fake-quant product only by
float32 rounding in the accumulation (the integer sum is the exact one).

Example:
    >>> import jax, jax.numpy as jnp
    >>> from qlab.numerics import fake_quant
    >>> x = jax.random.normal(jax.random.key(0), (8, 64)); w = jax.random.normal(jax.random.key(1), (64, 16))
    >>> y = quantized_matmul(x, w, "int8", "int8/ch1")
    >>> ref = fake_quant(x, "int8") @ fake_quant(w, "int8/ch1")
    >>> bool(jnp.allclose(y, ref, rtol=1e-5, atol=1e-5))
    True
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qlab.numerics.granularity import PerChannel, PerTensor
from qlab.numerics.quantize import QTensor, dequantize, quantize
from qlab.numerics.spec import QuantSpec, as_spec, plain_absmax_int

__all__ = ["int_matmul_supported", "quantized_matmul", "quantized_matmul_codes"]

_DN = (((1,), (0,)), ((), ()))


def int_matmul_supported(spec, scale_axis: int) -> bool:
    """Whether ``spec`` quantizes an operand so that :func:`quantized_matmul` applies: a symmetric integer
    of at most 8 bits (static width), absmax range, round to nearest, one f32/f16/bf16 scale per tensor or
    per ``scale_axis`` (0: rows of ``x``; 1: columns of ``w``).

    Example:
        >>> int_matmul_supported("int8/ch1", 1), int_matmul_supported("int4/g128", 1)
        (True, False)
    """
    s = as_spec(spec)
    g = s.granularity
    return (
        plain_absmax_int(s)
        and (s.fmt.signed or s.fmt.bits <= 7)  # codes fit int8
        and (isinstance(g, PerTensor) or isinstance(g, PerChannel) and g.axis == scale_axis)
    )


def _check(xshape, wshape, xs: QuantSpec, ws: QuantSpec):
    if len(xshape) != 2 or len(wshape) != 2 or xshape[1] != wshape[0]:
        raise ValueError(f"quantized_matmul: x must be [M, K] and w [K, N], got {tuple(xshape)} and {tuple(wshape)}")
    for name, s, ax in (("x_spec", xs, 0), ("w_spec", ws, 1)):
        if not int_matmul_supported(s, ax):
            raise ValueError(f"quantized_matmul: {name} = {str(s)!r} is not supported: it needs a symmetric int1..int8 "
                             f"absmax spec, round to nearest, per tensor or per channel on axis {ax}")


def _int_product(cx, sx, cw, sw):
    acc = jax.lax.dot_general(cx.astype(jnp.int8), cw.astype(jnp.int8), _DN, preferred_element_type=jnp.int32)
    return acc.astype(jnp.float32) * sx.astype(jnp.float32) * sw.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _qmm(x, w, xs, ws):
    return _qmm_fwd(x, w, xs, ws)[0]


def _qmm_fwd(x, w, xs, ws):
    # The residuals are the codes and scales, not the fake-quant values: a quarter of the bytes
    # for int8, and the forward writes nothing but the codes. The backward dequantizes them.
    qx, qw = quantize(x, xs), quantize(w, ws)
    return _int_product(qx.codes, qx.scale, qw.codes, qw.scale), (qx, qw)


def _qmm_bwd(xs, ws, res, g):
    fx, fw = (dequantize(q) for q in res)
    return (g @ fw.T).astype(fx.dtype), (fx.T @ g).astype(fw.dtype)


_qmm.defvjp(_qmm_fwd, _qmm_bwd)


def quantized_matmul(x, w, x_spec, w_spec):
    """``fake_quant(x, x_spec) @ fake_quant(w, w_spec)`` computed on the integer codes (``x``: [M, K] float32,
    ``w``: [K, N] float32), with straight-through gradients to ``x`` and ``w`` (module docstring).

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[127.0, -3.2, 10.0]]); w = jnp.array([[1.0], [2.0], [-1.0]])
        >>> quantized_matmul(x, w, "int8", "int8/ch1").tolist()  # (codes [127, -3, 10] . [64, 127, -64]) * 2/127
        [[111.9144287109375]]
    """
    xs, ws = as_spec(x_spec), as_spec(w_spec)
    _check(x.shape, w.shape, xs, ws)
    return _qmm(x, w, xs, ws)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _qmm_codes(x, xs, cw, sw):
    return _qmm_codes_fwd(x, xs, cw, sw)[0]


def _qmm_codes_fwd(x, xs, cw, sw):
    qx = quantize(x, xs)
    return _int_product(qx.codes, qx.scale, cw, sw), (cw, sw)


def _qmm_codes_bwd(xs, res, g):
    cw, sw = res
    fw = cw.astype(jnp.float32) * sw.astype(jnp.float32)
    return (g @ fw.T), None, None


_qmm_codes.defvjp(_qmm_codes_fwd, _qmm_codes_bwd)


def quantized_matmul_codes(x, x_spec, qw: QTensor):
    """As :func:`quantized_matmul` for a weight already held as codes + scales (a converted layer):
    ``fake_quant(x, x_spec) @ dequantize(qw)`` on the integer codes; gradient to ``x`` only.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics import quantize
        >>> x = jnp.array([[127.0, -3.2, 10.0]]); w = jnp.array([[1.0], [2.0], [-1.0]])
        >>> bool(quantized_matmul_codes(x, "int8", quantize(w, "int8/ch1")) == quantized_matmul(x, w, "int8", "int8/ch1"))
        True
    """
    xs = as_spec(x_spec)
    _check(x.shape, qw.shape, xs, qw.spec)
    return _qmm_codes(x, xs, qw.codes, qw.scale)
