"""qlab.evaluate's language-model scoring: one per-token NLL, whole sequences or windows, chunked logits."""

import dataclasses
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



def _perturbed(model, scale=0.3, seed=1):
    """A copy of ``model`` with noise on every 2-D weight (same structure, different predictions)."""
    graphdef, state = nnx.split(model)
    keys = iter(jax.random.split(jax.random.key(seed), 64))
    state = jax.tree.map(lambda a: a + scale * jax.random.normal(next(keys), a.shape) if a.ndim == 2 else a, state)
    return nnx.merge(graphdef, state)


def test_compare_to_reference_matches_numpy_kl_top1_and_paired_ratio():
    ref = _model()
    model = _perturbed(ref)
    tokens = np.random.default_rng(0).integers(0, 11, (2, 13))
    c = evaluate.compare_to_reference(model, ref, tokens, chunk=5)

    def log_probs(m):
        return np.asarray(jax.nn.log_softmax(nnx.jit(lambda m, t: m(t))(m, jnp.asarray(tokens[:, :-1])), -1), np.float64)

    lp, rlp = log_probs(model), log_probs(ref)
    nll = -np.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0].ravel()
    rnll = -np.take_along_axis(rlp, tokens[:, 1:, None], -1)[..., 0].ravel()
    kl = (np.exp(rlp) * (rlp - lp)).sum(-1).ravel()
    top1 = (lp.argmax(-1) == rlp.argmax(-1)).ravel()
    n = nll.size
    assert c.tokens == n == 24
    assert c.ppl == evaluate.perplexity(model, tokens) and c.ref_ppl == evaluate.perplexity(ref, tokens)
    np.testing.assert_allclose(c.kl, kl.mean(), rtol=1e-4)
    np.testing.assert_allclose(c.kl_se, kl.std(ddof=1) / math.sqrt(n), rtol=1e-3)
    assert c.kl > 0.01
    assert c.top1 == top1.mean() and 0 < c.top1 < 1
    np.testing.assert_allclose(c.ppl_ratio, c.ppl / c.ref_ppl, rtol=1e-5)
    d = nll - rnll
    np.testing.assert_allclose(c.ppl_ratio_se, c.ppl_ratio * d.std(ddof=1) / math.sqrt(n), rtol=1e-3)
    np.testing.assert_allclose(c.ppl_se, c.ppl * nll.std(ddof=1) / math.sqrt(n), rtol=1e-3)
    assert set(c.metrics("q_")) == {"q_" + k for k in ("ppl", "ppl_se", "ref_ppl", "ref_ppl_se", "ppl_ratio",
                                                       "ppl_ratio_se", "kl", "kl_se", "top1", "top1_se")}


def test_compare_to_reference_paired_error_is_smaller_for_a_close_model():
    ref = _model()
    tokens = np.random.default_rng(1).integers(0, 11, (1, 16))
    c = evaluate.compare_to_reference(_perturbed(ref, scale=0.002), ref, tokens)
    assert c.ppl_ratio_se < c.ppl_se / c.ppl / 5  # pairing removes the token-difficulty variance
    assert c.top1 > 0.9 and c.kl < 1e-3


def test_compare_to_reference_rejects_other_structures_and_short_rows():
    ref = _model()
    other = Transformer(TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_len=16),
                        rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="reference"):
        evaluate.compare_to_reference(other, ref, np.arange(8) % 11)
    with pytest.raises(ValueError, match="tokens"):
        evaluate.compare_to_reference(ref, ref, np.arange(1))


def test_rows_per_step_pools_the_per_token_figures_exactly():
    """Rows scored a few per call (a short last call padded) give the per-token figures of one call over all
    rows, and the summaries pool them: the same figures, to float rounding."""
    ref = _model()
    model = _perturbed(ref)
    tokens = np.random.default_rng(2).integers(0, 11, (5, 13))
    whole = evaluate.compare_to_reference(model, ref, tokens, chunk=4)
    stepped = evaluate.compare_to_reference(model, ref, tokens, chunk=4, rows_per_step=2)
    assert stepped.tokens == whole.tokens == 5 * 12
    for k, v in dataclasses.asdict(whole).items():
        np.testing.assert_allclose(getattr(stepped, k), v, rtol=1e-5, atol=1e-7, err_msg=k)
    st = evaluate.paired_token_stats(model, ref, tokens, chunk=4, rows_per_step=3)
    assert {k: v.shape for k, v in st.items()} == {k: (5, 12) for k in ("nll", "ref_nll", "kl", "top1")}
    # pooling is concatenation: two halves' statistics, concatenated, give the whole's figures
    a = evaluate.paired_token_stats(model, ref, tokens[:2], chunk=4)
    b = evaluate.paired_token_stats(model, ref, tokens[2:], chunk=4)
    pooled = evaluate.ReferenceComparison.from_token_stats({k: np.concatenate([a[k], b[k]]) for k in a})
    np.testing.assert_allclose(pooled.ppl_ratio_se, whole.ppl_ratio_se, rtol=1e-5)
    ppl, se = evaluate.perplexity_with_error(model, tokens, rows_per_step=4)
    np.testing.assert_allclose([ppl, se], [whole.ppl, whole.ppl_se], rtol=1e-4)
    with pytest.raises(ValueError, match="rows_per_step"):
        evaluate.token_nll(model, tokens, rows_per_step=0)


def test_bos_rows_cut_a_stream_and_say_when_it_is_too_short():
    ids = np.arange(100, 131)
    rows = evaluate.bos_rows(ids, 4, 10)
    assert rows.shape == (10, 4) and (rows[:, 0] == 100).all() and rows[0].tolist() == [100, 101, 102, 103]
    assert rows[:, 1:].ravel().tolist() == list(range(101, 131))  # every text token once, in order
    with pytest.raises(ValueError, match=r"need 34 tokens \(BOS \+ 33\), the stream has 31: room for 10 rows"):
        evaluate.bos_rows(ids, 4, 11)
