"""Honest memory: bit packing and the bytes a quantized tensor really takes.

Codes of ``b`` bits are packed little-endian into a contiguous bit stream: element ``i``
occupies stream bits ``[i*b, (i+1)*b)``, bit 0 of a byte being its least significant bit.
A packed QTensor is ``codes | scales | zero points | tensor scale``, each part packed on its
own: codes and integer zero points at ``b`` bits, scales in their storage dtype (E8M0 as one
biased exponent byte, E4M3 as its fp8 byte).

Example:
    >>> import numpy as np
    >>> pack_bits(np.array([1, 2, 3, 4], np.uint8), 4).tolist()
    [33, 67]
    >>> bits_per_weight("int4/g128", (4096, 4096))
    4.125
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qlab.numerics.qtensor import QTensor
from qlab.numerics.sizes import bits_per_weight, packed_nbytes, scale_count
from qlab.numerics.spec import as_spec

__all__ = [
    "pack_bits",
    "unpack_bits",
    "bits_per_weight",
    "packed_nbytes",
    "pack_qtensor",
    "unpack_qtensor",
    "scale_count",
]


def pack_bits(codes, bits: int) -> np.ndarray:
    """Pack unsigned codes (each < 2**bits) into a uint8 array of ceil(n*bits/8) bytes.

    Example:
        >>> pack_bits(np.array([1, 0, 1], np.uint8), 1).tolist()
        [5]
    """
    if not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"pack_bits.bits must be an integer in 1..8, got {bits!r}")
    c = np.asarray(codes).reshape(-1)
    if c.size and (c.min() < 0 or c.max() >= 2**bits):
        raise ValueError(f"pack_bits: codes must lie in [0, {2**bits - 1}] for {bits} bits")
    c = c.astype(np.uint8)
    if bits == 8:
        return c.copy()
    planes = np.unpackbits(c[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.reshape(-1), bitorder="little")


def unpack_bits(packed, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` codes as uint8.

    Example:
        >>> unpack_bits(pack_bits(np.arange(8, dtype=np.uint8), 3), 3, 8).tolist()
        [0, 1, 2, 3, 4, 5, 6, 7]
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_bits.bits must be an integer in 1..8, got {bits!r}")
    if isinstance(packed, (bytes, bytearray, memoryview)):
        packed = np.frombuffer(packed, np.uint8)
    p = np.asarray(packed, np.uint8).reshape(-1)
    if p.size * 8 < count * bits:
        raise ValueError(f"unpack_bits: {p.size} bytes hold fewer than {count} codes of {bits} bits")
    if bits == 8:
        return p[:count].copy()
    stream = np.unpackbits(p, bitorder="little")[: count * bits].reshape(count, bits)
    full = np.zeros((count, 8), np.uint8)
    full[:, :bits] = stream
    return np.packbits(full, axis=1, bitorder="little").reshape(-1)


def _scale_bytes(scale, dtype: str) -> bytes:
    s = np.asarray(scale, np.float32).reshape(-1)
    if dtype == "f32":
        return s.astype("<f4").tobytes()
    if dtype == "f16":
        return s.astype("<f2").tobytes()
    if dtype == "bf16":
        return s.astype(ml_dtypes.bfloat16).tobytes()
    if dtype == "e4m3":
        return s.astype(ml_dtypes.float8_e4m3fn).tobytes()
    exp = np.frexp(s)[1].astype(np.int32) - 1 + 127  # e8m0: biased exponent of a power of two
    return np.clip(exp, 0, 254).astype(np.uint8).tobytes()


def _scale_from_bytes(buf: bytes, dtype: str, count: int) -> np.ndarray:
    if dtype == "f32":
        return np.frombuffer(buf, "<f4", count).astype(np.float32)
    if dtype == "f16":
        return np.frombuffer(buf, "<f2", count).astype(np.float32)
    if dtype == "bf16":
        return np.frombuffer(buf, ml_dtypes.bfloat16, count).astype(np.float32)
    if dtype == "e4m3":
        return np.frombuffer(buf, ml_dtypes.float8_e4m3fn, count).astype(np.float32)
    e = np.frombuffer(buf, np.uint8, count).astype(np.int32) - 127
    return np.ldexp(np.ones(count, np.float32), e)


def pack_qtensor(q: QTensor) -> bytes:
    """Serialize a QTensor's payload; ``len(pack_qtensor(q)) == q.packed_bytes``.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.quantize import quantize
        >>> q = quantize(jnp.ones((8, 64)), "int3/g32")
        >>> len(pack_qtensor(q)) == q.packed_bytes
        True
    """
    spec = q.spec
    fmt = spec.fmt
    parts = [pack_bits(np.asarray(fmt.code_bits(q.codes)), spec.bits).tobytes()]
    parts.append(_scale_bytes(q.scale, spec.scale_dtype))
    if q.zero_point is not None:
        if spec.zero_point == "int":
            zp = np.asarray(q.zero_point).reshape(-1).astype(np.int32)
            parts.append(pack_bits(np.asarray(fmt.code_bits(jnp.asarray(zp))), spec.bits).tobytes())
        else:
            parts.append(_scale_bytes(q.zero_point, spec.scale_dtype))
    if q.tensor_scale is not None:
        parts.append(np.asarray(q.tensor_scale, "<f4").reshape(-1).tobytes())
    return b"".join(parts)


def unpack_qtensor(data: bytes, spec, shape, dtype=np.float32) -> QTensor:
    """Inverse of :func:`pack_qtensor`.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.quantize import quantize
        >>> q = quantize(jnp.arange(64.0).reshape(2, 32), "int4/ch0")
        >>> q2 = unpack_qtensor(pack_qtensor(q), q.spec, q.shape)
        >>> bool((q2.codes == q.codes).all())
        True
    """
    spec = as_spec(spec)
    shape = tuple(shape)
    fmt = spec.fmt
    if len(data) != packed_nbytes(spec, shape):
        raise ValueError(
            f"unpack_qtensor: got {len(data)} bytes, spec {spec} with shape {shape} packs to "
            f"{packed_nbytes(spec, shape)}"
        )
    n = math.prod(shape)
    vshape, axes, _ = spec.granularity.view(shape)
    sshape = tuple(1 if i in axes else s for i, s in enumerate(vshape))
    ns = math.prod(sshape)
    off = 0
    nb = math.ceil(n * spec.bits / 8)
    codes = fmt.from_code_bits(jnp.asarray(unpack_bits(data[off : off + nb], spec.bits, n))).reshape(shape)
    off += nb
    sb = ns * spec.scale_bits // 8
    scale = jnp.asarray(_scale_from_bytes(data[off : off + sb], spec.scale_dtype, ns).reshape(sshape))
    off += sb
    zp = None
    if not spec.symmetric:
        if spec.zero_point == "int":
            zb = math.ceil(ns * spec.bits / 8)
            zc = fmt.from_code_bits(jnp.asarray(unpack_bits(data[off : off + zb], spec.bits, ns)))
            zp = zc.astype(jnp.float32).reshape(sshape)
        else:
            zb = sb
            zp = jnp.asarray(_scale_from_bytes(data[off : off + zb], spec.scale_dtype, ns).reshape(sshape))
        off += zb
    ts = None
    if spec.tensor_scale:
        ts = jnp.asarray(np.frombuffer(data[off : off + 4], "<f4", 1)[0])
    return QTensor(codes, scale, zp, ts, spec, shape, np.dtype(dtype))
