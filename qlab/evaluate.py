"""Metrics for NNX models: batched, jitted, and side-effect free.

Every function runs the model on fixed-size (padded, masked) batches under one ``jax.jit``
compilation per model structure and batch shape. The model's state is NOT changed: if its forward
pass updates statistics (e.g. quantizer range EMAs), those updates are discarded here.

Language models are scored in one place, :func:`token_nll`'s per-token negative log-likelihood, either over
whole sequences (``seq_len=None``: every token sees all earlier ones) or over non-overlapping windows of a
stream (``seq_len=n``, see :func:`lm_windows`). A model that exposes ``features(tokens)`` (final hidden
states) and ``unembed(h)`` (logits) is unembedded ``chunk`` positions at a time, so a long sequence never
materialises all ``[B, T, vocab]`` logits at once; any other model is called as ``model(tokens) -> logits``.
A long text is scored as many rows (:func:`bos_rows`: BOS + the next tokens each), ``rows_per_step`` rows per
compiled call (:func:`token_nll`, :func:`perplexity_with_error`, :func:`compare_to_reference`), and the per-token
statistics of all rows are pooled before any figure is computed, so a figure does not depend on the step size.

Example:
    >>> from flax import nnx
    >>> from qlab.data import digits_dataset
    >>> from qlab.models import MLP
    >>> x, y = digits_dataset().test
    >>> 0.0 <= accuracy(MLP(64, hidden=(32,), rngs=nnx.Rngs(0)), x, y) <= 1.0
    True
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["compare_to_reference", "ReferenceComparison", "paired_token_stats", "perplexity_with_error",
           "perplexity_from_nll", "bos_rows", "predict", "accuracy", "probe_accuracy", "token_nll", "nll", "perplexity",
           "lm_windows"]


@functools.partial(jax.jit, static_argnums=0)
def _logits(graphdef, state, x):
    return nnx.merge(graphdef, state)(x)


@functools.partial(jax.jit, static_argnums=0)
def _correct(graphdef, state, x, y, mask):
    logits = nnx.merge(graphdef, state)(x)
    return jnp.sum((jnp.argmax(logits, axis=-1) == y) * mask)


def _next_token_nll(model, inputs, targets, chunk: int):
    """Traced: NLL [B, T] of ``targets`` (the next tokens) after ``inputs``, logits ``chunk`` positions at a time."""
    hid, head = _model_head(model)
    hidden = hid(inputs)
    out = []
    for s in range(0, hidden.shape[1], chunk):
        out.append(_log_probs_and_nll(head(hidden[:, s : s + chunk]), targets[:, s : s + chunk, None])[1])
    return jnp.concatenate(out, axis=1)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _causal_nll(graphdef, state, tokens, chunk):
    return _next_token_nll(nnx.merge(graphdef, state), tokens[:, :-1], tokens[:, 1:], chunk)


@functools.partial(jax.jit, static_argnums=(0, 5))
def _lm_nll_sum(graphdef, state, inputs, targets, mask, chunk):
    return jnp.sum(_next_token_nll(nnx.merge(graphdef, state), inputs, targets, chunk) * mask)


def _model_head(model):
    """``(hidden_fn, head_fn)``: final hidden states and their logits (see the module docstring)."""
    if hasattr(model, "features") and hasattr(model, "unembed"):
        return model.features, model.unembed
    return model, (lambda logits: logits)


def _log_probs_and_nll(logits, targets):
    """Log-probabilities and the NLL of ``targets`` [..., 1], computed as :func:`token_nll` computes it."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    return logits - lse[..., None], lse - jnp.take_along_axis(logits, targets, axis=-1)[..., 0]


