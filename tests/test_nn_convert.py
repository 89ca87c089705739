"""Call-site interception, Embed/attend, convert, load_quantized_weights, capture, orbax."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlab
from qlab import nn as qnn
from qlab.models import CNN, CNNConfig, Transformer, TransformerConfig


class Attn(nnx.Module):
    """A user module: projections are nnx.Linear, scores and the weighted sum are jnp.einsum."""

    def __init__(self, d, rngs):
        self.q = nnx.Linear(d, d, rngs=rngs)
        self.k = nnx.Linear(d, d, rngs=rngs)
        self.v = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x):
        q, k, v = self.q(x), self.k(x), self.v(x)
        s = jnp.einsum("btd,bsd->bts", q, k) / math.sqrt(x.shape[-1])
        p = jax.nn.softmax(s, axis=-1)
        return jnp.einsum("bts,bsd->btd", p, v)


class Net(nnx.Module):
    def __init__(self, rngs):
        self.attn = Attn(8, rngs)

    def __call__(self, x):
        return self.attn(x)


def test_einsum_interception_in_user_module():
    net = Net(nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    rules = [qnn.Rule("attn/einsum_0", act="int8", weight="int4")]  # q.k only
    qn = qnn.quantize_model(net, rules)
    a = net.attn
    q, k, v = a.q(x), a.k(x), a.v(x)
    s = jnp.einsum("btd,bsd->bts", qlab.fake_quant(q, "int8"), qlab.fake_quant(k, "int4")) / math.sqrt(8)
    ref = jnp.einsum("bts,bsd->btd", jax.nn.softmax(s, axis=-1), v)
    y = qn(x)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    assert float(jnp.abs(y - net(x)).max()) > 1e-4
    np.testing.assert_allclose(nnx.jit(lambda m, x: m(x))(qn, x), ref, rtol=1e-6, atol=1e-6)
    # the float model and code outside the model are not intercepted
    np.testing.assert_array_equal(jnp.einsum("ij,jk->ik", jnp.eye(2), jnp.eye(2)), jnp.eye(2))
    df = qnn.layer_report(qn)
    assert "attn/einsum_0" in set(df.layer) and "attn/einsum_1" not in set(df.layer)
    # projections were not touched (no rule matched them)
    assert isinstance(qn.attn.q, nnx.Linear)


def test_embed_lookup_and_attend():
    cfg = TransformerConfig(vocab_size=24, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8,
                            tie_embeddings=True)
    t = Transformer(cfg, rngs=nnx.Rngs(0))
    qt = qnn.quantize_model(t, [qnn.Rule("embed", weight="int4/ch", act="int8"), qnn.Rule(".*")])
    table = t.embed.embedding[...]
    tq = qlab.fake_quant(table, "int4/ch0")  # one scale per token row
    ids = jnp.array([[1, 5, 7, 23]])
    np.testing.assert_array_equal(qt.embed(ids), jnp.take(tq, ids, axis=0))
    h = jax.random.normal(jax.random.key(3), (1, 4, 16))
    np.testing.assert_allclose(qt.embed.attend(h), jnp.dot(qlab.fake_quant(h.reshape(-1, 16), "int8").reshape(h.shape), tq.T),
                               rtol=1e-6, atol=1e-6)
    # the tied projection is used by the model's forward
    y = qt(ids)
    assert y.shape == (1, 4, 24) and float(jnp.abs(y - t(ids)).max()) > 0


def test_convert_bit_identical_cnn_and_transformer():
    cnn = CNN(CNNConfig.digits(), rngs=nnx.Rngs(0))
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
    rules = [qnn.Rule("convs/0", weight="int3/ch", weight_quantizer="lsq", act="int8"),
             qnn.Rule(".*", weight="int4/g16", act="int8")]
    qm = qnn.quantize_model(cnn, rules)
    cm = qnn.convert(qm)
    fwd = nnx.jit(lambda m, x: m(x))
    np.testing.assert_array_equal(np.asarray(fwd(cm, x)), np.asarray(fwd(qm, x)))
    assert all(L.converted for L in qnn.quantized_layers(cm).values())
    assert not any(L.converted for L in qnn.quantized_layers(qm).values())  # QAT model untouched
    df = qnn.layer_report(cm)
    assert (df.weight_quantizer == "converted").all()
    assert df.set_index("layer").loc["dense/0", "packed_bytes"] == qlab.packed_nbytes(
        qlab.parse_spec("int4/g16").resolve(1, 0), (128, 64))
    # held packed: 3-bit codes as one bit stream (8 codes in 3 bytes); unpacked to int8 codes on demand
    conv0 = cm.convs[0]
    kshape = conv0.qtensor().shape
    assert conv0.q_codes[...].dtype == jnp.uint8 and conv0.q_codes[...].shape == (-(-np.prod(kshape) * 3 // 8),)
    assert conv0.qtensor().codes.dtype == jnp.int8
    assert conv0.q_scale[...].dtype == {"f32": jnp.float32, "f16": jnp.float16}[conv0.qtensor().spec.scale_dtype]
    dense0 = qnn.quantized_layers(cm)["dense/0"]
    assert dense0.q_scale[...].dtype == jnp.float16 and dense0.q_codes[...].shape == (64, 64)  # int4: 2 rows a byte

    cfg = TransformerConfig(vocab_size=20, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8)
    t = Transformer(cfg, rngs=nnx.Rngs(1))
    qt = qnn.quantize_model(t, [qnn.Rule(".*", weight="int8/ch", act="int8")])
    ids = jnp.array([[0, 3, 4, 19, 2]])
    np.testing.assert_array_equal(np.asarray(fwd(qnn.convert(qt), ids)), np.asarray(fwd(qt, ids)))


def test_load_quantized_weights():
    lin = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    qm = qnn.quantize_model(lin, [qnn.Rule(".*", weight="int8/ch")])
    qt = qlab.quantize(lin.kernel[...], "int3/g4a0")
    qnn.load_quantized_weights(qm, {"": qt})
    x = jnp.ones((2, 8))
    np.testing.assert_allclose(qm(x), x @ qlab.dequantize(qt) + lin.bias[...], rtol=1e-6)
    row = qnn.layer_report(qm).iloc[0]
    assert row.converted and row.packed_bytes == qt.packed_bytes and row.weight_spec == "int3/g4a0"
    assert row.sqnr_db == pytest.approx(float(qlab.sqnr_db(lin.kernel[...], qlab.dequantize(qt))), rel=1e-5)
    with pytest.raises(ValueError, match="shape"):
        qnn.load_quantized_weights(qm, {"": qlab.quantize(jnp.ones((4, 4)), "int8")})


def test_capture_matches_numpy():
    from qlab.models import MLP

    m = MLP(6, hidden=(5,), out=3, rngs=nnx.Rngs(0))
    qm = qnn.quantize_model(m, [qnn.Rule(".*", weight="int4/ch", act="int8")])
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(7, 6)).astype(np.float32) for _ in range(3)]
    st = qnn.capture(qm, batches, max_input_rows=10)
    X = np.concatenate(batches)
    s0 = st["layers/0"]
    np.testing.assert_allclose(s0["hessian"], X.T @ X, rtol=1e-5, atol=1e-5)
    assert s0["count"] == 21
    np.testing.assert_allclose(s0["absmax"], np.abs(X).max(0), rtol=1e-6)
    np.testing.assert_allclose(s0["mean_abs"], np.abs(X).mean(0), rtol=1e-5)
    np.testing.assert_array_equal(s0["inputs"], X[:10])
    H = np.maximum(X @ np.asarray(m.layers[0].kernel[...]) + np.asarray(m.layers[0].bias[...]), 0)  # float forward
    np.testing.assert_allclose(st["head"]["hessian"], H.T @ H, rtol=1e-4, atol=1e-4)
    assert qm.layers[0].capture_stats is None  # the model itself is not changed
    with pytest.raises(ValueError, match="no data"):
        qnn.capture(qm, [])


def test_orbax_round_trip(tmp_path):
    import orbax.checkpoint as ocp
    from qlab.models import MLP

    m = MLP(8, hidden=(16,), out=3, rngs=nnx.Rngs(0))
    rules = [qnn.Rule("layers/.*", weight="int3/ch", weight_quantizer="lsq", act="int8", act_range="ema"),
             qnn.Rule("head", weight="int4/ch", act="uint8", act_quantizer="pact")]
    qm = qnn.quantize_model(m, rules)
    x = jax.random.normal(jax.random.key(0), (4, 8))
    qm(x)  # initialise stats
    qm.layers[0].weight_quant.step[...] = qm.layers[0].weight_quant.step[...] * 1.1
    qm.head.act_quant.alpha[...] = jnp.array(0.8)
    qm.eval()
    y0 = qm(x)
    state = nnx.state(qm)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp_path / "ckpt", state)
    ckpt.wait_until_finished()

    fresh = qnn.quantize_model(MLP(8, hidden=(16,), out=3, rngs=nnx.Rngs(5)), rules)
    fresh.eval()
    assert float(jnp.abs(fresh(x) - y0).max()) > 0
    restored = ckpt.restore(tmp_path / "ckpt", nnx.state(fresh))
    nnx.update(fresh, restored)
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(y0))
    assert float(fresh.head.act_quant.alpha[...]) == pytest.approx(0.8)
    assert int(fresh.layers[0].act_quant.count[...]) == 1
