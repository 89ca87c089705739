"""Tests for qlab.train and qlab.evaluate."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qlab import data, evaluate
from qlab.models import MLP, Transformer, TransformerConfig
from qlab.train import History, lm_loss, train, xent_loss


@pytest.fixture(scope="module")
def digits():
    return data.digits_dataset(seed=0)


# A toy module with the kinds of state a quantized model carries.
class Counter(nnx.Variable):
    pass


class RangeEMA(nnx.Variable):
    pass


class LearnedScale(nnx.Param):
    pass


class Toy(nnx.Module):
    def __init__(self, rngs):
        self.lin = nnx.Linear(64, 10, rngs=rngs)
        self.calls = Counter(jnp.array(0, jnp.int32))
        self.amax = RangeEMA(jnp.array(0.0))
        self.scale = LearnedScale(jnp.array(1.0))

    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        self.calls[...] += 1
        self.amax[...] = 0.5 * self.amax[...] + 0.5 * jnp.max(jnp.abs(x))
        return self.lin(x) * self.scale[...]


def test_mlp_digits_learns(digits):
    model = MLP(64, hidden=(128, 128), out=10, rngs=nnx.Rngs(0))
    before = evaluate.accuracy(model, *digits.test)
    hist = train(model, digits, epochs=5, batch_size=32, progress=False, eval_every=50)
    assert isinstance(hist, History) and hist.steps == len(hist.loss) == 5 * (len(digits.train) // 32)
    assert np.mean(hist.loss[-10:]) < 0.3 * np.mean(hist.loss[:10])
    acc = evaluate.accuracy(model, *digits.test)
    assert acc > 0.85 and acc > before + 0.5
    assert [e["step"] for e in hist.evals][:2] == [50, 100] and hist.evals[-1]["step"] == hist.steps
    assert hist.evals[-1]["val_accuracy"] > 0.85
    df = hist.to_frame()
    assert len(df) == hist.steps and df["val_accuracy"].notna().sum() == len(hist.evals)


def test_training_is_deterministic(digits):
    def run(seed):
        m = MLP(64, hidden=(32,), out=10, rngs=nnx.Rngs(0))
        return train(m, digits, steps=25, batch_size=16, seed=seed, progress=False).loss, m

    a, ma = run(0)
    b, mb = run(0)
    c, _ = run(1)
    assert a == b
    assert a != c
    np.testing.assert_array_equal(ma.head.kernel[...], mb.head.kernel[...])


def test_forward_mutated_variables_update_during_training(digits):
    model = Toy(nnx.Rngs(0))
    lin0 = np.array(model.lin.kernel[...])
    train(model, digits.train, steps=7, batch_size=16, progress=False)
    assert int(model.calls[...]) == 7
    assert float(model.amax[...]) > 0.9  # EMA of max |pixel| (=1.0) after 7 updates
    assert float(model.scale[...]) != 1.0  # nnx.Param subclass is trained by default
    assert not np.allclose(model.lin.kernel[...], lin0)
    # Training continues from the updated state; evaluation does not mutate it.
    evaluate.accuracy(model, *digits.test)
    assert int(model.calls[...]) == 7
    train(model, digits.train, steps=3, batch_size=16, progress=True)
    assert int(model.calls[...]) == 10


def test_wrt_restricts_what_is_trained(digits):
    model = Toy(nnx.Rngs(0))
    lin0 = np.array(model.lin.kernel[...])
    hist = train(model, digits.train, steps=5, batch_size=16, wrt=LearnedScale, progress=False,
                 optimizer=optax.sgd(0.1))
    np.testing.assert_array_equal(model.lin.kernel[...], lin0)
    assert float(model.scale[...]) != 1.0 and int(model.calls[...]) == 5
    assert len(hist.loss) == 5


def test_custom_loss_and_iterable_of_batches(digits):
    model = MLP(64, hidden=(32,), out=10, rngs=nnx.Rngs(0))
    seen = []

    def loss(m, batch):
        seen.append(1)  # traced once
        return xent_loss(m, batch) + 0.0 * jnp.sum(m.head.kernel[...] ** 2)

    batches = data.batches(digits.train, 32, seed=0, epochs=1)
    hist = train(model, batches, loss=loss, progress=False)
    assert hist.steps == len(digits.train) // 32 and len(seen) == 1
    with pytest.raises(ValueError, match="steps= or epochs="):
        train(model, digits, progress=False)
    with pytest.raises(ValueError, match="unknown loss"):
        train(model, digits, steps=1, loss="mse", progress=False)


def test_char_lm_training_and_perplexity():
    corpus = data.char_splits(data.load_austen("prideprejudice")[:60_000], val_frac=0.1, test_frac=0.1)
    cfg = TransformerConfig(corpus.vocab_size, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_len=32)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    ppl0 = evaluate.perplexity(model, corpus.val, seq_len=32)
    assert ppl0 > 0.5 * corpus.vocab_size  # untrained: near uniform
    hist = train(model, corpus, loss="lm", seq_len=32, steps=150, batch_size=16, learning_rate=3e-3,
                 progress=False, eval_every=75)
    ppl = evaluate.perplexity(model, corpus.val, seq_len=32)
    assert ppl < 0.5 * ppl0 and ppl < 15
    assert hist.evals[-1]["step"] == 150 and math.isclose(math.exp(hist.evals[-1]["val_nll"]), ppl, rel_tol=1e-5)
    assert hist.final_loss < hist.loss[0] - 1.0


def test_nll_matches_direct_computation():
    cfg = TransformerConfig(vocab_size=11, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    tokens = np.random.default_rng(0).integers(0, 11, size=30).astype(np.int32)  # 29 targets: windows 8,8,8,5
    got = evaluate.nll(model, tokens, seq_len=8, batch_size=3)
    losses = []
    fwd = nnx.jit(lambda m, t: jax.nn.log_softmax(m(t)[0]))
    for s in range(0, 29, 8):
        window = tokens[s : s + 9]
        logp = fwd(model, jnp.asarray(window[None, :-1]))
        losses += [-float(logp[i, window[i + 1]]) for i in range(len(window) - 1)]
    assert len(losses) == 29
    assert math.isclose(got, float(np.mean(losses)), rel_tol=1e-5)
    assert math.isclose(evaluate.perplexity(model, tokens, 8, 3), math.exp(got), rel_tol=1e-9)
    # lm_loss agrees on one full window.
    w = jnp.asarray(tokens[None, :9])
    assert math.isclose(float(nnx.jit(lm_loss)(model, w)), float(np.mean(losses[:8])), rel_tol=1e-5)


def test_accuracy_and_predict_with_ragged_batches(digits):
    model = MLP(64, hidden=(16,), out=10, rngs=nnx.Rngs(3))
    x, y = digits.test
    logits = evaluate.predict(model, x, batch_size=100)
    assert logits.shape == (len(x), 10)
    np.testing.assert_allclose(logits[:5], nnx.jit(lambda m, v: m(v))(model, jnp.asarray(x[:5])), rtol=1e-5, atol=1e-5)
    expected = float(np.mean(logits.argmax(-1) == y))
    for bs in (1000, 100, 7):
        assert evaluate.accuracy(model, x, y, batch_size=bs) == pytest.approx(expected)
    assert evaluate.accuracy(model, x, logits.argmax(-1), batch_size=64) == 1.0


def test_shared_optimizer_resumes_exactly(digits):
    batches = list(data.batches(digits.train, 32, seed=0, steps=12))
    one = MLP(64, hidden=(16,), out=10, rngs=nnx.Rngs(0))
    h1 = train(one, batches, progress=False)
    two = MLP(64, hidden=(16,), out=10, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(two, optax.adam(1e-3), wrt=nnx.Param)
    ha = train(two, batches[:5], optimizer=opt, progress=False)
    hb = train(two, batches[5:], optimizer=opt, progress=False)
    assert int(opt.step[...]) == 12
    np.testing.assert_allclose(ha.loss + hb.loss, h1.loss, rtol=1e-6)
    np.testing.assert_allclose(two.head.kernel[...], one.head.kernel[...], rtol=1e-5, atol=1e-7)
