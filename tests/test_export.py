"""qlab.export: GGUF blocks equal qlab's values bit for bit under gguf's own dequantization; a tiny Gemma 3
round trip through a GGUF file; bad input (unwritable path, spec with no GGML type, no quantized layer,
truncated or foreign files) each a clear error, and no partial file left behind."""

import numpy as np
import pytest
from flax import nnx

import qlab
from qlab import ptq
from qlab.export.gguf import export_gguf, ggml_blocks, ggml_type, qtensor_from_blocks, read_gguf
from qlab.models.gemma3 import Gemma3, Gemma3Config, write_gguf
from qlab.models.gemma3.weights import model_weights
from qlab.nn import Rule

gguf = pytest.importorskip("gguf")

EXACT = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "mxfp4", "int8/g32", "int4/g32", "int5/g32/absmax_to=qmin"]


def _bits(a):
    return np.asarray(a, np.float32).view(np.uint32)


def _weights(shape=(48, 256), seed=0):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * rng.uniform(1e-3, 20.0, (shape[0], 1))).astype(np.float32)
    w[0, :32] = 0.0  # an all-zero block
    w[1, :32] = np.linspace(4.0, 5.0, 32)  # q4_1: a block whose range excludes 0
    return w


@pytest.mark.parametrize("spec", EXACT)
@pytest.mark.parametrize("axis", [0, 1])
def test_gguf_dequantize_equals_qlab_bit_for_bit(spec, axis):
    w = _weights()
    x = w if axis == 1 else np.ascontiguousarray(w.T)  # axis 0: an (in, out) kernel, blocks along the input
    q = qlab.quantize(x, qlab.parse_spec(spec).resolve(channel_axis=1 - axis, contract_axis=axis))
    t, blocks = ggml_blocks(q)
    assert t == ggml_type(spec)
    assert blocks.nbytes == qlab.packed_nbytes(q.spec, q.shape)  # the accounting is the GGML block size
    ref = np.asarray(qlab.dequantize(q))
    ours = ref if axis == 1 else ref.T
    if spec == "mxfp4":  # GGML's MXFP4 table has no -0: the one documented exception
        ours = ours + np.float32(0.0)
    theirs = gguf.quants.dequantize(blocks, t).reshape(w.shape)
    np.testing.assert_array_equal(_bits(theirs), _bits(ours))
    back = qtensor_from_blocks(blocks, t, w.shape)  # and the read-back QTensor
    np.testing.assert_array_equal(_bits(qlab.dequantize(back)), _bits(theirs))


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
def test_rtn_export_is_llamacpp_bytes(name):
    """The presets' codes are llama.cpp's: the exported blocks equal gguf's own quantizer's bytes."""
    w = _weights(seed=3)
    t, blocks = ggml_blocks(qlab.quantize(w, name))
    np.testing.assert_array_equal(blocks.reshape(-1), gguf.quants.quantize(w, t).reshape(-1))


@pytest.mark.parametrize("spec", ["int4/g128", "int4/g32/s=bf16", "uint4/g32/asym", "int8/ch", "nvfp4", "int3/g32"])
def test_spec_without_ggml_type_names_nearest(spec):
    with pytest.raises(ValueError, match="no exact GGML type.*nearest exportable specs: [qm]"):
        ggml_type(spec)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    model = Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0))
    return d, model, write_gguf(model, d / "float.gguf")


