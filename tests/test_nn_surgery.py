"""qlab.nn.surgery: layers in call order, independent copies, effective float models; module hygiene."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlab
from qlab import nn as qnn
from qlab.models import CNN, MLP, CNNConfig, Transformer, TransformerConfig


class Backwards(nnx.Module):
    """Attribute names sort opposite to the call order; one layer is never called."""

    def __init__(self, rngs):
        self.z_in = nnx.Linear(4, 8, rngs=rngs)
        self.a_out = nnx.Linear(8, 2, rngs=rngs)
        self.m_unused = nnx.Linear(3, 3, rngs=rngs)

    def __call__(self, x):
        return self.a_out(jax.nn.relu(self.z_in(x)))


class Shared(nnx.Module):
    """One layer called twice, around another."""

    def __init__(self, rngs):
        self.b = nnx.Linear(4, 4, rngs=rngs)
        self.a = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return self.b(self.a(self.b(x)))


def _paths(layers):
    return [p for p, _ in layers]


def test_quantizable_layers_call_order_differs_from_graph_order():
    m = Backwards(nnx.Rngs(0))
    assert _paths(qnn.quantizable_layers(m)) == ["a_out", "m_unused", "z_in"]  # graph order: sorted names
    assert _paths(qnn.quantizable_layers(m, jnp.zeros((1, 4)))) == ["z_in", "a_out", "m_unused"]  # unused last
    assert _paths(qnn.quantizable_layers(Shared(nnx.Rngs(0)), np.zeros((2, 4)))) == ["b", "a"]  # first call ranks
    layers = dict(qnn.quantizable_layers(m, jnp.zeros((1, 4))))
    assert layers["z_in"] is m.z_in  # the model's own modules, not copies


def test_quantizable_layers_restores_layer_classes_even_on_error():
    before = (nnx.Linear.__call__, nnx.Conv.__call__, nnx.Einsum.__call__)
    with pytest.raises(Exception):
        qnn.quantizable_layers(Backwards(nnx.Rngs(0)), jnp.zeros((1, 5)))  # wrong width: the trace fails
    assert (nnx.Linear.__call__, nnx.Conv.__call__, nnx.Einsum.__call__) == before
    qnn.quantizable_layers(Backwards(nnx.Rngs(0)), jnp.zeros((1, 4)))
    assert (nnx.Linear.__call__, nnx.Conv.__call__, nnx.Einsum.__call__) == before


def test_quantizable_layers_kinds():
    t = Transformer(TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_len=4),
                    rngs=nnx.Rngs(0))
    tokens = jnp.zeros((1, 4), jnp.int32)
    default = _paths(qnn.quantizable_layers(t, tokens))
    assert default[0] == "blocks/0/attn/query" and default[-1] == "head" and "embed" not in default
    with_embed = _paths(qnn.quantizable_layers(t, tokens, kinds=("embed", "linear")))
    assert with_embed[0] == "embed" and set(with_embed) == set(default) | {"embed", "pos_embed"}
    with pytest.raises(ValueError, match="unknown kinds"):
        qnn.quantizable_layers(t, kinds=("dense",))


def test_copy_model_is_independent():
    m = MLP(4, hidden=(8,), rngs=nnx.Rngs(0))
    c = qnn.copy_model(m)
    assert c is not m and c.layers[0] is not m.layers[0]
    assert c.layers[0].kernel[...].unsafe_buffer_pointer() != m.layers[0].kernel[...].unsafe_buffer_pointer()
    x = jnp.ones((2, 4))
    np.testing.assert_array_equal(c(x), m(x))
    k0 = np.asarray(m.layers[0].kernel[...]).copy()
    c.layers[0].kernel[...] = jnp.zeros_like(k0)
    np.testing.assert_array_equal(np.asarray(m.layers[0].kernel[...]), k0)
    # a quantized model copies with its quantizer state (LSQ steps are QuantParams)
    qm = qnn.quantize_model(m, [qnn.Rule(".*", weight="int4/ch", weight_quantizer="lsq")])
    qc = qnn.copy_model(qm)
    np.testing.assert_array_equal(qc(x), qm(x))
    qc.head.weight_quant.step[...] = qc.head.weight_quant.step[...] * 2
    assert not np.array_equal(np.asarray(qc.head.weight_quant.step[...]), np.asarray(qm.head.weight_quant.step[...]))


def _assert_same_outputs(eff, qm, x):
    assert eff is not None
    np.testing.assert_allclose(np.asarray(eff(x)), np.asarray(qm(x)), rtol=1e-6, atol=1e-6)


def test_effective_model_equals_weight_only_quantized_model():
    m = MLP(8, hidden=(16,), out=3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (5, 8))
    for rules in ([qnn.Rule(".*", weight="int3/ch")],
                  [qnn.Rule("head"), qnn.Rule(".*", weight="int4/g4", weight_quantizer="lsq")]):
        qm = qnn.quantize_model(m, rules)
        eff = qnn.effective_model(qm, m)
        _assert_same_outputs(eff, qm, x)
        assert all(type(L).__name__ == "Linear" for _, L in qnn.quantizable_layers(eff))
        assert float(jnp.abs(eff(x) - m(x)).max()) > 1e-5  # the weights really changed
    # trained (changed) weights and biases are taken from the quantized model
    qm = qnn.quantize_model(m, [qnn.Rule(".*", weight="int8/ch")])
    qm.head.layer.bias[...] = qm.head.layer.bias[...] + 1.0
    qm.layers[0].layer.kernel[...] = qm.layers[0].layer.kernel[...] * 0.5
    _assert_same_outputs(qnn.effective_model(qm, m), qm, x)
    # converted layers (real codes) and a PTQ input scale folded into the kernel
    cm = qnn.convert(qm)
    qnn.set_input_scale(cm, "layers/0", jnp.linspace(0.5, 2.0, 8))
    _assert_same_outputs(qnn.effective_model(cm, m), cm, x)
    # the template itself is not changed
    np.testing.assert_array_equal(np.asarray(qnn.copy_model(m)(x)), np.asarray(m(x)))


def test_effective_model_conv_and_other_state():
    cfg = CNNConfig(input_shape=(8, 8, 1), channels=(4,), hidden=(8,), num_classes=3)
    cnn = CNN(cfg, rngs=nnx.Rngs(0))
    xi = jax.random.normal(jax.random.key(1), (2, 8, 8, 1))
    qc = qnn.quantize_model(cnn, [qnn.Rule(".*", weight="int4/ch")])
    _assert_same_outputs(qnn.effective_model(qc, cnn), qc, xi)

    t = Transformer(TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_len=4),
                    rngs=nnx.Rngs(0))
    tokens = jnp.array([[1, 2, 3, 4]])
    # the attention call sites stay float (a float rule: not intercepted), every weight layer int8
    qt = qnn.quantize_model(t, [qnn.Rule(".*/einsum_.*"), qnn.Rule(".*", weight="int8/ch")])
    qt.ln_f.scale[...] = qt.ln_f.scale[...] * 1.5  # a non-layer variable, as QAT may change it
    eff = qnn.effective_model(qt, t)
    _assert_same_outputs(eff, qt, tokens)
    np.testing.assert_array_equal(np.asarray(eff.ln_f.scale[...]), np.asarray(qt.ln_f.scale[...]))
    assert float(jnp.abs(eff.embed.embedding[...] - t.embed.embedding[...]).max()) > 0  # embed quantized too


def test_effective_model_none_when_not_a_float_forward():
    m = MLP(8, hidden=(16,), out=3, rngs=nnx.Rngs(0))
    assert qnn.effective_model(qnn.quantize_model(m, [qnn.Rule(".*", weight="int8", act="int8")]), m) is None
    assert qnn.effective_model(qnn.quantize_model(m, [qnn.Rule(".*", weight="int8", outlier_threshold=3.0)]), m) is None
    t = Transformer(TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_len=4),
                    rngs=nnx.Rngs(0))
    # a quantized call site is computed in float by the effective model (documented): only layers carry over
    qt = qnn.quantize_model(t, [qnn.Rule(".*/einsum_0", weight="int2")])
    tokens = jnp.array([[1, 2, 3, 4]])
    np.testing.assert_allclose(np.asarray(qnn.effective_model(qt, t)(tokens)), np.asarray(t(tokens)), rtol=1e-6)
    assert float(jnp.abs(qt(tokens) - t(tokens)).max()) > 1e-4
    other = MLP(8, hidden=(16, 16), out=3, rngs=nnx.Rngs(0))  # a template layer the model lacks
    assert qnn.effective_model(qnn.quantize_model(m, [qnn.Rule(".*", weight="int8")]), other) is None


def test_walk_layers_and_find_layer():
    qm = qnn.quantize_model(MLP(4, hidden=(8, 8), rngs=nnx.Rngs(0)), [qnn.Rule("layers/1", weight="int8")])
    w = qnn.surgery.walk_layers(qm)
    assert list(w.quantized) == ["layers/1"] and list(w.floating) == ["head", "layers/0"]
    assert "layers/1/layer" not in w.floating  # the wrapped layer is not listed again
    with pytest.raises(ValueError, match="layers/1"):
        qnn.find_layer(qm, "head")


def test_public_names_resolve():
    from qlab.nn.report import unmatched_rules

    assert unmatched_rules is qnn.unmatched_rules
    for name in qnn.__all__:
        assert getattr(qnn, name) is not None
    assert qlab.quantize_model is qnn.quantize_model

