"""Weights a user module multiplies itself (jnp.einsum / dot / matmul / lax.dot_general on its own nnx.Param)
are layers: counted by model_size, listed by layer_report right after quantize_model, quantized by PTQ."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlab
from qlab import nn as qnn
from qlab import ptq
from qlab.ptq.gptq import gptq as gptq_kernel

D, H = 32, 16


class Mixer(nnx.Module):
    """x -> einsum(x, w) -> relu -> matmul(., v): two Param weights used through call sites."""

    def __init__(self, rngs):
        self.w = nnx.Param(jax.random.normal(rngs.params(), (D, H)))
        self.v = nnx.Param(jax.random.normal(rngs.params(), (H, 4)))
        self.scale = nnx.Param(jnp.ones((4,)))

    def __call__(self, x):
        h = jax.nn.relu(jnp.einsum("btd,dh->bth", x, self.w[...]))
        return jnp.matmul(h, self.v[...]) * self.scale[...]


class Net(nnx.Module):
    def __init__(self, rngs):
        self.mix = Mixer(rngs)
        self.out = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.out(self.mix(x))


def _x(seed=0, b=4):
    return jax.random.normal(jax.random.key(seed), (b, 6, D))


RULES = [qnn.Rule("mix/einsum_0", weight="int4/g8"), qnn.Rule("mix/matmul_0", weight="int8/ch")]


def test_report_and_size_right_after_quantize_model():
    m = Net(nnx.Rngs(0))
    qm = qnn.quantize_model(m, RULES, example=_x())
    rep = qnn.layer_report(qm).set_index("layer")  # no forward pass yet
    assert rep.loc["mix/einsum_0", "weight_spec"] == "int4/g8a0" and rep.loc["mix/einsum_0", "params"] == D * H
    assert rep.loc["mix/einsum_0", "packed_bytes"] == D * H // 2 + 2 * (D // 8) * H
    assert rep.loc["mix/matmul_0", "bits_per_weight"] == pytest.approx(8 + 16 / H)
    assert np.isfinite(rep.loc["mix/einsum_0", "sqnr_db"])
    before, after = qnn.model_size(qnn.quantize_model(m, [], allow_unmatched=True)), qnn.model_size(qm)
    assert after["params"] == before["params"]  # the shared Param is counted once
    saved = 4 * D * H - (D * H // 2 + 2 * (D // 8) * H) + 4 * H * 4 - (H * 4 + 2 * 4)
    assert before["packed_bytes"] - after["packed_bytes"] == saved
    # a forward pass adds no second row for the same call site
    qm(_x())
    assert list(qnn.layer_report(qm)["layer"]).count("mix/einsum_0") == 1


def test_qat_forward_uses_the_fake_quantized_param_and_trains_it():
    m = Net(nnx.Rngs(0))
    qm = qnn.quantize_model(m, RULES, example=_x())
    x = _x(1)
    wq = qlab.fake_quant(m.mix.w[...], qlab.parse_spec("int4/g8").resolve(1, 0))
    vq = qlab.fake_quant(m.mix.v[...], qlab.parse_spec("int8/ch").resolve(1, 0))
    want = m.out(jnp.matmul(jax.nn.relu(jnp.einsum("btd,dh->bth", x, wq)), vq) * m.mix.scale[...])
    np.testing.assert_allclose(qm(x), want, rtol=1e-5, atol=1e-5)
    g = nnx.grad(lambda mm: jnp.sum(mm(x) ** 2))(qm)
    # STE: the Param itself gets gradients (in the state it is listed once, under the layer that shares it)
    assert float(jnp.abs(g.mix.qlab_sites["einsum_0"].layer.kernel[...]).sum()) > 0


def test_rtn_and_gptq_quantize_call_site_params():
    m = Net(nnx.Rngs(0))
    r = ptq.rtn(m, RULES, example=_x())
    q = qnn.find_layer(r, "mix/einsum_0").qtensor()
    np.testing.assert_array_equal(q.codes, qlab.quantize(m.mix.w[...], qlab.parse_spec("int4/g8").resolve(1, 0)).codes)
    x = _x(1)
    want = m.out(jnp.matmul(jax.nn.relu(jnp.einsum("btd,dh->bth", x, qlab.dequantize(q))),
                            qlab.dequantize(qnn.find_layer(r, "mix/matmul_0").qtensor())) * m.mix.scale[...])
    np.testing.assert_allclose(r(x), want, rtol=1e-5, atol=1e-5)
    batches = [_x(i) for i in range(3)]
    g = ptq.gptq(m, RULES[:1], batches, example=batches[0])
    xs = np.concatenate([np.asarray(b).reshape(-1, D) for b in batches])
    ref = gptq_kernel(m.mix.w[...], jnp.asarray(xs.T @ xs), "int4/g8")
    np.testing.assert_array_equal(qnn.find_layer(g, "mix/einsum_0").qtensor().codes, ref.codes)
    assert ptq.ptq_info(g)["calibration_input"].tolist() == ["call-site activation"]
    with pytest.raises(ValueError, match="call sites"):
        ptq.awq(m, RULES[:1], batches, example=batches[0])


def test_without_example_it_is_an_error_naming_the_params():
    with pytest.raises(ValueError, match=r"\{'mix': \['v', 'w'\]\}; pass example="):
        qnn.quantize_model(Net(nnx.Rngs(0)), RULES)
    with pytest.raises(ValueError, match="example="):
        ptq.rtn(Net(nnx.Rngs(0)), RULES)


def test_activation_only_call_sites_are_unchanged():
    """q.k^T in a Transformer: both operands are activations; no Param, no layer, no example needed."""
    from qlab.models import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_len=4)
    qm = qnn.quantize_model(Transformer(cfg, rngs=nnx.Rngs(0)), [qnn.Rule(".*/einsum_0", weight="int8")])
    assert "blocks/0/attn/einsum_0" not in qnn.quantized_layers(qm)
