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

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from qlab.numerics.qtensor import QTensor
from qlab.numerics.sizes import bits_per_weight, packed_nbytes, scale_count
from qlab.numerics.spec import QuantSpec, as_spec

__all__ = [
    "pack_bits",
    "unpack_bits",
    "bits_per_weight",
    "packed_nbytes",
    "pack_qtensor",
    "unpack_qtensor",
    "scale_count",
    "PackedQTensor",
    "to_packed",
    "from_packed",
    "check_packable",
    "SCALE_JNP_DTYPES",
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


# ---------------------------------------------------------------------------------------
# In memory: the same bytes as JAX arrays, unpacked inside a jitted computation

#: the JAX dtype each ``QuantSpec.scale_dtype`` is held in (exact for the scales ``quantize`` stores)
SCALE_JNP_DTYPES = {"f32": jnp.float32, "f16": jnp.float16, "bf16": jnp.bfloat16,
                    "e4m3": jnp.float8_e4m3fn, "e8m0": jnp.float8_e8m0fnu}


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class PackedQTensor:
    """A QTensor as it sits in memory: codes packed ``bits`` per code into uint8, ``scale`` (and a float zero
    point) in the spec's storage dtype, an integer zero point packed like the codes (:func:`pack_bits`), the
    NVFP4 tensor scale as float32.

    Codes of 1, 2 or 4 bits in a tensor of two or more axes whose second-to-last axis is a multiple of
    ``per = 8 // bits`` are held row-paired: byte ``[..., i, n]`` holds the codes of rows ``per * i + j``
    (``j = 0 .. per-1``, code ``j`` in bits ``j*bits ..``) of column ``n``, shape
    ``shape[:-2] + (shape[-2] // per, shape[-1])``. Unpacking is then one shift per row, which XLA fuses into
    the consumer and vectorizes along the contiguous last axis (4x faster than interleaving the codes of one
    row on this project's CPUs), and rows of an embedding table can still be gathered. 8-bit codes keep the
    tensor's shape; every other case is :func:`pack_bits`' flat little-endian stream. Serialized bytes
    (:func:`pack_qtensor`) always use the stream; both take the same number of bytes.
    :func:`to_packed` makes one, :func:`from_packed` gives the QTensor back (jittable; exact).
    ``nbytes`` is what it holds: :func:`packed_nbytes` plus at most a byte of padding per packed part.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.quantize import quantize
        >>> p = to_packed(quantize(jnp.ones((256, 4)), "int4/g128a0"))
        >>> p.codes.shape, p.codes.dtype, p.scale.dtype, p.nbytes   # 512 code bytes + 8 f16 scales
        ((128, 4), dtype('uint8'), dtype('float16'), 528)
    """

    codes: jax.Array
    scale: jax.Array
    zero_point: jax.Array | None
    tensor_scale: jax.Array | None
    spec: QuantSpec
    shape: tuple
    dtype: np.dtype

    def tree_flatten(self):
        return (self.codes, self.scale, self.zero_point, self.tensor_scale), (self.spec, self.shape, self.dtype)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays it holds."""
        return sum(int(a.size) * np.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(self))


def _pack_stream(u, bits: int):
    """uint8 bit patterns (any shape) -> the little-endian stream of ``pack_bits`` as a flat uint8 array."""
    flat = u.reshape(-1).astype(jnp.uint32)
    n = flat.size
    if bits == 8:
        return flat.astype(jnp.uint8)
    pad = -n % 8
    if pad:
        flat = jnp.concatenate([flat, jnp.zeros((pad,), jnp.uint32)])
    g = flat.reshape(-1, 8)  # 8 codes of `bits` bits fill `bits` bytes exactly
    out = []
    for j in range(bits):  # byte j holds stream bits [8j, 8j + 8)
        b = jnp.zeros(g.shape[:1], jnp.uint32)
        for k in range(8):  # code k holds stream bits [k*bits, (k+1)*bits)
            lo, hi = k * bits, (k + 1) * bits
            if hi <= 8 * j or lo >= 8 * j + 8:
                continue
            b = b | (g[:, k] >> (8 * j - lo) if lo < 8 * j else g[:, k] << (lo - 8 * j))
        out.append(b & 0xFF)
    return jnp.stack(out, axis=1).reshape(-1)[: math.ceil(n * bits / 8)].astype(jnp.uint8)


def _unpack_stream(data, bits: int, count: int):
    """Inverse of :func:`_pack_stream`: the first ``count`` codes (uint8 bit patterns), flat."""
    if 8 % bits == 0:  # one shift per position in the byte
        shifts = jnp.arange(8 // bits, dtype=jnp.uint8) * bits
        return ((data.reshape(-1)[:, None] >> shifts) & (2**bits - 1)).reshape(-1)[:count]
    flat = data.reshape(-1).astype(jnp.uint32)
    pad = -flat.size % bits
    if pad:
        flat = jnp.concatenate([flat, jnp.zeros((pad,), jnp.uint32)])
    g = flat.reshape(-1, bits)
    out = []
    for k in range(8):
        lo, hi = k * bits, (k + 1) * bits
        c = jnp.zeros(g.shape[:1], jnp.uint32)
        for j in range(lo // 8, (hi - 1) // 8 + 1):
            c = c | (g[:, j] >> (lo - 8 * j) if lo >= 8 * j else g[:, j] << (8 * j - lo))
        out.append(c & (2**bits - 1))
    codes = jnp.stack(out, axis=1).reshape(-1)
    return (codes if codes.size == count else codes[:count]).astype(jnp.uint8)


def _row_paired(shape, bits: int) -> bool:
    return bits in (1, 2, 4) and len(shape) >= 2 and shape[-2] % (8 // bits) == 0


def _pack_row_pairs(u, bits: int):
    per = 8 // bits
    g = u.astype(jnp.uint8).reshape(u.shape[:-2] + (u.shape[-2] // per, per, u.shape[-1]))
    out = g[..., 0, :]
    for j in range(1, per):
        out = out | (g[..., j, :] << (j * bits))
    return out


def _unpack_row_pairs(b, bits: int):
    per = 8 // bits
    shifts = (jnp.arange(per, dtype=jnp.uint8) * bits)[:, None]
    c = (b[..., None, :] >> shifts) & (2**bits - 1)
    return c.reshape(b.shape[:-2] + (b.shape[-2] * per, b.shape[-1]))


def _stored(v, dtype: str):
    return v.astype(SCALE_JNP_DTYPES[dtype])  # exact for the values quantize stores (check_packable)


@jax.jit
def to_packed(q: QTensor) -> PackedQTensor:
    """``q`` held as :class:`PackedQTensor` (jittable; see :func:`check_packable` for exactness).

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.quantize import quantize
        >>> q = quantize(jnp.arange(8.0).reshape(2, 4), "int4/s=f32")
        >>> p = to_packed(q)
        >>> q.codes.tolist(), p.codes.tolist()   # rows 0 and 1 share a byte, row 0 in the low nibble
        ([[0, 1, 2, 3], [4, 5, 6, 7]], [[64, 81, 98, 115]])
    """
    spec = q.spec
    fmt, bits = spec.fmt, spec.bits
    u = fmt.code_bits(q.codes)
    if bits == 8:
        codes = u
    elif _row_paired(q.shape, bits):
        codes = _pack_row_pairs(u, bits)
    else:
        codes = _pack_stream(u, bits)
    scale = _stored(q.scale, spec.scale_dtype)
    zp = q.zero_point
    if zp is not None:
        if spec.zero_point == "int":
            zp = _pack_stream(fmt.code_bits(zp.astype(jnp.int32)), bits)
        else:
            zp = _stored(zp, spec.scale_dtype)
    ts = None if q.tensor_scale is None else q.tensor_scale.astype(jnp.float32)
    return PackedQTensor(codes, scale, zp, ts, spec, tuple(q.shape), q.dtype)


@jax.jit
def from_packed(p: PackedQTensor) -> QTensor:
    """The :class:`QTensor` a :class:`PackedQTensor` holds (codes in the original shape, scales as float32),
    exactly as :func:`to_packed` got it. Inside a jitted forward this fuses with ``dequantize``.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.quantize import quantize
        >>> q = quantize(jnp.linspace(-1, 1, 96).reshape(2, 48), "int3/g16/asym")
        >>> q2 = from_packed(to_packed(q))
        >>> bool((q2.codes == q.codes).all() & (q2.scale == q.scale).all() & (q2.zero_point == q.zero_point).all())
        True
    """
    spec = p.spec
    fmt, bits = spec.fmt, spec.bits
    if bits == 8:
        raw = p.codes
    elif _row_paired(p.shape, bits):
        raw = _unpack_row_pairs(p.codes, bits)
    else:
        raw = _unpack_stream(p.codes, bits, math.prod(p.shape)).reshape(p.shape)
    codes = fmt.from_code_bits(raw)
    scale = p.scale.astype(jnp.float32)
    zp = p.zero_point
    if zp is not None:
        ns = scale.size
        zp = (fmt.from_code_bits(_unpack_stream(zp, bits, ns)).astype(jnp.float32).reshape(scale.shape)
              if spec.zero_point == "int" else zp.astype(jnp.float32))
    return QTensor(codes, scale, zp, p.tensor_scale, spec, tuple(p.shape), p.dtype)


def check_packable(q: QTensor, where: str = "QTensor") -> None:
    """Raise ValueError unless :func:`to_packed` keeps ``q`` exactly: every scale (and float zero point)
    representable in ``spec.scale_dtype``, every integer zero point an integer in the format's range.

    Example:
        >>> import jax.numpy as jnp
        >>> from qlab.numerics.quantize import quantize
        >>> q = quantize(jnp.ones((2, 8)), "int8/ch0")
        >>> check_packable(q)
        >>> check_packable(dataclasses.replace(q, scale=q.scale + 1e-4), "layer 'fc'")
        Traceback (most recent call last):
        ...
        ValueError: layer 'fc': 2 of 2 scales are not representable in the spec's scale_dtype 'f16' (int8/ch0); requantize with a spec whose scale_dtype holds them (e.g. s=f32)
    """
    back = from_packed(to_packed(q))
    for name, a, b in (("scales", q.scale, back.scale), ("zero points", q.zero_point, back.zero_point)):
        if a is None:
            continue
        a, b = np.asarray(a, np.float32).reshape(-1), np.asarray(b, np.float32).reshape(-1)
        bad = int(np.sum(~((a == b) | (np.isnan(a) & np.isnan(b)))))
        if bad:
            raise ValueError(
                f"{where}: {bad} of {a.size} {name} are not representable in the spec's scale_dtype "
                f"{q.spec.scale_dtype!r} ({q.spec}); requantize with a spec whose scale_dtype holds them (e.g. s=f32)")

