"""Embeddings are layers too: nnx.Embed quantized by rules (lookup of gathered codes, the tied head on the
same codes), in QAT, RTN / GPTQ / AWQ / HQQ, model_size, layer_report and qlab.analysis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlab
from qlab import nn as qnn
from qlab import ptq
from qlab.analysis import candidate_table, sensitivity
from qlab.models import Transformer, TransformerConfig
from qlab.models import gemma3 as G
from qlab.ptq.gptq import gptq as gptq_kernel

V, D = 96, 32


def _gemma():
    return G.Gemma3(G.Gemma3Config.tiny(vocab_size=V, n_layers=2), rngs=nnx.Rngs(0))


def _tokens(n=2, t=8, seed=0):
    return [jax.random.randint(jax.random.key(seed + i), (2, t), 0, V) for i in range(n)]


def _float_ops(fn, *args):
    """Shapes of every float array an op of ``fn``'s jaxpr produces."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    out = []

    def walk(jp):
        for e in jp.eqns:
            out.extend(tuple(v.aval.shape) for v in e.outvars if jnp.issubdtype(v.aval.dtype, jnp.floating))
            for p in e.params.values():
                sub = getattr(p, "jaxpr", p)
                if hasattr(sub, "eqns"):
                    walk(sub)

    walk(jaxpr)
    return out


@pytest.mark.parametrize("spec, granularity", [("int8/ch", qlab.per_channel(0)), ("int4/g8", qlab.per_group(8, 1))])
def test_default_axes_are_per_token_rows(spec, granularity):
    qm = qnn.quantize_model(_gemma(), [qnn.Rule("embed", weight=spec)])
    assert qm.embed.weight_quant.spec.granularity == granularity
    table = qm.embed.embedding[...]
    # independent reference: each row quantized on its own
    ref = np.stack([np.asarray(qlab.fake_quant(table[i:i + 1], qlab.parse_spec(spec).resolve(0, 1))[0]) for i in range(V)])
    np.testing.assert_array_equal(np.asarray(qm.embed.weight_value()), ref)


def test_qat_lookup_gathers_rows_and_head_uses_the_same_values():
    qm = qnn.quantize_model(_gemma(), [qnn.Rule("embed", weight="int4/g8")])
    ids = _tokens()[0]
    full = qm.embed.weight_value()
    np.testing.assert_array_equal(qm.embed(ids), jnp.take(full, ids, axis=0))
    h = jax.random.normal(jax.random.key(3), (2, 8, D))
    np.testing.assert_allclose(qm.embed.attend(h), h @ full.T, rtol=1e-5, atol=1e-5)
    assert all(s[-2:] != (V, D) for s in _float_ops(lambda i: qm.embed(i), ids))  # never the whole table


def test_qat_gradient_reaches_only_looked_up_rows():
    qm = qnn.quantize_model(_gemma(), [qnn.Rule("embed", weight="int8/ch")])
    ids = jnp.array([[1, 5, 5]])
    g = nnx.grad(lambda m: jnp.sum(m.embed(ids) ** 2))(qm)
    gt = np.asarray(g.embed.layer.embedding[...])
    rows = np.abs(gt).sum(axis=1) > 0
    assert rows.tolist() == [i in (1, 5) for i in range(V)]


def test_converted_lookup_dequantizes_gathered_rows_only():
    m = _gemma()
    qm = ptq.rtn(m, [qnn.Rule("embed", weight="int4/g8")])
    q = qm.embed.qtensor()
    ref = qlab.quantize(m.embed.embedding[...], qlab.parse_spec("int4/g8").resolve(0, 1))
    np.testing.assert_array_equal(q.codes, ref.codes)
    ids = _tokens()[0]
    np.testing.assert_array_equal(qm.embed(ids), jnp.take(qlab.dequantize(q), ids, axis=0))
    h = jax.random.normal(jax.random.key(3), (2, 8, D))
    np.testing.assert_allclose(qm.embed.attend(h), h @ qlab.dequantize(q).T, rtol=1e-5, atol=1e-5)
    assert all(s[-2:] != (V, D) for s in _float_ops(lambda i: qm.embed(i), ids))  # no (V, D) float array


