"""qlab.evaluate's language-model scoring: one per-token NLL, whole sequences or windows, chunked logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlab import evaluate
from qlab.models import Transformer, TransformerConfig


def _model():
    cfg = TransformerConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=16)
    return Transformer(cfg, rngs=nnx.Rngs(0))


class FeaturesOnly(nnx.Module):
    """A language model scored through features/unembed only: calling it whole is an error."""

    def __init__(self, inner):
        self.inner = inner

    def features(self, tokens):
        return self.inner(tokens)  # "hidden states" = the inner model's logits

    def unembed(self, h):
        return 2.0 * h

    def __call__(self, tokens):
        raise AssertionError("evaluate should unembed through features/unembed")


def test_token_nll_is_next_token_cross_entropy():
    model = _model()
    tokens = np.random.default_rng(0).integers(0, 11, (2, 13))
    logp = jax.nn.log_softmax(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens[:, :-1])), axis=-1)
    want = -np.take_along_axis(np.asarray(logp), tokens[:, 1:, None], axis=-1)[..., 0]
    got = evaluate.token_nll(model, tokens)
    assert got.shape == (2, 12) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(evaluate.token_nll(model, tokens, chunk=5), got, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(evaluate.token_nll(model, tokens[0]), evaluate.token_nll(model, tokens[:1]))


def test_features_and_unembed_are_used_when_present():
    model = _model()
    tokens = np.random.default_rng(1).integers(0, 11, (1, 10))
    logits = 2.0 * np.asarray(nnx.jit(lambda m, t: m(t))(model, jnp.asarray(tokens[:, :-1])))
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    np.testing.assert_allclose(evaluate.token_nll(FeaturesOnly(model), tokens, chunk=4), want, rtol=1e-5)


def test_whole_sequence_and_windowed_scoring_agree():
    model = _model()
    tokens = np.random.default_rng(2).integers(0, 11, 17)  # 16 predictions: one window of 16
    whole = evaluate.nll(model, tokens)
    assert whole == pytest.approx(float(evaluate.token_nll(model, tokens).mean()), rel=1e-7)
    assert evaluate.nll(model, tokens, seq_len=16) == pytest.approx(whole, rel=1e-5)
    assert evaluate.perplexity(model, tokens) == pytest.approx(math.exp(whole), rel=1e-6)
    # shorter windows see less context, so they score differently
    assert abs(evaluate.nll(model, tokens, seq_len=2) - whole) > 1e-4