@functools.partial(jax.jit, static_argnums=(0, 1, 5))
def _paired_token_stats(graphdef, ref_graphdef, state, ref_state, tokens, chunk):
    """Traced: per-token [B, T-1] NLL of both models, KL(reference || model) and whether the argmaxes agree."""
    model, ref = nnx.merge(graphdef, state), nnx.merge(ref_graphdef, ref_state)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    (hid, head), (ref_hid, ref_head) = _model_head(model), _model_head(ref)
    h, rh = hid(inputs), ref_hid(inputs)
    cols = {"nll": [], "ref_nll": [], "kl": [], "top1": []}
    for s in range(0, h.shape[1], chunk):
        t = targets[:, s : s + chunk, None]
        lp, nll = _log_probs_and_nll(head(h[:, s : s + chunk]), t)
        rlp, ref_nll = _log_probs_and_nll(ref_head(rh[:, s : s + chunk]), t)
        cols["nll"].append(nll)
        cols["ref_nll"].append(ref_nll)
        cols["kl"].append(jnp.sum(jnp.exp(rlp) * (rlp - lp), axis=-1))
        cols["top1"].append((jnp.argmax(lp, -1) == jnp.argmax(rlp, -1)).astype(jnp.float32))
    return {k: jnp.concatenate(v, axis=1) for k, v in cols.items()}


def _mean_se(x: np.ndarray) -> tuple[float, float]:
    return float(x.mean()), (float(x.std(ddof=1)) / math.sqrt(len(x)) if len(x) > 1 else math.nan)


