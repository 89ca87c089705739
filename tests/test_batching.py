"""Batched variants with traced integer bit widths / clip ratios (issue #4): qlab.nn quantizers
holding their bits as state, traced views of models, and sweeps that group runs across bit widths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlab.experiments import image, sweep
from qlab.experiments.runner import plan
from qlab.experiments.runner import _groups
from qlab.models import MLP
from qlab.nn import Rule, quantize_model
from qlab.nn import traced_variant
from qlab.nn.quantizers import QuantOverride, WeightQuantizer

TINY = {"hidden": [16], "train_size": 256, "steps": 15, "qat_steps": 10, "batch_size": 32}


def _loss(m, x, y):
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()


@pytest.mark.parametrize("weight, act, method", [("int{}/ch", None, "ste"), ("int{}/g16/asym", "int8", "ste"),
                                                  ("uint{}/ch/asym", None, "ste"), ("int{}/g16", None, "lsq"),
                                                  ("int{}/ch", None, "lsq")])
def test_traced_views_match_own_spec_models_exactly(weight, act, method):
    m = MLP(64, hidden=(32,), out=10, rngs=nnx.Rngs(0))
    widths = [2, 3, 4, 8]
    own = [quantize_model(m, [Rule(".*", weight=weight.format(b), act=act, weight_quantizer=method, act_quantizer=method)])
           for b in widths]
    views = [traced_variant(q, own[-1]) for q in own]
    assert all(nnx.graphdef(v) == nnx.graphdef(views[0]) for v in views)
    x = jax.random.normal(jax.random.key(1), (8, 64))
    y = jnp.arange(8) % 10
    # stacked and vmapped, as train_variants runs them: forward and gradients equal the own-spec models
    gd, params, rest = nnx.split(views[0], nnx.Param, ...)
    states = [nnx.split(v, nnx.Param, ...) for v in views]
    P = jax.tree.map(lambda *a: jnp.stack(a), *[s[1] for s in states])
    R = jax.tree.map(lambda *a: jnp.stack(a), *[s[2] for s in states])

    def f(p, r):
        return jax.value_and_grad(lambda p, r: _loss(nnx.merge(gd, p, r), x, y))(p, r)

    losses, grads = jax.vmap(f)(P, R)
    for i, q in enumerate(own):
        l_ref, g_ref = nnx.value_and_grad(_loss)(q, x, y)
        assert float(losses[i]) == pytest.approx(float(l_ref), rel=1e-6, abs=1e-6)
        g_i = jax.tree.map(lambda a: a[i], grads)
        for a, b in zip(jax.tree.leaves(g_i), jax.tree.leaves(nnx.state(g_ref, nnx.Param))):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # unbatched forward is bit-identical
    for v, q in zip(views, own):
        np.testing.assert_array_equal(np.asarray(v(x)), np.asarray(q(x)))
    # trained values copy back into the own-spec model
    nnx.update(own[0], nnx.state(views[0], nnx.Not(QuantOverride)))


def test_traced_variant_errors_and_clip_ratio():
    m = MLP(64, hidden=(32,), out=10, rngs=nnx.Rngs(0))
    q4 = quantize_model(m, [Rule(".*", weight="int4/ch")])
    with pytest.raises(ValueError, match=r"layer 'head' weight_quant: 'int4/g16a0' and 'int4/ch1' differ in more than an integer bit width"):
        traced_variant(quantize_model(m, [Rule(".*", weight="int4/g16")]), q4)
    with pytest.raises(ValueError, match=r"act_quant: bit widths differ .* method 'lsq' cannot trace"):
        traced_variant(quantize_model(m, [Rule(".*", weight="int2/ch", act="int4", act_quantizer="lsq")]),
                       quantize_model(m, [Rule(".*", weight="int4/ch", act="int8", act_quantizer="lsq")]))
    with pytest.raises(ValueError, match=r"need method 'ste' \(LSQ weights: bits only\), got method 'lsq'"):
        traced_variant(quantize_model(m, [Rule(".*", weight="int2/ch", weight_quantizer="lsq")]), clip_ratio=0.5)
    with pytest.raises(ValueError, match=r"bits= overrides integer formats only"):
        WeightQuantizer("fp8_e4m3/ch", channel_axis=1, contract_axis=0).set_traced(bits=4)
    with pytest.raises(ValueError, match=r"clip_ratio=2.0 must be in \(0, 1\]"):
        WeightQuantizer("int4/ch", channel_axis=1, contract_axis=0).set_traced(clip_ratio=2.0)
    v = traced_variant(q4, clip_ratio=0.5)
    assert float(v.head.weight_quant.clip_ratio[...]) == 0.5
    w = q4.head.layer.kernel[...]
    np.testing.assert_array_equal(np.asarray(v.head.weight_value()),
                                  np.asarray(__import__("qlab").fake_quant(w, q4.head.weight_quant.spec, clip_ratio=0.5)))


def test_batch_groups_span_bit_widths_of_one_family(tmp_path):
    study = {"name": "g", "base": TINY,
             "sweep": {"method": ["qat", "qat_lsq", "ptq_rtn"], "bits": [2, 8], "granularity": ["ch", "g16"],
                       "seed": [0, 1]}}
    _, _, todo = plan(study, out=tmp_path)
    groups = _groups(todo, True)
    shape = sorted((g[0]["method"], g[0]["granularity"], len(g)) for g in groups)
    # one group per method and granularity, over bits x seeds
    assert shape == sorted([("qat", "ch", 4), ("qat", "g16", 4), ("ptq_rtn", "ch", 4), ("ptq_rtn", "g16", 4),
                            ("qat_lsq", "ch", 4), ("qat_lsq", "g16", 4)])
    # LSQ activations keep static bits: act widths split qat_lsq groups, not qat ones
    _, _, todo = plan({"name": "a", "base": TINY, "sweep": {"method": ["qat", "qat_lsq"], "act": ["int4", "int8"]}},
                      out=tmp_path)
    assert sorted(len(g) for g in _groups(todo, True)) == [1, 1, 2]


def _unbatched_and_batched(study, tmp_path):
    image.clear_caches()
    seq = sweep(study, out=tmp_path / "s", progress=False, batch=False)
    image.clear_caches()
    bat = sweep(study, out=tmp_path / "b", progress=False, batch=True)
    assert list(bat["config_hash"]) == list(seq["config_hash"])
    return seq, bat


def test_batched_sweep_over_bit_widths_matches_unbatched(tmp_path):
    study = {"name": "bits", "base": {**TINY, "hidden": [16, 16], "rules": "first_last_8bit"},
             "sweep": {"method": ["qat", "ptq_rtn", "qat_lsq"], "bits": [2, 3, 4, 8], "seed": [0], "qat_learning_rate": [1e-3]},
             "include": [{"method": "qat", "bits": 4, "seed": 1, "qat_learning_rate": 3e-3}]}
    seq, bat = _unbatched_and_batched(study, tmp_path)
    q = bat["method"] == "qat"
    assert (bat.loc[q, "batched"] == 5).all()  # 4 bit widths + another seed / learning rate: one program
    # each row reports its own static spec's size
    for col in ("bits_per_weight", "model_bytes", "quantized_params", "weight"):
        assert list(bat[col]) == list(seq[col]), col
    assert len(set(bat.loc[q, "bits_per_weight"])) == 4
    assert (bat.loc[bat["method"] == "qat_lsq", "batched"] == 4).all()
    # same training up to float rounding (vmapped matmuls may sum in another order)
    np.testing.assert_allclose(bat["qat_final_loss"].dropna(), seq["qat_final_loss"].dropna(), rtol=2e-3, atol=2e-3)
    assert (abs(bat["accuracy"] - seq["accuracy"]) <= 0.03).all()


def test_clip_ratio_key_validated_and_hash_neutral():
    from qlab.experiments import ConfigError, expand

    a = expand({"base": {"method": "qat"}})[0]
    b = expand({"base": {"method": "qat", "clip_ratio": 1.0}})[0]
    c = expand({"base": {"method": "qat", "clip_ratio": 0.8}})[0]
    assert "clip_ratio" not in a and a == b and c["clip_ratio"] == 0.8 and c["config_hash"] != a["config_hash"]
    assert "clip_ratio" not in expand({"sweep": {"method": ["float", "qat"], "clip_ratio": [0.8]}})[0]
    with pytest.raises(ConfigError, match=r"clip_ratio = 1.5 must be in \(0, 1\]"):
        expand({"base": {"clip_ratio": 1.5}})
    with pytest.raises(ConfigError, match=r"none of its runs reads: clip_ratio \(read by: ptq_rtn, qat\)"):
        expand({"base": {"method": "qat_lsq", "clip_ratio": 0.5}})
    with pytest.raises(ConfigError, match=r"method 'qat_lsq' does not read clip_ratio; it reads: .*qat_steps"):
        expand({"include": [{"method": "qat_lsq", "clip_ratio": 0.5}]})


def test_batched_sweep_over_clip_ratios_matches_unbatched(tmp_path):
    study = {"name": "clip", "base": {**TINY, "hidden": [32], "granularity": "ch"},
             "sweep": {"method": ["qat", "ptq_rtn"], "bits": [3, 8], "clip_ratio": [1.0, 0.6], "seed": [0]}}
    seq, bat = _unbatched_and_batched(study, tmp_path)
    q = bat["method"] == "qat"
    assert (bat.loc[q, "batched"] == 4).all()
    for col in ("bits_per_weight", "model_bytes", "weight"):
        assert list(bat[col]) == list(seq[col]), col
    # ptq_rtn rows are computed the same way in both modes: exactly equal; clipping changes them
    p = seq["method"] == "ptq_rtn"
    assert list(bat.loc[p, "accuracy"]) == list(seq.loc[p, "accuracy"])
    assert sorted(seq.loc[p, "clip_ratio"].fillna(1.0)) == [0.6, 0.6, 1.0, 1.0]
    np.testing.assert_allclose(bat["qat_final_loss"].dropna(), seq["qat_final_loss"].dropna(), rtol=2e-3, atol=2e-3)
    assert (abs(bat["accuracy"] - seq["accuracy"]) <= 0.03).all()
    assert len(set(seq.loc[q, "qat_final_loss"])) == 4  # the clip ratio changes the training


def test_traced_variant_needs_one_bit_width_family():
    from flax import nnx

    from qlab.models import MLP
    from qlab.nn import Rule, quantize_model, traced_variant

    m = MLP(8, hidden=(16,), out=2, rngs=nnx.Rngs(0))
    q_int, q_uint, q_g = (quantize_model(m, [Rule(".*", weight=w)]) for w in ("int4/ch", "uint8/ch", "int8/g8"))
    with pytest.raises(ValueError, match="differ in more than an integer bit width"):
        traced_variant(q_int, q_uint)  # signedness is part of the family
    with pytest.raises(ValueError, match="differ in more than an integer bit width"):
        traced_variant(q_int, q_g)