RULES = [Rule(r".*mlp/(gate|up).*", weight="q4_0"), Rule(r".*mlp/down.*", weight="q5_1"),
         Rule(r".*attn/[qk]_proj", weight="q8_0"), Rule(r".*attn/v_proj", weight="q4_1"),
         Rule(r"embed", weight="q8_0")]


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_tiny_gemma_round_trip(tiny, method):
    """Mixed per-layer types; every tensor read back by gguf equals the model's weight the forward uses."""
    d, model, src = tiny
    if method == "rtn":
        qm = ptq.rtn(model, RULES)
    else:
        batches = [np.random.default_rng(i).integers(0, 256, (2, 16)) for i in range(2)]
        qm = ptq.gptq(model, RULES[:-1], batches, forward=lambda m, b: m(b))
    out = export_gguf(qm, d / f"{method}.gguf", source=src)
    reader = gguf.GGUFReader(str(out))
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.ffn_up.weight"] == "Q4_0" and types["blk.1.ffn_down.weight"] == "Q5_1"
    assert types["blk.0.attn_v.weight"] == "Q4_1" and types["blk.0.attn_norm.weight"] == "F32"
    assert types["token_embd.weight"] == ("Q8_0" if method == "rtn" else "F32")
    # expected: the model's effective weights in GGUF layout
    eff = {}
    for p, L in qlab.nn.quantized_layers(qm).items():
        eff[p] = np.asarray(L.weight_value())
    assert {t.name for t in reader.tensors} == set(model_weights(model))
    for t in reader.tensors:
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape)))
        want = _effective(qm, t.name, eff)
        np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=t.name)
    meta = reader.fields
    assert meta["general.architecture"].contents() == "gemma3"
    assert meta["tokenizer.ggml.tokens"].contents() == gguf.GGUFReader(str(src)).fields["tokenizer.ggml.tokens"].contents()
    assert any(s.startswith("blk.0.ffn_up.weight=") for s in meta["qlab.specs"].contents())
    # the file loads back as a model with the same outputs as the quantized one
    back, _ = qlab.models.gemma3.load_gemma3(out)
    ids = np.arange(12)[None] % 256
    np.testing.assert_allclose(np.asarray(back(ids)), np.asarray(qm(ids)), rtol=0, atol=1e-5)


def test_awq_shared_scales_export_bit_for_bit(tiny, tmp_path):
    """AWQ with share_scales=True exports: gguf's dequantization equals the folded model's weights bit for
    bit (norms included: the input scales live in them), and the file's model computes the AWQ model's outputs."""
    d, model, src = tiny
    batches = [np.random.default_rng(i).integers(0, 256, (2, 16)) for i in range(2)]
    qm = ptq.awq(model, RULES[:-1], batches, forward=lambda m, b: m(b), share_scales=True)
    out = export_gguf(qm, tmp_path / "awq.gguf", source=src)
    fm = ptq.fold_input_scales(qm)
    eff = {p: np.asarray(L.weight_value()) for p, L in qlab.nn.quantized_layers(fm).items()}
    reader = gguf.GGUFReader(str(out))
    assert {t.name for t in reader.tensors} == set(model_weights(model))
    for t in reader.tensors:
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(int(s) for s in reversed(t.shape)))
        np.testing.assert_array_equal(_bits(got), _bits(_effective(fm, t.name, eff)), err_msg=t.name)
    norm = {t.name: t for t in reader.tensors}["blk.0.attn_norm.weight"]
    assert not np.array_equal(np.asarray(norm.data), np.asarray(model.layers[0].pre_attn_norm.weight[...]))
    back, _ = qlab.models.gemma3.load_gemma3(out)
    ids = np.arange(12)[None] % 256
    y = np.asarray(qm(ids))
    np.testing.assert_allclose(np.asarray(back(ids)), y, rtol=0, atol=1e-4 * np.abs(y).max())


def _effective(qm, gguf_name, eff):
    from qlab.models.gemma3.weights import weight_map  # the test maps names to layers

    for path, attr, name, transpose in weight_map(qm.config):
        if name == gguf_name:
            p = "/".join(map(str, path))
            if p in eff:
                w = eff[p]
            else:
                w = np.asarray(getattr(qlab.models.weight_map.submodule(qm, path), attr)[...])
            return w.T if transpose else w
    raise KeyError(gguf_name)


def test_export_bad_input(tiny, tmp_path):
    d, model, src = tiny
    qm = ptq.rtn(model, RULES)
    with pytest.raises(OSError, match="does not exist"):
        export_gguf(qm, tmp_path / "missing" / "m.gguf", source=src)
    with pytest.raises(ValueError, match="no quantized layers"):
        export_gguf(qlab.quantize_model(model, [Rule(".*", weight=None)]), tmp_path / "m.gguf", source=src)
    bad = ptq.rtn(model, [Rule(r".*mlp.*", weight="int4/g16")])
    with pytest.raises(ValueError, match="layers/0/mlp/.*no exact GGML type.*nearest"):
        export_gguf(bad, tmp_path / "m.gguf", source=src)
    with pytest.raises(ValueError, match="Gemma 3"):
        export_gguf(qlab.quantize_model(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), [Rule(".*", weight="q8_0")]),
                    tmp_path / "m.gguf", source=src)
    assert not list(tmp_path.iterdir())  # no partial file from any failure


