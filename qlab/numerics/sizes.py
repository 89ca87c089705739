"""Honest memory, counted: how many scales a spec stores, and the bits and bytes a quantized tensor
takes once packed (``qlab.numerics.packing`` writes exactly that many bytes).

Example:
    >>> bits_per_weight("int4/g128", (4096, 4096))   # 4-bit codes + one 16-bit scale per 128
    4.125
"""

from __future__ import annotations

import math

from qlab.numerics.spec import QuantSpec, as_spec

__all__ = ["scale_count", "bits_per_weight", "packed_nbytes"]


def scale_count(spec, shape) -> int:
    """Number of scales (= zero points, when asymmetric) ``spec`` stores for ``shape``.

    Example:
        >>> scale_count("int8/ch", (64, 32))
        32
    """
    spec = as_spec(spec)
    vshape, axes, _ = spec.granularity.view(tuple(shape))
    return math.prod(1 if i in axes else s for i, s in enumerate(vshape))


def _parts_bits(spec: QuantSpec, shape):
    n = math.prod(shape)
    ns = scale_count(spec, shape)
    codes = n * spec.bits
    scales = ns * spec.scale_bits
    zps = ns * spec.zero_point_bits
    ts = 32 if spec.tensor_scale else 0
    return codes, scales, zps, ts


def bits_per_weight(spec, shape) -> float:
    """Stored bits per element: codes plus scales, zero points and any tensor scale.

    Example:
        >>> bits_per_weight("mxfp4", (128, 4096))
        4.25
        >>> bits_per_weight("int4/g128/asym", (128, 4096))
        4.15625
    """
    spec = as_spec(spec)
    n = math.prod(shape)
    if n == 0:
        raise ValueError("bits_per_weight: shape has no elements")
    return sum(_parts_bits(spec, tuple(shape))) / n


def packed_nbytes(spec, shape) -> int:
    """Bytes of ``pack_qtensor`` output for a tensor of ``shape`` under ``spec``.

    Example:
        >>> packed_nbytes("int4/g128", (4096, 4096))   # 8 MiB of codes + 256 KiB of scales
        8650752
    """
    spec = as_spec(spec)
    codes, scales, zps, ts = _parts_bits(spec, tuple(shape))
    return math.ceil(codes / 8) + scales // 8 + math.ceil(zps / 8) + ts // 8
