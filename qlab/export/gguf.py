"""GGUF export of quantized models (llama.cpp's format), written and read with the ``gguf`` package.

Every quantized layer goes out as the GGML block type that holds qlab's values exactly: its codes and
scales are packed into the type's blocks as they are (nothing is requantized), so ``gguf``'s (and
llama.cpp's) dequantization of the exported tensor equals ``qlab.dequantize`` bit for bit.

========  ===============================================================  =========================
GGML      qlab specs it holds exactly (blocks of 32 along the input axis)  e.g.
========  ===============================================================  =========================
Q8_0      int8, symmetric, f16 scale                                       ``q8_0``, ``int8/g32``
Q4_0      int4, symmetric, f16 scale                                       ``q4_0``, ``int4/g32``
Q5_0      int5, symmetric, f16 scale                                       ``q5_0``, ``int5/g32``
Q4_1      uint4, ``zp=min`` (a minimum in value units), f16 scale          ``q4_1``
Q5_1      uint5, ``zp=min``, f16 scale                                     ``q5_1``
MXFP4     fp4_e2m1, e8m0 scale                                             ``mxfp4``
========  ===============================================================  =========================

Layers kept float go out in their own dtype (F32, F16 or BF16). A spec with no exact type is an error
naming the nearest exportable specs. The ``q*`` presets also compute codes as llama.cpp does, so an
RTN export of them is byte for byte what llama.cpp's own quantizer makes of the same float weights.
(One exception to "bit for bit": GGML's MXFP4 table has no -0, so an e2m1 -0 code reads back as +0.)

Example:
    >>> import numpy as np, qlab
    >>> w = np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64)   # blocks along the last axis
    >>> q = qlab.quantize(w, "q4_0")
    >>> qtype, blocks = ggml_blocks(q)
    >>> qtype.name, blocks.shape                # 2 blocks of 18 bytes per row
    ('Q4_0', (4, 36))
    >>> y = gguf.quants.dequantize(blocks, qtype)
    >>> bool((y == np.asarray(qlab.dequantize(q))).all())
    True
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np

from qlab import nn as qnn
from qlab.models.cache import atomic_write
from qlab.models.gemma3.gguf_file import ARCH as GEMMA3_ARCH
from qlab.models.gemma3.gguf_file import read_gguf_config
from qlab.models.gemma3.model import Gemma3
from qlab.models.gemma3.weights import weight_map as gemma3_weight_map
from qlab.models.weight_map import submodule
from qlab.numerics.formats import IntFormat
from qlab.numerics.granularity import PerGroup
from qlab.numerics.qtensor import QTensor
from qlab.numerics.spec import PRESETS, QuantSpec, as_spec
from qlab.ptq.fold import fold_input_scales

__all__ = ["GGML_PRESETS", "ggml_type", "ggml_blocks", "qtensor_from_blocks", "export_gguf", "read_gguf",
           "check_writable"]

T = gguf.GGMLQuantizationType
BLOCK = 32

#: GGML type -> the qlab preset that quantizes to it (and that a read-back tensor gets)
GGML_PRESETS = {T.Q8_0: "q8_0", T.Q4_0: "q4_0", T.Q5_0: "q5_0", T.Q4_1: "q4_1", T.Q5_1: "q5_1",
                T.MXFP4: "mxfp4"}
_FLOAT_TYPES = {"float32": T.F32, "float16": T.F16, "bfloat16": T.BF16}


def _exact_type(spec: QuantSpec):
    """The GGML type holding ``spec``'s values exactly (ignoring the block axis), or None."""
    g, fmt = spec.granularity, spec.fmt
    if not (isinstance(g, PerGroup) and g.size == BLOCK and not g.pad) or spec.tensor_scale:
        return None
    if isinstance(fmt, IntFormat) and spec.scale_dtype == "f16":
        if fmt.signed and spec.symmetric and spec.zero_point == "int":
            return {8: T.Q8_0, 4: T.Q4_0, 5: T.Q5_0}.get(fmt.bits)
        if not fmt.signed and not spec.symmetric and spec.zero_point == "min":
            return {4: T.Q4_1, 5: T.Q5_1}.get(fmt.bits)
        return None
    if fmt.name == "fp4_e2m1" and spec.scale_dtype == "e8m0" and spec.symmetric:
        return T.MXFP4
    return None