def test_read_truncated_or_foreign(tiny, tmp_path):
    d, model, src = tiny
    out = export_gguf(ptq.rtn(model, RULES), tmp_path / "q.gguf", source=src)
    data = out.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(ValueError, match="truncated"):
        read_gguf(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:100])
    with pytest.raises(ValueError, match="damaged or truncated"):
        read_gguf(head)
    foreign = tmp_path / "x.gguf"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf(foreign)
    got = read_gguf(out)
    assert isinstance(got["blk.0.ffn_up.weight"], qlab.QTensor)


# ---- safetensors ------------------------------------------------------------------------------------

from qlab.export.safetensors import export_safetensors, load_safetensors, read_safetensors_metadata  # noqa: E402
from qlab.models import MLP  # noqa: E402


def _mlp(seed=0):
    return MLP(64, hidden=(64, 32), out=8, rngs=nnx.Rngs(seed))


MLP_RULES = [Rule("layers/0", weight="int4/g32"), Rule("layers/1", weight="nf4/g32"), Rule("head", weight="int8/ch")]


def _data_bytes(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return len(raw) - 8 - n, n


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq", "hqq"])
def test_safetensors_round_trip_bit_identical(tmp_path, method):
    x = np.asarray(np.random.default_rng(0).standard_normal((16, 64)), np.float32)
    batches = [x]
    if method == "rtn":
        qm = ptq.rtn(_mlp(), MLP_RULES)
    elif method == "gptq":
        qm = ptq.gptq(_mlp(), MLP_RULES, batches)
    elif method == "awq":
        qm = ptq.awq(_mlp(), [Rule("layers/[01]", weight="q4_1")], batches)
    else:
        qm = ptq.hqq(_mlp(), [Rule("layers/.*", weight="int4/g32/asym/zp=float")])
    p = export_safetensors(qm, tmp_path / "m.safetensors")
    back = load_safetensors(_mlp(seed=5), p)  # other random weights: all replaced from the file
    np.testing.assert_array_equal(_bits(back(x)), _bits(qm(x)))
    data, _ = _data_bytes(p)
    size = qlab.nn.model_size(qm)["packed_bytes"]
    extra = sum(4 * L.in_features for L in qlab.nn.quantized_layers(qm).values() if L.input_scale is not None)
    assert data == size + extra  # the accounting (+ AWQ's f32 input scales), plus the header
    meta = read_safetensors_metadata(p)
    assert meta["qlab_version"] == qlab.__version__ and set(meta["layers"]) <= {"layers/0", "layers/1", "head"}


def test_safetensors_tiny_gemma_awq(tiny, tmp_path):
    _, model, _ = tiny
    batches = [np.random.default_rng(i).integers(0, 256, (2, 16)) for i in range(2)]
    qm = ptq.awq(model, [Rule(r".*mlp.*", weight="q4_0"), Rule(r".*attn/.*_proj", weight="int4/g16")], batches,
                 forward=lambda m, b: m(b))
    p = export_safetensors(qm, tmp_path / "g.safetensors")
    back = load_safetensors(Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(3)), p)
    ids = np.arange(16)[None] % 256
    np.testing.assert_array_equal(_bits(back(ids)), _bits(qm(ids)))
    with pytest.raises(ValueError, match="input scale .* not folded.*share_scales=True"):
        export_gguf(qm, tmp_path / "g.gguf", source=tiny[2])
    assert sorted(q.name for q in tmp_path.iterdir()) == ["g.safetensors"]


def test_safetensors_bad_input(tmp_path):
    with pytest.raises(ValueError, match="no quantized layers"):
        export_safetensors(_mlp(), tmp_path / "m.safetensors")
    with pytest.raises(OSError, match="does not exist"):
        export_safetensors(ptq.rtn(_mlp(), MLP_RULES), tmp_path / "no" / "m.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\xff" * 16)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_safetensors(_mlp(), bad)
    p = export_safetensors(ptq.rtn(_mlp(), MLP_RULES), tmp_path / "m.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_safetensors(_mlp(), cut)
    assert sorted(q.name for q in tmp_path.iterdir()) == ["bad.safetensors", "cut.safetensors", "m.safetensors"]
