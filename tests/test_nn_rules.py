"""qlab.nn rules: order, full-match semantics, unmatched rules, report and size."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
from flax import nnx

import qlab
from qlab import nn as qnn
from qlab.models import MLP


def _mlp():
    return MLP(16, hidden=(32, 32), out=4, rngs=nnx.Rngs(0))


def test_first_full_match_wins_and_none_keeps_float():
    rules = [
        qnn.Rule("layers/0", weight="int4/g8"),
        qnn.Rule("layers/.*", weight="int8/ch"),
        qnn.Rule("head"),  # float
        qnn.Rule("lay.*", weight="int2/ch"),
    ]
    with pytest.warns(UserWarning, match="lay"):
        qm = qnn.quantize_model(_mlp(), rules, allow_unmatched=True)
    df = qnn.layer_report(qm, warn=False).set_index("layer")
    assert df.loc["layers/0", "rule"] == "layers/0"
    assert df.loc["layers/0", "weight_spec"] == "int4/g8a0"  # groups along the contraction axis
    assert df.loc["layers/1", "rule"] == "layers/.*"
    assert df.loc["layers/1", "weight_spec"] == "int8/ch1"  # per output channel
    assert df.loc["head", "rule"] == "head" and pd.isna(df.loc["head", "weight_spec"])
    assert isinstance(qm.head, nnx.Linear) and isinstance(qm.layers[0], qnn.QuantizedLayer)
    assert df.attrs["unmatched_rules"] == ["lay.*"]  # never reached: every layer matched earlier


def test_fullmatch_not_search():
    # "ayers/0" would match with re.search; fullmatch must not
    with pytest.raises(ValueError, match="ayers/0"):
        qnn.quantize_model(_mlp(), [qnn.Rule("ayers/0", weight="int8")])
    qm = qnn.quantize_model(_mlp(), [qnn.Rule("layers/[0-9]+", weight="int8")])
    assert set(qnn.quantized_layers(qm)) == {"layers/0", "layers/1"}


def test_unmatched_rule_error_and_allow():
    with pytest.raises(ValueError, match=r"Rule\('nope'"):
        qnn.quantize_model(_mlp(), [qnn.Rule("nope", weight="int8"), qnn.Rule(".*", weight="int8")])
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        qm = qnn.quantize_model(_mlp(), [qnn.Rule("nope", weight="int8"), qnn.Rule(".*", weight="int8")],
                                allow_unmatched=True)
    assert any("nope" in str(x.message) for x in w)
    df = qnn.layer_report(qm, warn=False)
    assert df.attrs["unmatched_rules"] == ["nope"]
    assert len(df) == 3 and (df.rule == ".*").all()


def test_float_model_untouched_and_copy():
    m = _mlp()
    k0 = np.asarray(m.layers[0].kernel[...]).copy()
    qm = qnn.quantize_model(m, [qnn.Rule(".*", weight="int2/ch")])
    qm.layers[0].kernel[...] = jnp.zeros_like(qm.layers[0].kernel[...])
    assert isinstance(m.layers[0], nnx.Linear)
    np.testing.assert_array_equal(np.asarray(m.layers[0].kernel[...]), k0)


def test_rule_validation():
    with pytest.raises(ValueError, match="weight_quantizer"):
        qnn.Rule(".*", weight="int8", weight_quantizer="foo")
    with pytest.raises(ValueError, match="not a valid regex"):
        qnn.Rule("(", weight="int8")
    with pytest.raises(ValueError):
        qnn.Rule(".*", weight="int4/bogus")
    assert qnn.Rule(".*", weight="int4/g128").weight == qlab.parse_spec("int4/g128")


def test_report_columns_and_model_size():
    m = _mlp()
    qm = qnn.quantize_model(m, [qnn.Rule("head"), qnn.Rule(".*", weight="int4/g8", act="int8")])
    df = qnn.layer_report(qm)
    for col in ["layer", "kind", "rule", "weight_spec", "act_spec", "params", "bits_per_weight",
                "packed_bytes", "float_bytes", "sqnr_db"]:
        assert col in df.columns
    row = df.set_index("layer").loc["layers/0"]
    assert row.params == 16 * 32 and row.float_bytes == 4 * 16 * 32
    assert row.packed_bytes == qlab.packed_nbytes(qlab.parse_spec("int4/g8").resolve(1, 0), (16, 32))
    w = qm.layers[0].kernel[...]
    assert row.sqnr_db == pytest.approx(float(qlab.sqnr_db(w, qlab.fake_quant(w, "int4/g8a0"))), rel=1e-5)
    size = qnn.model_size(qm)
    n_all = sum(int(np.size(v[...])) for _, v in nnx.to_flat_state(nnx.state(m, nnx.Param)))
    assert size["params"] == n_all
    q_bytes = sum(qlab.packed_nbytes(qlab.parse_spec("int4/g8").resolve(1, 0), s) for s in [(16, 32), (32, 32)])
    float_rest = 4 * (n_all - 16 * 32 - 32 * 32)  # head + all biases in f32
    assert size["packed_bytes"] == q_bytes + float_rest
    assert size["float_bytes"] == 4 * n_all


def test_treescope_renders_rules_and_state():
    import treescope

    qm = qnn.quantize_model(_mlp(), [qnn.Rule(".*", weight="int3/ch", weight_quantizer="lsq", act="int8",
                                              act_quantizer="pact")])
    text = treescope.render_to_text(qm)
    assert "QuantizedLayer" in text and "Rule(" in text and "QuantParam" in text and "lsq" in text


def test_einsum_and_conv_layers_resolve_axes():
    ein = nnx.Einsum("btd,dnh->btnh", (8, 2, 4), (2, 4), rngs=nnx.Rngs(0))
    qe = qnn.quantize_model(ein, [qnn.Rule(".*", weight="int4/g4", act="int8")])
    assert qe.weight_quant.spec.granularity.axis == 0  # groups along the contracted d axis
    x = jax.random.normal(jax.random.key(0), (2, 3, 8))
    ref = jnp.einsum("btd,dnh->btnh", qlab.fake_quant(x.reshape(-1, 8), "int8").reshape(x.shape),
                     qlab.fake_quant(ein.kernel[...], "int4/g4a0")) + ein.bias[...]
    np.testing.assert_allclose(qe(x), ref, rtol=1e-5, atol=1e-5)

    conv = nnx.Conv(8, 4, (3, 3), rngs=nnx.Rngs(0))
    qc = qnn.quantize_model(conv, [qnn.Rule(".*", weight="int4/g4")])
    assert qc.weight_quant.spec == qlab.parse_spec("int4/g4a2")  # groups along input channels
    xi = jax.random.normal(jax.random.key(1), (1, 5, 5, 8))
    conv2 = nnx.clone(conv)
    conv2.kernel[...] = qlab.fake_quant(conv.kernel[...], "int4/g4a2")
    np.testing.assert_allclose(qc(xi), conv2(xi), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already quantized"):
        qnn.quantize_model(qc, [qnn.Rule(".*", weight="int8")])
    with pytest.raises(ValueError, match="does not divide"):
        qnn.quantize_model(conv, [qnn.Rule(".*", weight="int4/g3")])


class _Backwards(nnx.Module):
    """Attribute names sort opposite to the call order (graph order: a_out, m_mid, z_in)."""

    def __init__(self, rngs):
        self.z_in = nnx.Linear(4, 8, rngs=rngs)
        self.m_mid = nnx.Linear(8, 8, rngs=rngs)
        self.a_out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        return self.a_out(jax.nn.relu(self.m_mid(jax.nn.relu(self.z_in(x)))))


def _quantized(qm):
    return sorted(qnn.quantized_layers(qm))


def test_position_tokens_call_order_with_example_else_graph_order():
    m = _Backwards(nnx.Rngs(0))
    x = jnp.ones((2, 4))
    assert _quantized(qnn.quantize_model(m, [qnn.Rule("@first", weight="int8/ch")], example=x)) == ["z_in"]
    assert _quantized(qnn.quantize_model(m, [qnn.Rule("@last", weight="int8/ch")], example=x)) == ["a_out"]
    assert _quantized(qnn.quantize_model(m, [qnn.Rule("@first", weight="int8/ch")])) == ["a_out"]  # graph order
    qm = qnn.quantize_model(m, [qnn.Rule("@first|@last", weight="int8/ch"), qnn.Rule(".*", weight="int4/ch")],
                            example=x)
    df = qnn.layer_report(qm).set_index("layer")
    assert df.loc["z_in", "rule"] == df.loc["a_out", "rule"] == "z_in|a_out"  # the resolved pattern
    assert df.loc["z_in", "weight_spec"] == "int8/ch1" and df.loc["m_mid", "weight_spec"] == "int4/ch1"
    assert qnn.applied_rules(qm)[0] == qnn.Rule("z_in|a_out", weight="int8/ch")
    np.testing.assert_allclose(np.asarray(qm(x)), np.asarray(qnn.quantize_model(
        m, [qnn.Rule("z_in|a_out", weight="int8/ch"), qnn.Rule(".*", weight="int4/ch")])(x)))
    # a float rule by position keeps those layers float
    qf = qnn.quantize_model(m, [qnn.Rule("@first"), qnn.Rule(".*", weight="int4/ch")], example=x)
    assert _quantized(qf) == ["a_out", "m_mid"] and isinstance(qf.z_in, nnx.Linear)


def test_resolve_positions_against_paths():
    rules = qnn.resolve_positions([qnn.Rule("@first", weight="int8"), ("blocks/@last", "int4"), qnn.Rule(".*")],
                                  ["x+1", "blocks/0", "y"])
    assert [r.pattern for r in rules] == [r"x\+1", "blocks/y", ".*"]
    assert rules[0].matches("x+1") and not rules[0].matches("xx1")  # paths are literals, not regexes
    assert rules[0].weight == qlab.parse_spec("int8") and rules[1].weight == qlab.parse_spec("int4")
    assert [r.uses_positions for r in rules] == [False, False, False]
    # without paths the tokens stay, match nothing, and are reported as unmatched rules
    assert qnn.resolve_positions([qnn.Rule("@last", weight="int8")], [])[0].pattern == "@last"


def test_position_rule_matching_nothing_is_raised_or_reported():
    class NoLayers(nnx.Module):
        def __call__(self, x):
            return x

    rules = [qnn.Rule("@first", weight="int8")]
    with pytest.raises(ValueError, match="@first"):
        qnn.quantize_model(NoLayers(), rules)
    with pytest.warns(UserWarning, match="@first"):
        qm = qnn.quantize_model(NoLayers(), rules, allow_unmatched=True)
    assert qnn.unmatched_rules(qm) == ("@first",)
    # on a model with layers the resolved rule that a previous rule shadows is reported by its resolved pattern
    with pytest.warns(UserWarning):
        qm = qnn.quantize_model(_Backwards(nnx.Rngs(0)), [qnn.Rule(".*", weight="int8"), qnn.Rule("@last", weight="int4")],
                                example=jnp.ones((1, 4)), allow_unmatched=True)
    assert qnn.unmatched_rules(qm) == ("a_out",)


def test_linen_refuses_unresolved_positions():
    with pytest.raises(ValueError, match="resolve_positions"):
        with qnn.linen_quant.linen_quantization([qnn.Rule("@first", weight="int8")]):
            pass
