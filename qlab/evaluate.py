"""Metrics for NNX models: batched, jitted, and side-effect free.

Every function runs the model on fixed-size (padded, masked) batches under one ``jax.jit``
compilation per model structure and batch shape. The model's state is NOT changed: if its forward
pass updates statistics (e.g. quantizer range EMAs), those updates are discarded here.

Language models are scored in one place, :func:`token_nll`'s per-token negative log-likelihood, either over
whole sequences (``seq_len=None``: every token sees all earlier ones) or over non-overlapping windows of a
stream (``seq_len=n``, see :func:`lm_windows`). A model that exposes ``features(tokens)`` (final hidden
states) and ``unembed(h)`` (logits) is unembedded ``chunk`` positions at a time, so a long sequence never
materialises all ``[B, T, vocab]`` logits at once; any other model is called as ``model(tokens) -> logits``.

Example:
    >>> from flax import nnx
    >>> from qlab.data import digits_dataset
    >>> from qlab.models import MLP
    >>> x, y = digits_dataset().test
    >>> 0.0 <= accuracy(MLP(64, hidden=(32,), rngs=nnx.Rngs(0)), x, y) <= 1.0
    True
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["perplexity_with_error", "predict", "accuracy", "token_nll", "nll", "perplexity", "lm_windows"]


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


@functools.partial(jax.jit, static_argnums=0)
def _correct(graphdef, state, x, y, mask):
    logits = nnx.merge(graphdef, state)(x)
    return jnp.sum((jnp.argmax(logits, axis=-1) == y) * mask)


def _next_token_nll(model, inputs, targets, chunk: int):
    """Traced: NLL [B, T] of ``targets`` (the next tokens) after ``inputs``, logits ``chunk`` positions at a time."""
    if hasattr(model, "features") and hasattr(model, "unembed"):
        hidden, head = model.features(inputs), model.unembed
    else:
        hidden, head = model(inputs), (lambda logits: logits)
    out = []
    for s in range(0, hidden.shape[1], chunk):
        logits = head(hidden[:, s : s + chunk]).astype(jnp.float32)
        target_logit = jnp.take_along_axis(logits, targets[:, s : s + chunk, None], axis=-1)[..., 0]
        out.append(jax.nn.logsumexp(logits, axis=-1) - target_logit)
    return jnp.concatenate(out, axis=1)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _causal_nll(graphdef, state, tokens, chunk):
    return _next_token_nll(nnx.merge(graphdef, state), tokens[:, :-1], tokens[:, 1:], chunk)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _lm_nll_sum(graphdef, state, inputs, targets, mask, chunk):
    return jnp.sum(_next_token_nll(nnx.merge(graphdef, state), inputs, targets, chunk) * mask)


def _padded_batches(arrays, batch_size):
    """Yield (batch arrays padded to batch_size, mask) covering all rows once."""
    n = len(arrays[0])
    for i in range(0, n, batch_size):
        chunk = [a[i : i + batch_size] for a in arrays]
        k = len(chunk[0])
        mask = np.zeros(batch_size, np.float32)
        mask[:k] = 1.0
        if k < batch_size:
            chunk = [np.concatenate([c, np.zeros((batch_size - k,) + c.shape[1:], c.dtype)]) for c in chunk]
        yield chunk, mask


def predict(model: nnx.Module, x, batch_size: int = 1000) -> np.ndarray:
    """``model(x)`` computed in fixed-size batches; returns a numpy array (e.g. logits).

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> predict(MLP(4, hidden=(8,), out=3, rngs=nnx.Rngs(0)), np.ones((5, 4), np.float32), batch_size=2).shape
        (5, 3)
    """
    x = np.asarray(x)
    graphdef, state = nnx.split(model)
    batch_size = min(batch_size, len(x))
    outs = [_logits(graphdef, state, b)[: int(m.sum())] for (b,), m in _padded_batches([x], batch_size)]
    return np.concatenate(jax.device_get(outs))


def accuracy(model: nnx.Module, images, labels, batch_size: int = 1000) -> float:
    """Fraction of ``argmax(model(images)) == labels``.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> m = MLP(4, hidden=(8,), out=3, rngs=nnx.Rngs(0))
        >>> x = np.random.default_rng(0).normal(size=(10, 4)).astype(np.float32)
        >>> accuracy(m, x, predict(m, x).argmax(-1), batch_size=4)
        1.0
    """
    images, labels = np.asarray(images), np.asarray(labels).astype(np.int32)
    if len(images) == 0:
        raise ValueError("no examples")
    graphdef, state = nnx.split(model)
    batch_size = min(batch_size, len(images))
    total = sum(
        _correct(graphdef, state, x, y, m) for (x, y), m in _padded_batches([images, labels], batch_size)
    )
    return float(total) / len(images)


def lm_windows(tokens, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut a token stream into non-overlapping windows so every token but the first is predicted once.

    Returns ``(inputs, targets, mask)``, each (W, seq_len); the last window is zero-padded, ``mask`` 0 there.

    Example:
        >>> import numpy as np
        >>> i, t, m = lm_windows(np.arange(6), seq_len=2)
        >>> i.tolist(), t.tolist(), m.tolist()
        ([[0, 1], [2, 3], [4, 5]], [[1, 2], [3, 4], [5, 0]], [[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]])
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    n = len(tokens) - 1
    if n < 1:
        raise ValueError("need at least 2 tokens")
    w = math.ceil(n / seq_len)
    padded = np.zeros(w * seq_len + 1, np.int32)
    padded[: len(tokens)] = tokens
    inputs = padded[:-1].reshape(w, seq_len)
    targets = padded[1:].reshape(w, seq_len)
    mask = (np.arange(w * seq_len) < n).astype(np.float32).reshape(w, seq_len)
    return inputs, targets, mask


def token_nll(model: nnx.Module, tokens, chunk: int = 256) -> np.ndarray:
    """Per-token negative log-likelihood (nats) of ``tokens[:, 1:]``, each given every earlier token of its row.

    ``tokens``: ``[T]`` or ``[B, T]``; returns ``[B, T - 1]`` float32 (the first token, e.g. BOS, is context
    only). One causal pass per row; logits are made ``chunk`` positions at a time (see the module docstring).

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlab.models import Transformer, TransformerConfig
        >>> cfg = TransformerConfig(vocab_size=5, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8)
        >>> token_nll(Transformer(cfg, rngs=nnx.Rngs(0)), np.arange(8) % 5, chunk=3).shape
        (1, 7)
    """
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    graphdef, state = nnx.split(model)
    return np.asarray(_causal_nll(graphdef, state, tokens, chunk))


def nll(model: nnx.Module, tokens, seq_len: int | None = None, batch_size: int = 32, *, chunk: int = 256) -> float:
    """Mean next-token negative log-likelihood (nats per token) over a token stream.

    ``seq_len=None``: each row of ``tokens`` (``[T]`` or ``[B, T]``) is one sequence and every prediction sees
    all earlier tokens (the mean of :func:`token_nll`). ``seq_len=n``: the stream is cut into non-overlapping
    windows of ``n`` (see :func:`lm_windows`), so each prediction sees between 0 and ``n - 1`` tokens of
    context; windows run ``batch_size`` at a time.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlab.models import Transformer, TransformerConfig
        >>> cfg = TransformerConfig(vocab_size=5, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8)
        >>> m = Transformer(cfg, rngs=nnx.Rngs(0))
        >>> 0.5 < nll(m, np.arange(50) % 5, seq_len=8) < 3.0
        True
    """
    if seq_len is None:
        return float(token_nll(model, tokens, chunk).mean())
    inputs, targets, mask = lm_windows(tokens, seq_len)
    graphdef, state = nnx.split(model)
    batch_size = min(batch_size, len(inputs))
    total = 0.0
    for (i, t, m), _ in _padded_batches([inputs, targets, mask], batch_size):
        total = total + _lm_nll_sum(graphdef, state, i, t, m, chunk)
    return float(total) / float(mask.sum())


def perplexity(model: nnx.Module, tokens, seq_len: int | None = None, batch_size: int = 32, *,
               chunk: int = 256) -> float:
    """``exp(nll(model, tokens, seq_len))``: next-token perplexity over a token stream.

    With ``seq_len=None`` (whole sequences) the exponential is taken in float32, like the per-token values,
    which keeps the figures recorded for Gemma 3 bit for bit.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlab.models import Transformer, TransformerConfig
        >>> cfg = TransformerConfig(vocab_size=5, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8)
        >>> m = Transformer(cfg, rngs=nnx.Rngs(0))
        >>> 1.0 < perplexity(m, np.arange(50) % 5, seq_len=8) < 20.0
        True
        >>> 1.0 < perplexity(m, np.arange(8) % 5) < 20.0
        True
    """
    if seq_len is None:
        return float(np.exp(token_nll(model, tokens, chunk).mean()))
    return math.exp(nll(model, tokens, seq_len, batch_size, chunk=chunk))


def perplexity_with_error(model: nnx.Module, tokens, *, chunk: int = 256) -> tuple[float, float]:
    """``(perplexity, standard error)`` over whole sequences: the perplexity is exactly
    :func:`perplexity`'s (``seq_len=None``); its standard error comes from the per-token NLLs by the delta
    method, ``ppl * std(nll) / sqrt(n)``, as llama.cpp reports it. Tokens are treated as independent, so on
    running text (whose NLLs are correlated) it is a lower bound on the true uncertainty.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlab.models import Transformer, TransformerConfig
        >>> cfg = TransformerConfig(vocab_size=5, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8)
        >>> m = Transformer(cfg, rngs=nnx.Rngs(0))
        >>> ppl, se = perplexity_with_error(m, np.arange(8) % 5)
        >>> ppl == perplexity(m, np.arange(8) % 5), 0 < se < ppl
        (True, True)
    """
    nlls = token_nll(model, tokens, chunk).ravel()
    ppl = float(np.exp(nlls.mean()))
    se = ppl * float(nlls.std(ddof=1)) / math.sqrt(len(nlls)) if len(nlls) > 1 else math.nan
    return ppl, se