@pytest.mark.parametrize("spec", ["int8/ch", "int4/g32"])
def test_model_size_and_report_count_the_embedding(spec):
    m = _gemma()
    before = qnn.model_size(qnn.quantize_model(m, [], allow_unmatched=True))["packed_bytes"]
    qm = qnn.quantize_model(m, [qnn.Rule("embed", weight=spec)])
    after = qnn.model_size(qm)["packed_bytes"]
    codes = V * D * (8 if spec == "int8/ch" else 4) // 8
    scales = 2 * (V if spec == "int8/ch" else V * D // 32)  # f16 scales: one per row / per 32 of a row
    assert before - after == 4 * V * D - codes - scales
    row = qnn.layer_report(qm).set_index("layer").loc["embed"]
    assert row["kind"] == "embed" and row["packed_bytes"] == codes + scales and row["params"] == V * D


def test_gptq_calibrates_the_tied_head_on_final_hidden_states():
    m = _gemma()
    toks = _tokens(3)
    qm = ptq.gptq(m, [qnn.Rule("embed", weight="int4/g16")], toks)
    h = np.concatenate([np.asarray(m.features(t)).reshape(-1, D) for t in toks])
    ref = gptq_kernel(m.embed.embedding[...].T, jnp.asarray(h.T @ h), "int4/g16")  # head kernel (d, vocab)
    np.testing.assert_array_equal(np.asarray(qm.embed.qtensor().codes), np.asarray(ref.codes).T)
    np.testing.assert_allclose(qlab.dequantize(qm.embed.qtensor()), qlab.dequantize(ref).T, rtol=1e-6)
    info = ptq.ptq_info(qm).set_index("layer").loc["embed"]
    assert info["calibration_input"] == "tied head input (attend)" and info["rows"] == 3 * 2 * 8
    # the head's output error is what GPTQ minimises: better than RTN on the calibration states
    rtn = ptq.rtn(m, [qnn.Rule("embed", weight="int4/g16")])
    err = lambda q: float(np.sum((h @ (np.asarray(q.embed.weight_value()) - np.asarray(m.embed.embedding[...])).T) ** 2))
    assert err(qm) < err(rtn)


def test_sequential_gptq_and_awq_and_hqq_take_the_embedding():
    m = _gemma()
    toks = _tokens()
    rules = [qnn.Rule("embed", weight="int4/g16"), qnn.Rule("layers/.*_proj", weight="int4/g16")]
    qs = ptq.gptq(m, rules, toks, sequential=True)
    assert qs.embed.converted and ptq.ptq_info(qs).set_index("layer").loc["embed", "calibration"] == "sequential over layers"
    qa = ptq.awq(m, [qnn.Rule("embed", weight="int4/g16")], toks)
    s = qa.embed.input_scale[...]
    ids = toks[0]
    np.testing.assert_allclose(qa.embed(ids), jnp.take(qa.embed.weight_value(), ids, axis=0) / s, rtol=1e-6)
    assert np.isfinite(np.asarray(qa(ids))).all()
    qh = ptq.hqq(m, [qnn.Rule("embed", weight="int4/g16/asym/zp=float")])
    assert qh.embed.qtensor().codes.shape == (V, D)


def test_gptq_of_an_untied_embedding_names_the_reason():
    cfg = TransformerConfig(vocab_size=V, d_model=D, n_layers=1, n_heads=2, d_ff=64, max_len=8)
    t = Transformer(cfg, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tied output head"):
        ptq.gptq(t, [qnn.Rule("embed", weight="int4/g16"), qnn.Rule("blocks/0/mlp/up", weight="int4/g16"),
                     qnn.Rule(".*")], _tokens())
    with pytest.raises(ValueError, match="tied output head"):  # nothing else quantized: capture itself says so
        ptq.gptq(t, [qnn.Rule("embed", weight="int4/g16"), qnn.Rule(".*")], _tokens())
    assert ptq.rtn(t, [qnn.Rule("embed", weight="int4/g16"), qnn.Rule(".*")]).embed.converted


def test_analysis_sees_the_embedding():
    m = _gemma()
    t = candidate_table(m, ["int8/ch", "keep"])
    row = t[(t.layer == "embed") & (t.candidate == "int8/ch")].iloc[0]
    assert row["bytes"] == V * D + 2 * V and row["params"] == V * D
    s = sensitivity(m, ["int2/ch", "int8/ch"], "sqnr")
    e = s[s.layer == "embed"].set_index("candidate")["score"]
    assert e["int2/ch"] > e["int8/ch"] > 0
    loss = lambda model, b: jnp.mean(model(b))
    meas = sensitivity(m, ["int2/ch"], "measured", data=(loss, _tokens(1)))
    assert meas.set_index("layer").loc["embed", "score"] != 0


def test_calibrated_ptq_refuses_weights_it_cannot_read_as_a_kernel():
    conv = nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="nnx.Linear and nnx.Embed"):
        ptq.gptq(conv, [qnn.Rule(".*", weight="int8/ch")], [jnp.ones((1, 5, 5, 2))])
