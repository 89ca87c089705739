"""LLM.int8() outlier features (qlab.ptq.outliers): the paper's count on hand-built activations, zeroing input
features, and scoring an activation-quantized model against its float original."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from qlab import evaluate, ptq
from qlab.models import MLP
from qlab.models.gemma3 import Gemma3, Gemma3Config
from qlab.nn import Rule, quantize_model


def _hand_built() -> np.ndarray:
    """200 positions x 12 features: which features are outliers (>= 6 at >= 6% of positions) is known."""
    x = np.random.default_rng(0).uniform(-1, 1, (200, 12)).astype(np.float32)
    x[:12, 3] = 6.0  # exactly 6 at exactly 6%: an outlier (both bounds inclusive)
    x[:11, 5] = 7.0  # 5.5% of positions: not
    x[:, 7] = 5.99  # everywhere, but below 6: not
    x[::2, 9] = -6.5  # negative, at 50%: an outlier (magnitude)
    x[0, 11] = 500.0  # one huge value: not (a single position)
    return x


def test_outlier_dims_on_a_hand_built_tensor():
    x = _hand_built()
    assert ptq.outlier_dims(x).tolist() == [3, 9]
    np.testing.assert_allclose(ptq.position_fractions(x)[[3, 5, 7, 9, 11]], [0.06, 0.055, 0.0, 0.5, 0.005])
    assert ptq.outlier_dims(x, threshold=5.9).tolist() == [3, 7, 9]
    assert ptq.outlier_dims(x, min_positions=0.005).tolist() == [3, 5, 9, 11]
    assert ptq.outlier_dims(x.reshape(4, 50, 12)).tolist() == [3, 9]  # [batch, seq, features] is viewed flat
    # LLM.int8's decomposition at 6 keeps a different set: any position above the threshold
    assert ptq.outlier_columns(np.abs(x).max(0), 6.0).tolist() == [5, 9, 11]


def test_systematic_outliers_need_a_quarter_of_the_layers():
    x = _hand_built()
    calm = np.zeros_like(x)
    only9 = calm.copy()
    only9[:, 9] = x[:, 9]
    layers = {"0": x, "1": only9, "2": calm, "3": calm, "4": calm, "5": calm, "6": calm, "7": calm}
    dims, counts = ptq.systematic_outliers(layers)
    assert dims.tolist() == [9] and counts[[3, 9]].tolist() == [1, 2]  # 9 in 2/8 layers, 3 in 1/8
    assert ptq.systematic_outliers(layers, min_layers=0.1)[0].tolist() == [3, 9]
    with pytest.raises(ValueError, match="one feature space"):
        ptq.systematic_outliers({"a": x, "b": x[:, :4]})
    with pytest.raises(ValueError, match="no layers"):
        ptq.systematic_outliers({})


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.floats(0.5, 8.0), st.floats(0.0, 1.0), st.integers(0, 2 ** 16))
def test_outlier_dims_match_the_definition(rows, cols, threshold, min_positions, seed):
    x = np.random.default_rng(seed).normal(0, 4, (rows, cols)).astype(np.float32)
    want = [j for j in range(cols)
            if sum(abs(float(x[i, j])) >= threshold for i in range(rows)) / rows >= min_positions]
    got = ptq.outlier_dims(x, threshold, min_positions).tolist()
    assert got == want
    # the order of the positions does not matter
    perm = np.random.default_rng(seed + 1).permutation(rows)
    assert ptq.outlier_dims(x[perm], threshold, min_positions).tolist() == got


def test_zero_input_features_equals_zeroing_the_inputs():
    m = MLP(6, hidden=(8,), rngs=nnx.Rngs(0))
    before = np.asarray(m.layers[0].kernel[...]).copy()
    z = ptq.zero_input_features(m, {"layers/0": [0, 4], "head": []})
    x = np.random.default_rng(0).normal(size=(3, 6)).astype(np.float32)
    mask = np.array([0, 1, 1, 1, 0, 1], np.float32)
    np.testing.assert_allclose(np.asarray(z(x)), np.asarray(m(x * mask)), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(m.layers[0].kernel[...]), before)  # the original is untouched
    with pytest.raises(ValueError, match="no linear layer"):
        ptq.zero_input_features(m, {"layers/9": [0]})


def test_zero_input_features_on_gemma_projections():
    g = Gemma3(Gemma3Config.tiny(n_layers=1), rngs=nnx.Rngs(0))
    z = ptq.zero_input_features(g, {"layers/0/attn/q_proj": [1, 2]})
    k = np.asarray(z.layers[0].attn.q_proj.kernel[...])
    assert not k[[1, 2]].any() and k[0].any()


def test_compare_to_reference_scores_an_activation_quantized_model_against_float():
    g = Gemma3(Gemma3Config.tiny(n_layers=1), rngs=nnx.Rngs(0))
    qm = quantize_model(g, [Rule(r"layers/\d+/(attn|mlp)/\w+_proj", weight="int8/ch", act="int8",
                                 outlier_threshold=1.0)], allow_unmatched=True)
    tokens = jnp.arange(1, 17)[None]
    with pytest.raises(ValueError, match="any_structure"):
        evaluate.compare_to_reference(qm, g, tokens)
    c = evaluate.compare_to_reference(qm, g, tokens, any_structure=True)
    assert c.ref_ppl == evaluate.perplexity(g, tokens) and c.ppl == evaluate.perplexity(qm, tokens)
    assert 0 < c.kl < 0.1 and c.top1 > 0.5


def test_salient_channels_and_keep_float_follow_awq_table_1():
    rng = np.random.default_rng(0)
    W = jnp.asarray(rng.normal(size=(256, 16)), jnp.float32)
    act = np.ones(256)
    act[[7, 100, 200]] = [50.0, 40.0, 30.0]
    ch = ptq.salient_channels(act, 0.01)  # 1% of 256 -> 3 channels
    assert ch.tolist() == [7, 100, 200]
    assert len(ptq.salient_channels(act, 0.001)) == 1 and len(ptq.salient_channels(act, 0.03)) == 8
    r = ptq.salient_channels(act, 0.01, seed=3)
    assert len(r) == 3 and len(set(r.tolist())) == 3
    q = np.asarray(ptq.rtn_keep_float(W, "int3/g128/asym", ch))
    rtn = np.asarray(ptq.rtn_keep_float(W, "int3/g128/asym", []))
    np.testing.assert_array_equal(q[ch], np.asarray(W)[ch])
    others = np.setdiff1d(np.arange(256), ch)
    np.testing.assert_array_equal(q[others], rtn[others])  # the scales are the whole kernel's, as RTN's
    # on activations with salient channels, keeping them float lowers the output error most
    X = rng.normal(size=(64, 256)).astype(np.float32) * act.astype(np.float32)
    err = lambda K: float(np.linalg.norm(X @ (np.asarray(W) - K)))  # noqa: E731
    assert err(q) < err(np.asarray(ptq.rtn_keep_float(W, "int3/g128/asym", r))) < err(rtn) * 1.001
    with pytest.raises(ValueError, match="fraction"):
        ptq.salient_channels(act, 0.0)


def test_rtn_scaled_is_exact_in_float_and_plain_rtn_at_one():
    rng = np.random.default_rng(1)
    W = jnp.asarray(rng.normal(size=(128, 8)), jnp.float32)
    ch = [3, 50]
    np.testing.assert_array_equal(np.asarray(ptq.rtn_scaled(W, "int3/g128/asym", ch, 1.0)),
                                  np.asarray(ptq.rtn_keep_float(W, "int3/g128/asym", [])))
    S = np.ones(128, np.float32)
    S[ch] = 2.0
    x = rng.normal(size=(4, 128)).astype(np.float32)
    # (x / s) @ Q(s W) == x @ rtn_scaled(W)
    from qlab.numerics.quantize import fake_quant
    from qlab.ptq.rtn import resolve_weight_spec
    want = (x / S) @ np.asarray(fake_quant(W * S[:, None], resolve_weight_spec("int3/g128/asym")))
    np.testing.assert_allclose(x @ np.asarray(ptq.rtn_scaled(W, "int3/g128/asym", ch, 2.0)), want, rtol=1e-5, atol=1e-5)