@dataclasses.dataclass(frozen=True)
class ReferenceComparison:
    """A language model scored against a reference (e.g. its float original) on the same tokens, as llama.cpp's
    ``--kl-divergence`` reports it. Every ``*_se`` is a standard error over tokens (treated as independent).

    ``ppl_ratio`` is ``ppl / ref_ppl`` and ``ppl_ratio_se`` its paired standard error (delta method on the per-token
    NLL differences): it is far smaller than either perplexity's own error, because both models meet the same
    hard and easy tokens, so it is the figure to compare schemes by. ``kl`` is the mean KL(reference || model) in
    nats, ``top1`` the fraction of positions whose most likely next token is the reference's.
    """

    tokens: int
    ppl: float
    ppl_se: float
    ref_ppl: float
    ref_ppl_se: float
    ppl_ratio: float
    ppl_ratio_se: float
    kl: float
    kl_se: float
    top1: float
    top1_se: float

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The fields as a flat dict (``tokens`` left out), keys prefixed by ``prefix``."""
        return {prefix + k: v for k, v in dataclasses.asdict(self).items() if k != "tokens"}

    def row(self) -> dict[str, float]:
        """The columns the language-model studies store per run: ``perplexity`` (+ ``_se``), ``float_perplexity``
        (+ ``_se``: the reference's), ``ppl_ratio`` (+ ``_se``), ``kl`` (+ ``_se``), ``top1`` (+ ``_se``).

        Example:
            >>> c = ReferenceComparison(8, 12.0, 1.0, 10.0, 0.9, 1.2, 0.01, 0.05, 0.01, 0.9, 0.03)
            >>> r = c.row(); r["perplexity"], r["float_perplexity_se"], r["ppl_ratio"], len(r)
            (12.0, 0.9, 1.2, 10)
        """
        return {"perplexity": self.ppl, "perplexity_se": self.ppl_se, "float_perplexity": self.ref_ppl,
                "float_perplexity_se": self.ref_ppl_se, "ppl_ratio": self.ppl_ratio, "ppl_ratio_se": self.ppl_ratio_se,
                "kl": self.kl, "kl_se": self.kl_se, "top1": self.top1, "top1_se": self.top1_se}

    @classmethod
    def from_token_stats(cls, stats) -> ReferenceComparison:
        """The figures of per-token statistics ``{"nll", "ref_nll", "kl", "top1"}`` (arrays of any shape, e.g.
        :func:`paired_token_stats`'s, or several of them concatenated: pooling is concatenation).

        Example:
            >>> st = {"nll": [1.0, 3.0], "ref_nll": [1.0, 2.0], "kl": [0.0, 0.5], "top1": [1.0, 0.0]}
            >>> c = ReferenceComparison.from_token_stats(st)
            >>> c.tokens, round(c.ppl, 4), round(c.ref_ppl, 4), round(c.ppl_ratio, 4), c.kl, c.top1
            (2, 7.3891, 4.4817, 1.6487, 0.25, 0.5)
        """
        cols = {k: np.asarray(stats[k], np.float64).ravel() for k in ("nll", "ref_nll", "kl", "top1")}
        n = len(cols["nll"])
        # exp of the float32 mean, as perplexity() computes it, so the figures agree bit for bit
        ppl = float(np.exp(np.float32(np.mean(cols["nll"].astype(np.float32)))))
        ref_ppl = float(np.exp(np.float32(np.mean(cols["ref_nll"].astype(np.float32)))))
        d_mean, d_se = _mean_se(cols["nll"] - cols["ref_nll"])
        ratio = math.exp(d_mean)
        kl, kl_se = _mean_se(cols["kl"])
        top1, top1_se = _mean_se(cols["top1"])
        return cls(tokens=n, ppl=ppl, ppl_se=ppl * _mean_se(cols["nll"])[1],
                   ref_ppl=ref_ppl, ref_ppl_se=ref_ppl * _mean_se(cols["ref_nll"])[1],
                   ppl_ratio=ratio, ppl_ratio_se=ratio * d_se, kl=kl, kl_se=kl_se, top1=top1, top1_se=top1_se)


def _row_steps(tokens: np.ndarray, rows_per_step: int | None):
    """Yield ``(rows, n)``: ``tokens`` [B, T] ``rows_per_step`` rows at a time (all at once when None or >= B); a
    short last step is padded with copies of its last row, so every step runs one compiled shape (``n``: the real
    rows, first)."""
    if rows_per_step is not None and (isinstance(rows_per_step, bool) or not isinstance(rows_per_step, int)
                                      or rows_per_step < 1):
        raise ValueError(f"rows_per_step: a positive integer or None, got {rows_per_step!r}")
    b = tokens.shape[0]
    if rows_per_step is None or b <= rows_per_step:
        yield jnp.asarray(tokens), b
        return
    for s in range(0, b, rows_per_step):
        part = tokens[s : s + rows_per_step]
        n = len(part)
        if n < rows_per_step:
            part = np.concatenate([part, np.repeat(part[-1:], rows_per_step - n, axis=0)])
        yield jnp.asarray(part), n


def _token_rows(tokens) -> np.ndarray:
    tokens = np.asarray(tokens, np.int32)
    return tokens[None] if tokens.ndim == 1 else tokens


def paired_token_stats(model: nnx.Module, reference: nnx.Module, tokens, *, chunk: int = 256,
                       any_structure: bool = False, rows_per_step: int | None = None) -> dict[str, np.ndarray]:
    """The per-token figures :func:`compare_to_reference` pools: ``{"nll", "ref_nll", "kl", "top1"}``, each
    ``[B, T - 1]`` float32 (the NLL of each next token under the model and the reference, KL(reference || model),
    1.0 where the two argmaxes agree). ``rows_per_step`` rows of ``tokens`` run per compiled call (None: all).
    :meth:`ReferenceComparison.from_token_stats` turns them (or the concatenation of several calls') into figures.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlab.models import Transformer, TransformerConfig
        >>> cfg = TransformerConfig(vocab_size=5, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8)
        >>> m = Transformer(cfg, rngs=nnx.Rngs(0))
        >>> st = paired_token_stats(m, m, np.arange(24).reshape(3, 8) % 5, rows_per_step=2)
        >>> st["nll"].shape, bool((st["nll"] == st["ref_nll"]).all()), float(st["top1"].min())
        ((3, 7), True, 1.0)
    """
    tokens = _token_rows(tokens)
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens: need at least 2 per row to score, got shape {tuple(tokens.shape)}")
    graphdef, state = nnx.split(model)
    ref_graphdef, ref_state = nnx.split(reference)
    if ref_graphdef != graphdef and not any_structure:
        raise ValueError("reference: must have the same structure as model (same modules and shapes), "
                         "or pass any_structure=True")
    parts = [{k: np.asarray(v)[:n] for k, v in
              _paired_token_stats(graphdef, ref_graphdef, state, ref_state, rows, chunk).items()}
             for rows, n in _row_steps(tokens, rows_per_step)]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def compare_to_reference(model: nnx.Module, reference: nnx.Module, tokens, *, chunk: int = 256,
                         any_structure: bool = False, rows_per_step: int | None = None) -> ReferenceComparison:
    """Score ``model`` against ``reference`` on ``tokens`` (``[T]`` or ``[B, T]``, whole causal sequences as in
    :func:`token_nll`): both perplexities with their errors, the paired perplexity ratio, the mean KL divergence
    and the top-1 agreement. Both models must share one structure (e.g. a quantized copy whose kernels were
    swapped for their dequantized values) unless ``any_structure`` is True (then the reference may be another
    model over the same vocabulary, e.g. the float original of a model whose activations are quantized);
    both run in one compiled program, logits ``chunk`` positions at a time, ``rows_per_step`` rows of ``tokens``
    per call (None: all of them; memory grows with ``rows_per_step x chunk``). The per-token figures of all rows
    are pooled (:func:`paired_token_stats`, :meth:`ReferenceComparison.from_token_stats`), so the result does
    not depend on ``rows_per_step`` beyond float rounding.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlab.models import Transformer, TransformerConfig
        >>> cfg = TransformerConfig(vocab_size=5, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8)
        >>> m = Transformer(cfg, rngs=nnx.Rngs(0))
        >>> c = compare_to_reference(m, m, np.arange(8) % 5)
        >>> c.ppl == c.ref_ppl == perplexity(m, np.arange(8) % 5), c.ppl_ratio, abs(c.kl) < 1e-6, c.top1
        (True, 1.0, True, 1.0)
        >>> rows = np.arange(24).reshape(3, 8) % 5
        >>> c3 = compare_to_reference(m, m, rows, rows_per_step=2)
        >>> c3.tokens, abs(c3.ppl / compare_to_reference(m, m, rows).ppl - 1) < 1e-6
        (21, True)
    """
    return ReferenceComparison.from_token_stats(paired_token_stats(
        model, reference, tokens, chunk=chunk, any_structure=any_structure, rows_per_step=rows_per_step))


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


def probe_accuracy(embeddings, labels, n_train: int, *, C: float = 10.0) -> float:
    """Test accuracy of a linear probe (logistic regression, scikit-learn) fitted on the first ``n_train``
    embeddings and scored on the rest: how much of the labels' information a (quantized) encoder keeps.

    Example:
        >>> import numpy as np
        >>> e = np.concatenate([np.eye(3), np.eye(3)]).astype(np.float32)  # 3 classes, seen twice
        >>> probe_accuracy(e, [0, 1, 2, 0, 1, 2], n_train=3)
        1.0
    """
    from sklearn.linear_model import LogisticRegression  # deferred: scikit-learn takes ~1 s to import

    emb, labels = np.asarray(embeddings), np.asarray(labels)
    if not 0 < n_train < len(emb):
        raise ValueError(f"probe_accuracy: n_train must be in 1..{len(emb) - 1} (embeddings: {len(emb)}), got {n_train}")
    clf = LogisticRegression(max_iter=2000, C=C)
    clf.fit(emb[:n_train], labels[:n_train])
    return float((clf.predict(emb[n_train:]) == labels[n_train:]).mean())


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


def bos_rows(tokens, row_len: int, n_rows: int) -> np.ndarray:
    """``n_rows`` rows of ``row_len`` tokens cut from a token stream that starts with BOS (as a tokenizer encodes a
    text): each row is that BOS + the stream's next ``row_len - 1`` tokens, so row 0 is ``tokens[:row_len]`` and
    every row is scored with the same context length. Raises ValueError when the stream is too short.

    Example:
        >>> bos_rows([2, 10, 11, 12, 13, 14, 15], row_len=3, n_rows=3).tolist()
        [[2, 10, 11], [2, 12, 13], [2, 14, 15]]
    """
    tokens = np.asarray(tokens, np.int32).ravel()
    if row_len < 2 or n_rows < 1:
        raise ValueError(f"bos_rows: row_len >= 2 and n_rows >= 1, got row_len={row_len}, n_rows={n_rows}")
    need = 1 + n_rows * (row_len - 1)
    if len(tokens) < need:
        raise ValueError(f"bos_rows: {n_rows} rows of {row_len} tokens (BOS + {row_len - 1}) need {need} tokens "
                         f"(BOS + {need - 1}), the stream has {len(tokens)}: room for "
                         f"{(len(tokens) - 1) // (row_len - 1)} rows")
    body = tokens[1:need].reshape(n_rows, row_len - 1)
    return np.concatenate([np.full((n_rows, 1), tokens[0], np.int32), body], axis=1)


def token_nll(model: nnx.Module, tokens, chunk: int = 256, *, rows_per_step: int | None = None) -> np.ndarray:
    """Per-token negative log-likelihood (nats) of ``tokens[:, 1:]``, each given every earlier token of its row.

    ``tokens``: ``[T]`` or ``[B, T]``; returns ``[B, T - 1]`` float32 (the first token, e.g. BOS, is context
    only). One causal pass per row; logits are made ``chunk`` positions at a time (see the module docstring),
    ``rows_per_step`` rows per compiled call (None: all rows in one).

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlab.models import Transformer, TransformerConfig
        >>> cfg = TransformerConfig(vocab_size=5, d_model=16, n_layers=1, n_heads=2, d_ff=32, max_len=8)
        >>> m = Transformer(cfg, rngs=nnx.Rngs(0))
        >>> token_nll(m, np.arange(8) % 5, chunk=3).shape
        (1, 7)
        >>> rows = np.arange(24).reshape(3, 8) % 5
        >>> bool(np.allclose(token_nll(m, rows, rows_per_step=2), token_nll(m, rows), atol=1e-6))
        True
    """
    graphdef, state = nnx.split(model)
    parts = [np.asarray(_causal_nll(graphdef, state, rows, chunk))[:n]
             for rows, n in _row_steps(_token_rows(tokens), rows_per_step)]
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


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


def perplexity_from_nll(nll) -> tuple[float, float]:
    """``(perplexity, standard error)`` of per-token NLLs (any shape; several evaluations' concatenated pool
    exactly): ``exp(mean)`` (in float32 for float32 NLLs, as :func:`perplexity` takes it) and, by the delta method,
    ``ppl * std(nll) / sqrt(n)``, as llama.cpp reports it (nan for a single token).

    Example:
        >>> import numpy as np
        >>> ppl, se = perplexity_from_nll(np.log(np.array([2.0, 8.0], np.float32)))
        >>> round(ppl, 4), round(se, 4)
        (4.0, 2.7726)
    """
    nll = np.asarray(nll).ravel()
    ppl = float(np.exp(nll.mean()))
    se = ppl * float(nll.std(ddof=1)) / math.sqrt(len(nll)) if len(nll) > 1 else math.nan
    return ppl, se


def perplexity_with_error(model: nnx.Module, tokens, *, chunk: int = 256,
                          rows_per_step: int | None = None) -> tuple[float, float]:
    """``(perplexity, standard error)`` over whole sequences: the perplexity is exactly
    :func:`perplexity`'s (``seq_len=None``); its standard error comes from the per-token NLLs by the delta
    method, ``ppl * std(nll) / sqrt(n)``, as llama.cpp reports it (:func:`perplexity_from_nll`). Tokens are
    treated as independent, so on running text (whose NLLs are correlated) it is a lower bound on the true
    uncertainty. ``rows_per_step``: rows of ``tokens`` per compiled call (:func:`token_nll`); all rows' NLLs
    are pooled.

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
    return perplexity_from_nll(token_nll(model, tokens, chunk, rows_per_step=rows_per_step))