def _nearest(spec: QuantSpec) -> list[str]:
    """Exportable presets, those with the spec's bit width (then the nearest widths; integer or float as
    the spec's format) first."""
    bits, is_int = spec.fmt.bits, isinstance(spec.fmt, IntFormat)
    return sorted(GGML_PRESETS.values(), key=lambda p: (abs(PRESETS[p].fmt.bits - bits),
                                                         isinstance(PRESETS[p].fmt, IntFormat) != is_int, p))


def ggml_type(spec) -> gguf.GGMLQuantizationType:
    """The GGML type that holds the values of ``spec`` (a QuantSpec or string) exactly; a ValueError
    naming the nearest exportable specs when there is none.

    Example:
        >>> ggml_type("q4_1").name, ggml_type("int8/g32").name
        ('Q4_1', 'Q8_0')
        >>> ggml_type("int4/g128")
        Traceback (most recent call last):
        ...
        ValueError: spec 'int4/g128' has no exact GGML type (GGML blocks hold 32 values with an f16 scale, or e8m0 for MXFP4); nearest exportable specs: q4_0, q4_1, mxfp4, q5_0, q5_1, q8_0
    """
    spec = as_spec(spec)
    if spec is None:
        raise ValueError("spec is None (a float layer): it goes out as F32/F16/BF16, not a GGML block type")
    t = _exact_type(spec)
    if t is None:
        raise ValueError(f"spec {str(spec)!r} has no exact GGML type (GGML blocks hold 32 values with an f16 "
                         f"scale, or e8m0 for MXFP4); nearest exportable specs: {', '.join(_nearest(spec))}")
    return t


def _group_axis(spec: QuantSpec) -> int:
    """The axis (0 or 1) of a 2-D weight that ``spec``'s groups run along (None: the last)."""
    axis = spec.granularity.axis
    return (-1 if axis is None else axis) % 2


