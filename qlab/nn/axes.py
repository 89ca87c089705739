"""Which axis of a weight or matmul operand is the output channel, and which is contracted.

Unresolved specs (``axis=None`` granularities) are resolved per tensor from these two axes:
per-channel scales run along the *channel* axis, groups along the *contraction* axis
(``spec.resolve(channel_axis, contract_axis)``). Both the layer wrapper
(:class:`qlab.nn.QuantizedLayer`) and call-site interception (:mod:`qlab.nn.call_sites`) use them.

Example:
    >>> weight_axes("linear", None, (16, 4))      # nnx.Linear kernel [in, out]
    (1, 0)
    >>> einsum_axes("btd,dnh->btnh", 1, 3)        # the weight: channel h, contracts d
    (2, 0)
"""

from __future__ import annotations

__all__ = ["einsum_axes", "dot_general_axes", "matmul_axes", "weight_axes"]


def einsum_axes(eq: str, operand: int, ndim: int) -> tuple[int, int]:
    """``(channel_axis, contract_axis)`` of operand 0 or 1 of a two-operand einsum ``eq``.

    The contraction axis is the first of the operand's letters summed over; the channel axis is the
    last letter kept in the output that the other operand lacks. Equations this cannot read
    (ellipses, no ``->``) fall back to the last two axes.

    Example:
        >>> einsum_axes("btd,dnh->btnh", 0, 3)        # the activation: channel t, contracts d
        (1, 2)
        >>> einsum_axes("ij,jk", 1, 2)                # no "->": the fallback
        (1, 0)
    """
    try:
        lhs, out = eq.replace(" ", "").split("->")
        a, b = lhs.split(",")
    except ValueError:
        return ndim - 1, max(ndim - 2, 0)
    if "." in a or "." in b:
        return ndim - 1, (ndim - 2 if operand == 1 else ndim - 1)
    me, other = (a, b) if operand == 0 else (b, a)
    contract = [i for i, c in enumerate(me) if c in other and c not in out]
    free = [i for i, c in enumerate(me) if c in out and c not in other]
    ct = contract[0] if contract else ndim - 1
    ch = free[-1] if free else (ndim - 1 if ct != ndim - 1 else 0)
    return ch, ct


def dot_general_axes(dimension_numbers, operand: int, ndim: int) -> tuple[int, int]:
    """``(channel_axis, contract_axis)`` of operand 0 (lhs) or 1 (rhs) of ``lax.dot_general``: the
    first contracted axis, and the last axis (or axis 0 when the last one is contracted).

    Example:
        >>> dot_general_axes((((1,), (0,)), ((), ())), 1, 2)   # x @ w
        (1, 0)
    """
    (lc, rc), _ = dimension_numbers
    c = lc if operand == 0 else rc
    ct = c[0] % ndim if c else ndim - 1
    ch = ndim - 1 if ct != ndim - 1 else 0
    return ch, ct


def matmul_axes(operand: int, ndim: int) -> tuple[int, int]:
    """``(channel_axis, contract_axis)`` of operand 0 or 1 of ``jnp.matmul`` / ``jnp.dot``: rows of
    ``a`` contract their last axis; ``b`` contracts its second-to-last axis, channels last.

    Example:
        >>> matmul_axes(0, 2), matmul_axes(1, 2)
        ((0, 1), (1, 0))
    """
    if operand == 0:
        return max(ndim - 2, 0), ndim - 1
    return ndim - 1, max(ndim - 2, 0)


def weight_axes(kind: str, layer, shape) -> tuple[int, int]:
    """``(channel_axis, contract_axis)`` of the weight of a Flax layer of ``kind`` (``"linear"``,
    ``"conv"``, ``"embed"`` or ``"einsum"``; an ``nnx.Einsum`` is read from its ``einsum_str``).

    Example:
        >>> weight_axes("conv", None, (3, 3, 8, 16))   # [kh, kw, in, out]
        (3, 2)
        >>> weight_axes("embed", None, (100, 8))       # one row per token
        (0, 1)
    """
    nd = len(shape)
    if kind == "linear":
        return 1, 0
    if kind == "conv":
        return nd - 1, nd - 2
    if kind == "embed":
        return 0, 1
    eq = getattr(layer, "einsum_str", None)
    if eq:
        return einsum_axes(eq, 1, nd)
    return nd - 1, 0
