"""Converted models hold their codes packed: PackedQTensor against the numpy packer, resident bytes against
model_size's accounting, outputs against the unpacked path; the float baseline in the model's own dtype."""
import math

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlab
from qlab import nn as qnn
from qlab.models import MLP
from qlab.models import gemma3 as G
from qlab.numerics.packing import PackedQTensor, check_packable, from_packed, pack_bits, to_packed

SPECS = ["int8/ch", "int4/g128", "nf4/g64", "int3/g32", "int2/ch/asym", "uint4/g32/asym", "int4/g32/asym/zp=float",
         "fp8_e4m3/ch", "mxfp4", "nvfp4", "int5/g32/s=bf16", "int4/ch/s=f32"]


def _w(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape) * 0.05


def _applies(spec, shape):
    try:
        qlab.parse_spec(spec).granularity.view(shape)
        return True
    except ValueError:  # a group that does not divide the shape
        return False


# (256, 96): row-paired for 1/2/4 bits; (5, 64): an odd row count, so a flat stream; (32, 7): odd columns
CASES = [(spec, shape) for spec in SPECS for shape in [(256, 96), (5, 64), (32, 7)] if _applies(spec, shape)]


@pytest.mark.parametrize("spec,shape", CASES)
def test_packed_bytes_are_the_numpy_packers_and_round_trip(spec, shape):
    s = qlab.parse_spec(spec)
    q = qlab.quantize(_w(shape), spec)
    p = to_packed(q)
    u = np.asarray(s.fmt.code_bits(q.codes)).astype(np.int64)
    if s.bits in (1, 2, 4) and shape[0] % (8 // s.bits) == 0:
        # row-paired: byte [i, n] holds rows per*i + j of column n, row j at bit j*bits
        per = 8 // s.bits
        ref = sum(u[j::per] << (j * s.bits) for j in range(per)).astype(np.uint8)
        assert p.codes.shape == ref.shape
    elif s.bits == 8:
        ref = u.astype(np.uint8)
    else:  # pack_bits' little-endian stream of the code bit patterns
        ref = pack_bits(u.astype(np.uint8), s.bits)
    np.testing.assert_array_equal(np.asarray(p.codes).reshape(ref.shape), ref)
    assert p.codes.dtype == jnp.uint8
    assert p.scale.dtype == qlab.numerics.packing.SCALE_JNP_DTYPES[s.scale_dtype]
    # what it holds is the accounting, up to one byte of padding per packed part
    assert qlab.packed_nbytes(spec, shape) <= p.nbytes <= qlab.packed_nbytes(spec, shape) + 2
    back = from_packed(p)
    np.testing.assert_array_equal(np.asarray(back.codes), np.asarray(q.codes))
    assert back.codes.dtype == q.codes.dtype
    np.testing.assert_array_equal(np.asarray(back.scale), np.asarray(q.scale))
    if q.zero_point is not None:
        np.testing.assert_array_equal(np.asarray(back.zero_point), np.asarray(q.zero_point))
    np.testing.assert_array_equal(np.asarray(qlab.dequantize(back)), np.asarray(qlab.dequantize(q)))


def test_every_bit_width_packs_like_the_numpy_packer():
    rng = np.random.default_rng(0)
    for bits in range(1, 9):
        for n in (21,):  # not a multiple of 8 codes: the last byte is padded
            u = rng.integers(0, 2**bits, n).astype(np.uint8)
            q = qlab.QTensor(jnp.asarray(u), jnp.ones((1,)), None, None, qlab.parse_spec(f"uint{bits}"), (n,),
                             np.dtype(np.float32))
            p = to_packed(q)
            np.testing.assert_array_equal(np.asarray(p.codes).reshape(-1), pack_bits(u, bits))
            np.testing.assert_array_equal(np.asarray(from_packed(p).codes), u)


def test_a_scale_the_stored_dtype_cannot_hold_is_an_error():
    q = qlab.quantize(_w((8, 16)), "int8/ch")
    bad = qlab.QTensor(q.codes, q.scale * (1 + 2.0**-20), None, None, q.spec, q.shape, q.dtype)
    with pytest.raises(ValueError, match="scale_dtype 'f16'"):
        check_packable(bad)
    m = qnn.quantize_model(nnx.Linear(8, 16, rngs=nnx.Rngs(0)), [qnn.Rule(".*", weight="int8/ch")])
    with pytest.raises(ValueError, match="layer ''.*not representable"):
        qnn.load_quantized_weights(m, {"": bad})


def _mlp():
    return MLP(256, hidden=(256, 128), out=10, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("spec", ["int8/ch", "int4/g128", "nf4/g64"])
def test_converted_mlp_resident_bytes_match_the_accounting_and_outputs_equal(spec):
    model = _mlp()
    qm = qnn.quantize_model(model, [qnn.Rule(".*", weight=spec)])
    cm = qnn.convert(qm)
    layers = qnn.quantized_layers(cm)
    for path, L in layers.items():
        p = L.packed()
        assert isinstance(p, PackedQTensor) and L.q_codes[...].dtype == jnp.uint8
        assert abs(p.nbytes - qlab.packed_nbytes(p.spec, p.shape)) <= 2, path
    size = qnn.model_size(cm)
    live = qnn.resident_bytes(cm)
    assert abs(live - size["packed_bytes"]) <= 0.05 * size["packed_bytes"], (live, size["packed_bytes"])
    # far below the float model and the unpacked int8-codes layout (one byte a code + f32 scales)
    unpacked = sum(math.prod(L.packed().shape) + 4 * L.packed().scale.size for L in layers.values())
    assert live < qnn.resident_bytes(model)
    if spec != "int8/ch":
        assert live < 0.6 * unpacked
    x = jax.random.normal(jax.random.key(1), (4, 256))
    fwd = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(np.asarray(fwd(cm, x)), np.asarray(fwd(qm, x)))  # fake_quant == dequantize
    # and against a hand-written forward on the unpacked QTensors
    h = x
    for path in ("layers/0", "layers/1", "head"):
        L = layers[path]
        h = h @ qlab.dequantize(L.qtensor()) + L.bias[...]
        if path != "head":
            h = jax.nn.relu(h)
    np.testing.assert_allclose(np.asarray(fwd(cm, x)), np.asarray(h), rtol=1e-5, atol=1e-5)


def _tiny_gemma():
    return G.Gemma3(G.Gemma3Config.tiny(d_model=128, ffn_dim=256, head_dim=32), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("spec", ["int8/ch", "int4/g128", "nf4/g64"])
def test_converted_gemma_resident_bytes_match_the_accounting_and_outputs_equal(spec):
    model = _tiny_gemma()
    qm = qnn.quantize_model(model, [qnn.Rule(".*_proj", weight=spec)])
    cm = qnn.convert(qm)
    size = qnn.model_size(cm)
    live = qnn.resident_bytes(cm)
    assert abs(live - size["packed_bytes"]) <= 0.05 * size["packed_bytes"], (live, size["packed_bytes"])
    q_live = sum(L.packed().nbytes for L in qnn.quantized_layers(cm).values())
    q_acct = sum(qlab.packed_nbytes(L.packed().spec, L.packed().shape) for L in qnn.quantized_layers(cm).values())
    assert q_acct <= q_live <= q_acct + 2 * len(qnn.quantized_layers(cm))
    ids = jnp.asarray([[2, 17, 45, 300, 9, 81]])
    fwd = nnx.jit(lambda m, t: m(t))
    np.testing.assert_array_equal(np.asarray(fwd(cm, ids)), np.asarray(fwd(qm, ids)))


def test_float_baseline_in_the_models_own_dtype(tmp_path):
    model = _tiny_gemma()
    size = qnn.model_size(model)
    n = sum(int(np.size(v[...])) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    assert size["native_dtype"] == "bfloat16" and model.native_dtype == "bfloat16"
    assert size["float_bytes"] == 4 * n and size["float_native_bytes"] == 2 * n
    qm = qnn.quantize_model(model, [qnn.Rule(".*_proj", weight="int4/g128")])
    assert qnn.model_size(qm)["float_native_bytes"] == 2 * n  # the same baseline once quantized
    assert qnn.model_size(qm, native_dtype="float16")["float_native_bytes"] == 2 * n
    mlp = qnn.model_size(_mlp())
    assert mlp["native_dtype"] == "float32" and mlp["float_native_bytes"] == mlp["float_bytes"]
    with pytest.raises(ValueError, match="native_dtype='int8' is not a float dtype"):
        qnn.model_size(model, native_dtype="int8")
    # a GGUF says its dtype when its weights are F16/BF16; an F32 or quantized one keeps gemma3's bf16
    small = G.Gemma3(G.Gemma3Config.tiny(), rngs=nnx.Rngs(0))
    f16 = G.write_gguf(small, tmp_path / "f16.gguf", qtype=gguf.GGMLQuantizationType.F16)
    assert G.read_gguf_config(f16).native_dtype == "float16"
    assert G.read_gguf_config(G.write_gguf(small, tmp_path / "f32.gguf")).native_dtype == "bfloat16"


def test_study_rows_carry_the_native_float_baseline():
    from qlab.experiments import size_metrics
    m = size_metrics(_tiny_gemma())
    assert m["native_dtype"] == "bfloat16"
    assert m["float_native_mib"] == pytest.approx(m["float_mib"] / 2)