def _block_view(q: QTensor):
    """``(codes (nb, 32), scale (nb,), zero point (nb,) or None)`` of a 2-D QTensor with groups of 32,
    rows of the block axis made last (GGML order: blocks run along ``ne0``)."""
    if len(q.shape) != 2:
        raise ValueError(f"GGUF export handles 2-D weights; got shape {tuple(q.shape)}")
    ax = _group_axis(q.spec)
    codes = np.moveaxis(np.asarray(q.codes), ax, -1)
    rows, n = codes.shape

    def per_block(v):
        v = np.asarray(v, np.float32)
        v = np.squeeze(v, axis=ax + 1)  # the view's group axis (size 1)
        return np.moveaxis(v, ax, -1).reshape(rows * n // BLOCK)

    zp = None if q.zero_point is None else per_block(q.zero_point)
    return codes.reshape(-1, BLOCK), per_block(q.scale), zp, rows


def _f16_bytes(v):
    return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _nibbles(u):
    """Two 4-bit values per byte, GGML's order: value j in the low nibble of byte j, value j + 16 in its high."""
    u = u.astype(np.uint8)
    return (u[:, :16] & 0x0F) | ((u[:, 16:] & 0x0F) << 4)


def _high_bits(u):
    """The fifth bits of 32 values as one little-endian uint32 (bit j = value j), 4 bytes."""
    bits = ((u.astype(np.uint32) >> 4) & 1) << np.arange(BLOCK, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).astype("<u4").reshape(-1, 1).view(np.uint8)


def ggml_blocks(q: QTensor):
    """``(GGML type, block bytes)`` of a 2-D QTensor whose spec has an exact type (:func:`ggml_type`);
    bytes shaped ``(rows, bytes per row)`` with the block axis (the spec's group axis) made the row.

    Example:
        >>> import numpy as np, qlab
        >>> t, b = ggml_blocks(qlab.quantize(np.ones((2, 32), np.float32), "q8_0"))
        >>> t.name, b.shape, b[0, :3].tolist()       # f16 scale 1/127 then code 127
        ('Q8_0', (2, 34), [8, 32, 127])
    """
    t = ggml_type(q.spec)
    c, d, m, rows = _block_view(q)
    if t == T.Q8_0:
        parts = [_f16_bytes(d), c.astype(np.int8).view(np.uint8)]
    elif t == T.Q4_0:
        parts = [_f16_bytes(d), _nibbles(c.astype(np.int16) + 8)]
    elif t == T.Q5_0:
        u = c.astype(np.int16) + 16
        parts = [_f16_bytes(d), _high_bits(u), _nibbles(u)]
    elif t == T.Q4_1:
        parts = [_f16_bytes(d), _f16_bytes(m), _nibbles(c)]
    elif t == T.Q5_1:
        parts = [_f16_bytes(d), _f16_bytes(m), _high_bits(c), _nibbles(c)]
    else:  # MXFP4: the e8m0 byte is the scale's biased exponent; codes are e2m1 bit patterns, except
        # that GGML's table reads pattern 8 as +0 (it has no -0): -0 goes out as the +0 pattern
        e = (np.frexp(d)[1] - 1 + 127).astype(np.uint8).reshape(-1, 1)
        parts = [e, _nibbles(np.where(c == 8, 0, c))]
    return t, np.ascontiguousarray(np.concatenate(parts, axis=1).reshape(rows, -1))


def _unnibble(qs):
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def qtensor_from_blocks(blocks, qtype, shape) -> QTensor:
    """The QTensor held by GGML ``blocks`` of type ``qtype`` for a ``(rows, cols)`` tensor (numpy order,
    blocks along ``cols``), with the type's preset spec grouped along axis 1: the inverse of
    :func:`ggml_blocks`.

    Example:
        >>> import numpy as np, qlab
        >>> q = qlab.quantize(np.linspace(-2, 3, 64, dtype=np.float32).reshape(1, 64), "q5_1")
        >>> q2 = qtensor_from_blocks(*ggml_blocks(q)[::-1], (1, 64))
        >>> bool((qlab.dequantize(q2) == qlab.dequantize(q)).all()), str(q2.spec)
        (True, 'uint5/g32a1/asym/zp=min/biased_trunc/cs=f32')
    """
    qtype = T(qtype)
    if qtype not in GGML_PRESETS:
        raise ValueError(f"GGML type {qtype.name} is not one qlab reads as codes; known: "
                         f"{', '.join(t.name for t in GGML_PRESETS)}")
    rows, cols = shape
    spec = PRESETS[GGML_PRESETS[qtype]].resolve(channel_axis=0, contract_axis=1)
    b = np.asarray(blocks, np.uint8).reshape(rows * cols // BLOCK, -1)
    f16 = lambda i: b[:, i:i + 2].copy().view(np.float16).astype(np.float32)  # noqa: E731
    zp = None
    if qtype == T.Q8_0:
        d, codes = f16(0), b[:, 2:].view(np.int8)
    elif qtype == T.Q4_0:
        d, codes = f16(0), (_unnibble(b[:, 2:]).astype(np.int16) - 8).astype(np.int8)
    elif qtype == T.Q5_0:
        qh = b[:, 2:6].copy().view("<u4")
        hi = ((qh >> np.arange(BLOCK, dtype=np.uint32)) & 1).astype(np.int16)
        d, codes = f16(0), ((_unnibble(b[:, 6:]) | (hi << 4)).astype(np.int16) - 16).astype(np.int8)
    elif qtype == T.Q4_1:
        d, zp, codes = f16(0), f16(2), _unnibble(b[:, 4:])
    elif qtype == T.Q5_1:
        qh = b[:, 4:8].copy().view("<u4")
        hi = ((qh >> np.arange(BLOCK, dtype=np.uint32)) & 1).astype(np.uint8)
        d, zp, codes = f16(0), f16(2), _unnibble(b[:, 8:]) | (hi << 4)
    else:
        d, codes = np.ldexp(np.float32(1), b[:, :1].astype(np.int32) - 127).astype(np.float32), _unnibble(b[:, 1:])
    view = (rows, cols // BLOCK, 1)
    return QTensor(np.ascontiguousarray(codes).reshape(rows, cols), d.reshape(view),
                   None if zp is None else zp.reshape(view), None, spec, (rows, cols), np.dtype(np.float32))


def converted_layers(qmodel, what: str) -> tuple:
    """``(converted model, {path: converted layer})``: ``qmodel`` itself when its quantized layers are converted
    already, else ``qlab.nn.convert(qmodel)``; a ValueError starting with ``what`` when nothing is quantized.

    Example:
        >>> from flax import nnx
        >>> converted_layers(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), "export")
        Traceback (most recent call last):
        ...
        ValueError: export: the model has no quantized layers (quantize it with qlab.ptq or qlab.quantize_model first)
    """
    layers = {p: L for p, L in qnn.quantized_layers(qmodel).items() if L.weight_quant is not None or L.converted}
    if not layers:
        raise ValueError(f"{what}: the model has no quantized layers (quantize it with qlab.ptq or "
                         "qlab.quantize_model first)")
    if any(not L.converted for L in layers.values()):
        qmodel = qnn.convert(qmodel)
        layers = {p: L for p, L in qnn.quantized_layers(qmodel).items() if L.converted}
    return qmodel, layers


def check_writable(path) -> Path:
    """``path`` as a Path, after checking that its folder exists and can be written (an OSError naming
    it otherwise), so an export fails before any work.

    Example:
        >>> check_writable("/no/such/folder/m.gguf")
        Traceback (most recent call last):
        ...
        OSError: cannot write /no/such/folder/m.gguf: folder /no/such/folder does not exist
    """
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        raise OSError(f"cannot write {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(f"cannot write {path}: folder {parent} is not writable")
    if path.is_dir():
        raise OSError(f"cannot write {path}: it is a folder")
    return path


def _float_tensor(w):
    """(array, raw type or None) of a float weight in its own dtype."""
    w = np.asarray(w)
    name = w.dtype.name
    if name not in _FLOAT_TYPES:
        raise ValueError(f"float weight of dtype {name}: GGUF float types are {', '.join(_FLOAT_TYPES)}")
    if name == "bfloat16":
        return np.ascontiguousarray(w).view(np.uint16).view(np.uint8).reshape(w.shape[0], -1), T.BF16
    return np.ascontiguousarray(w), None


def _gemma3_tensors(qmodel: Gemma3):
    """``[(GGUF name, array, raw type or None, spec string or None)]`` of a (quantized) Gemma 3."""
    out = []
    for path, attr, name, transpose in gemma3_weight_map(qmodel.config):
        m = submodule(qmodel, path)
        where = "/".join(map(str, path))
        if isinstance(m, qnn.QuantizedLayer):
            if m.input_scale is not None:
                raise ValueError(f"{where}: has an input scale (AWQ / SmoothQuant) that is not folded into the "
                                 "preceding weights; GGUF holds no runtime divide. Export it with "
                                 "qlab.export.export_safetensors, or quantize this layer with gptq/rtn/hqq")
            if m.act_quant is not None:
                raise ValueError(f"{where}: activation quantization ({m.act_quant.spec}) has no GGUF form; "
                                 "export weight-only models")
            q = m.qtensor()
            if q is not None:
                try:
                    t, blocks = ggml_blocks(q)
                except ValueError as e:
                    raise ValueError(f"{where}: {e}") from None
                if _group_axis(q.spec) != m.contract_axis % 2:
                    raise ValueError(f"{where}: groups run along axis {q.spec.granularity.axis}, GGML blocks along "
                                     f"the input axis {m.contract_axis}")
                out.append((name, blocks, t, str(q.spec)))
                continue
            w = m.weight[...]
        else:
            w = getattr(m, attr)[...]
        w = np.asarray(w)
        arr, raw = _float_tensor(np.ascontiguousarray(w.T) if transpose else w)
        out.append((name, arr, raw, None))
    return out


def _copy_metadata(writer: gguf.GGUFWriter, reader: gguf.GGUFReader, skip=("general.architecture",
                                                                            "general.file_type")):
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in skip:
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub)


def export_gguf(qmodel, path, *, source) -> Path:
    """Write a quantized Gemma 3 model as a GGUF that llama.cpp loads; returns the path.

    Quantized layers go out as their exact GGML type (:func:`ggml_type`; mixed specs give mixed tensor
    types), float layers in their dtype. Architecture metadata and the tokenizer are copied from
    ``source``, the GGUF the model was loaded from (its config must match the model's); ``qlab.version``
    and ``qlab.specs`` record where the file came from. Layers still fake-quantized (QAT) are converted to
    codes first. AWQ input scales are folded into the norms before them (:func:`qlab.ptq.fold.fold_input_scales`;
    quantize with ``qlab.ptq.awq(..., share_scales=True)``): the file holds the folded model, whose outputs
    equal the AWQ model's within float rounding. The file is written under a temporary name and renamed: a
    failed export leaves none.

    Errors (ValueError / OSError, each naming the cause): a folder that is not writable, a model with no
    quantized layer, a spec with no GGML type, an input scale that cannot be folded (AWQ without
    ``share_scales=True``, SmoothQuant), activation quantization, a source that is not a matching gemma3 GGUF.

    Example (a tiny random Gemma 3):
        >>> import tempfile, pathlib
        >>> from flax import nnx
        >>> from qlab.models.gemma3 import Gemma3, Gemma3Config, write_gguf
        >>> from qlab.nn import Rule
        >>> from qlab import ptq
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> model = Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0))
        >>> src = write_gguf(model, d / "float.gguf")
        >>> qm = ptq.rtn(model, [Rule(".*mlp.*", weight="q4_0"), Rule(".*attn.*_proj", weight="q8_0")])
        >>> out = export_gguf(qm, d / "q.gguf", source=src)
        >>> sorted({t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors})
        ['F32', 'Q4_0', 'Q8_0']
    """
    from qlab import __version__  # the package root imports qlab.export: deferred to avoid the cycle

    path = check_writable(path)
    if not isinstance(qmodel, Gemma3):
        raise ValueError(f"GGUF export writes Gemma 3 models (llama.cpp needs an architecture); got "
                         f"{type(qmodel).__name__}: use qlab.export.export_safetensors")
    qmodel, _ = converted_layers(qmodel, "GGUF export")
    if any(L.input_scale is not None for L in qnn.quantized_layers(qmodel).values()):
        qmodel = fold_input_scales(qmodel)
    reader = _open(source)
    cfg = read_gguf_config(reader)
    if cfg != qmodel.config:
        raise ValueError(f"source {source}: its config {cfg} does not match the model's {qmodel.config}")
    tensors = _gemma3_tensors(qmodel)
    specs = {name: spec for name, _, _, spec in tensors if spec is not None}

    def write(tmp):
        w = gguf.GGUFWriter(str(tmp), GEMMA3_ARCH)
        _copy_metadata(w, reader)
        w.add_string("qlab.version", __version__)
        w.add_array("qlab.specs", [f"{n}={s}" for n, s in specs.items()])
        for name, arr, raw, _ in tensors:
            w.add_tensor(name, arr, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    return atomic_write(path, write)


def _open(path) -> gguf.GGUFReader:
    """A GGUFReader of ``path``, or a ValueError saying why the file is not a readable GGUF."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF')")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError, IndexError, struct errors, ... on damaged files
        raise ValueError(f"{path}: a damaged or truncated GGUF file ({type(e).__name__}: {e})") from None


def read_gguf(path) -> dict:
    """``{tensor name: QTensor or float32 array}`` of a GGUF file: block-quantized tensors qlab knows
    (:data:`GGML_PRESETS`) come back as QTensors in numpy order (blocks along the last axis), float
    tensors as arrays, others (e.g. Q4_K) dequantized to float32 by ``gguf``. A truncated or foreign
    file is a ValueError naming the cause.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.gguf"
        >>> _ = p.write_bytes(b"PK\\x03\\x04 not a gguf")
        >>> read_gguf(p)
        Traceback (most recent call last):
        ...
        ValueError: ... is not a GGUF file (it starts with b'PK\\x03\\x04', not b'GGUF')
    """
    reader = _open(path)
    size = Path(path).stat().st_size
    out = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))
        if t.data_offset + t.n_bytes > size or t.data.size * t.data.itemsize != t.n_bytes:
            raise ValueError(f"{path}: truncated GGUF, tensor {t.name} runs past the end of the file")
        if t.tensor_type in GGML_PRESETS:
            out[t.name] = qtensor_from_blocks(np.asarray(t.data), t.tensor_type, (int(np.prod(shape[:-1])), shape[-1]))
        else:
            out[t.name] = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), np.float32).reshape(shape)
    return out
