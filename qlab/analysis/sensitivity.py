"""Sensitivity: how much each layer is hurt by each candidate, as a tidy table
``layer, candidate, params, bytes, usable, score`` (lower is better; :data:`~qlab.analysis.candidates.KEEP`
scores 0; unusable rows score NaN). Three methods, selectable by name (:data:`SENSITIVITY_METHODS`):

* ``"sqnr"``: weight-only proxy, no data: ``params * 10**(-SQNR/10)`` = the relative squared weight
  error summed over the layer's weights (additive over layers, unlike -SQNR in dB);
* ``"measured"``: the increase of the mean held-out loss with only that layer quantized;
* ``"fisher"``: ``0.5 * sum(F * (w_q - w)**2)``, F the empirical Fisher diagonal (squared gradients
  of the batch loss, averaged over batches): the second-order Taylor estimate of the loss increase;
* ``"hutchinson"``: HAWQ-style ``0.5 * (trace(H_l) / params_l) * sum((w_q - w)**2)``, the Hessian
  trace of each layer estimated with Hutchinson's Rademacher probes.

Data is ``(loss_fn, batches)``: ``loss_fn(model, batch) -> scalar`` (e.g. ``qlab.train.xent_loss``)
and a non-empty sequence of batches; a data-driven method that sees no batch is a ValueError.

Example:
    >>> from flax import nnx
    >>> from qlab.models import MLP
    >>> s = sensitivity(MLP(8, hidden=(16,), out=4, rngs=nnx.Rngs(0)), ["int2/ch", "int8/ch", "keep"])
    >>> s.groupby("candidate")["score"].sum().sort_values().index.tolist()
    ['keep', 'int8/ch', 'int2/ch']
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from qlab.analysis.candidates import KEEP, TABLE_COLUMNS, candidate_layer, candidate_table
from qlab.nn import quantizable_layers

__all__ = [
    "SCORE_COLUMNS",
    "SENSITIVITY_METHODS",
    "sensitivity",
    "sqnr_sensitivity",
    "measured_sensitivity",
    "fisher_sensitivity",
    "hutchinson_sensitivity",
]

#: columns of every sensitivity table
SCORE_COLUMNS = TABLE_COLUMNS[:-1] + ["score"]


def _as_table(model, candidates, example=None) -> pd.DataFrame:
    if isinstance(candidates, pd.DataFrame):
        return candidates
    return candidate_table(model, candidates, example)


def _effective_weights(model, table: pd.DataFrame):
    """``{(layer, candidate): (float weight, effective weight)}`` for the usable, non-KEEP rows."""
    layers = dict(quantizable_layers(model))
    out = {}
    for r in table.itertuples():
        if r.usable and r.candidate != KEEP:
            q = candidate_layer(layers[r.layer], r.candidate, r.layer)
            w = q.weight[...]
            out[(r.layer, r.candidate)] = (w, q.weight_value())
    return out


def _scored(table: pd.DataFrame, scores: dict) -> pd.DataFrame:
    df = table[[c for c in TABLE_COLUMNS if c != "reason"]].copy()
    df["score"] = [0.0 if c == KEEP and u else float(scores.get((lay, c), np.nan))
                   for lay, c, u in zip(df["layer"], df["candidate"], df["usable"])]
    return df.reset_index(drop=True)


def _relative_error(w, wq) -> float:
    """``10**(-sqnr_db(w, wq)/10)`` = noise / signal energy, in numpy (no compile per weight shape)."""
    w64, wq64 = np.asarray(w, np.float64), np.asarray(wq, np.float64)
    return float(np.sum((w64 - wq64) ** 2) / max(np.sum(w64**2), 1e-30))


def sqnr_sensitivity(model, candidates, example=None) -> pd.DataFrame:
    """Weight-only score ``params * 10**(-SQNR/10)`` (no data needed). ``candidates``: a
    :func:`~qlab.analysis.candidate_table` or a list of candidate strings.

    Example:
        >>> from flax import nnx
        >>> s = sqnr_sensitivity(nnx.Linear(16, 4, rngs=nnx.Rngs(0)), ["int4/ch", "int8/ch"])
        >>> bool(s.score[0] > s.score[1] > 0)
        True
    """
    table = _as_table(model, candidates, example)
    scores = {k: float(w.size) * _relative_error(w, wq) for k, (w, wq) in _effective_weights(model, table).items()}
    return _scored(table, scores)


def _weight_slots(model):
    """(graphdef, leaves, treedef, {layer path: leaf index of its weight})."""
    graphdef, state = nnx.split(model)
    keyed, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = {}
    for i, (kp, _) in enumerate(keyed):
        parts = [str(getattr(k, "key", getattr(k, "name", k))) for k in kp]
        if parts and parts[-1] == "value":
            parts = parts[:-1]
        names["/".join(parts)] = i
    slots = {}
    for path, layer in quantizable_layers(model):
        wname = "embedding" if isinstance(layer, nnx.Embed) else "kernel"
        slots[path] = names["/".join(x for x in (path, wname) if x)]
    return graphdef, [leaf for _, leaf in keyed], treedef, slots


def _check_data(loss_fn, batches, who: str):
    if not callable(loss_fn):
        raise ValueError(f"{who}: data must be (loss_fn(model, batch) -> scalar, batches); got loss_fn={loss_fn!r}")
    batches = list(batches)
    if not batches:
        raise ValueError(f"{who}: no batches: a data-driven sensitivity needs held-out data")
    return batches


def measured_sensitivity(model, candidates, loss_fn, batches, example=None) -> pd.DataFrame:
    """Loss increase (mean over ``batches``) with only one layer at one candidate, the rest float.

    Each evaluation swaps one layer's effective weight into the float model's state and runs ONE
    jitted ``loss_fn`` over (state leaves, batch): it compiles once per distinct batch shape (so
    usually once in all, twice with a ragged last batch), not once per layer or candidate; there
    are ``(usable non-keep rows + 1) * len(batches)`` evaluations.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> m = nnx.Linear(8, 2, rngs=nnx.Rngs(0))
        >>> loss = lambda model, b: jnp.mean((model(b[0]) - b[1]) ** 2)
        >>> batch = (jnp.ones((4, 8)), jnp.zeros((4, 2)))
        >>> s = measured_sensitivity(m, ["int2/ch", "keep"], loss, [batch])
        >>> s.score.tolist()[1], bool(s.score[0] != 0)
        (0.0, True)
    """
    batches = _check_data(loss_fn, batches, "measured_sensitivity")
    table = _as_table(model, candidates, example)
    graphdef, leaves, treedef, slots = _weight_slots(model)

    @jax.jit
    def loss_of(leaves, batch):
        return loss_fn(nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, leaves)), batch)

    def mean_loss(ls):
        return float(np.mean([float(loss_of(ls, b)) for b in batches]))

    base = mean_loss(leaves)
    scores = {}
    for (layer, cand), (_, wq) in _effective_weights(model, table).items():
        swapped = list(leaves)
        swapped[slots[layer]] = wq
        scores[(layer, cand)] = mean_loss(swapped) - base
    return _scored(table, scores)


def fisher_sensitivity(model, candidates, loss_fn, batches, example=None) -> pd.DataFrame:
    """``0.5 * sum(F * (w_q - w)**2)`` per layer and candidate, ``F`` the squared gradient of the
    batch loss wrt each weight, averaged over ``batches`` (one jitted gradient program, compiled
    once per batch shape). This is the batch-level empirical Fisher: per-example gradients would
    need to know the batch's structure, which ``loss_fn`` hides.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> m = nnx.Linear(8, 2, rngs=nnx.Rngs(0))
        >>> loss = lambda model, b: jnp.mean((model(b[0]) - b[1]) ** 2)
        >>> s = fisher_sensitivity(m, ["int2/ch", "int8/ch"], loss, [(jnp.ones((4, 8)), jnp.zeros((4, 2)))])
        >>> bool(s.score[0] > s.score[1] > 0)
        True
    """
    batches = _check_data(loss_fn, batches, "fisher_sensitivity")
    table = _as_table(model, candidates, example)
    graphdef, leaves, treedef, slots = _weight_slots(model)
    paths = list(slots)

    @jax.jit
    def grads_of(weights, leaves, batch):
        def f(ws):
            ls = list(leaves)
            for p, w in zip(paths, ws):
                ls[slots[p]] = w
            return loss_fn(nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, ls)), batch)

        return jax.grad(f)(weights)

    weights = [leaves[slots[p]] for p in paths]
    fisher = [jnp.zeros_like(w, dtype=jnp.float32) for w in weights]
    for b in batches:
        fisher = [f + jnp.square(g.astype(jnp.float32)) for f, g in zip(fisher, grads_of(weights, leaves, b))]
    fisher = {p: f / len(batches) for p, f in zip(paths, fisher)}
    scores = {(layer, cand): 0.5 * float(jnp.sum(fisher[layer] * jnp.square((wq - w).astype(jnp.float32))))
              for (layer, cand), (w, wq) in _effective_weights(model, table).items()}
    return _scored(table, scores)


def hutchinson_sensitivity(model, candidates, loss_fn, batches, example=None, *, samples: int = 8,
                           seed: int = 0) -> pd.DataFrame:
    """HAWQ-style: ``0.5 * (trace(H_l) / params_l) * sum((w_q - w)**2)``, the trace of each layer's
    Hessian block estimated by Hutchinson's method (``samples`` Rademacher probes per batch,
    ``E[v^T H v] = tr H``; Hessian-vector products by forward-over-reverse differentiation, one
    jitted program compiled once per batch shape). Noisy for few samples; can be negative where
    the loss is not locally convex.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> m = nnx.Linear(8, 2, rngs=nnx.Rngs(0))
        >>> loss = lambda model, b: jnp.mean((model(b[0]) - b[1]) ** 2)
        >>> s = hutchinson_sensitivity(m, ["int2/ch", "int8/ch"], loss, [(jnp.ones((4, 8)), jnp.zeros((4, 2)))])
        >>> bool(s.score[0] > s.score[1] > 0)
        True
    """
    batches = _check_data(loss_fn, batches, "hutchinson_sensitivity")
    if samples < 1:
        raise ValueError(f"hutchinson_sensitivity: samples must be >= 1, got {samples}")
    table = _as_table(model, candidates, example)
    graphdef, leaves, treedef, slots = _weight_slots(model)
    paths = list(slots)

    @jax.jit
    def vhv(weights, leaves, batch, probes):
        def f(ws):
            ls = list(leaves)
            for p, w in zip(paths, ws):
                ls[slots[p]] = w
            return loss_fn(nnx.merge(graphdef, jax.tree_util.tree_unflatten(treedef, ls)), batch)

        _, hv = jax.jvp(jax.grad(f), (weights,), (probes,))
        return [jnp.sum(v * h) for v, h in zip(probes, hv)]

    weights = [leaves[slots[p]] for p in paths]
    key = jax.random.PRNGKey(seed)
    traces = np.zeros(len(paths))
    for b in batches:
        for _ in range(samples):
            key, *ks = jax.random.split(key, len(paths) + 1)
            probes = [jax.random.rademacher(k, w.shape, dtype=w.dtype) for k, w in zip(ks, weights)]
            traces += np.array([float(t) for t in vhv(weights, leaves, b, probes)])
    mean_curv = {p: t / (samples * len(batches)) / weights[i].size for i, (p, t) in enumerate(zip(paths, traces))}
    scores = {(layer, cand): 0.5 * mean_curv[layer] * float(jnp.sum(jnp.square((wq - w).astype(jnp.float32))))
              for (layer, cand), (w, wq) in _effective_weights(model, table).items()}
    return _scored(table, scores)


#: sensitivity methods by name; the data-driven ones take ``(loss_fn, batches)``
SENSITIVITY_METHODS = {
    "sqnr": sqnr_sensitivity,
    "measured": measured_sensitivity,
    "fisher": fisher_sensitivity,
    "hutchinson": hutchinson_sensitivity,
}


def sensitivity(model, candidates, method: str = "sqnr", *, data=None, example=None) -> pd.DataFrame:
    """Score every (layer, candidate) with the method named ``method`` (:data:`SENSITIVITY_METHODS`);
    ``data = (loss_fn, batches)`` for ``"measured"``, ``"fisher"`` and ``"hutchinson"`` (ValueError without it).

    Example:
        >>> from flax import nnx
        >>> s = sensitivity(nnx.Linear(16, 4, rngs=nnx.Rngs(0)), ["int4/ch", "keep"], "sqnr")
        >>> s.columns.tolist()
        ['layer', 'candidate', 'params', 'bytes', 'usable', 'score']
        >>> sensitivity(nnx.Linear(16, 4, rngs=nnx.Rngs(0)), ["int4/ch"], "measured")
        Traceback (most recent call last):
        ...
        ValueError: sensitivity 'measured' needs data=(loss_fn, batches): it saw no data
    """
    if method not in SENSITIVITY_METHODS:
        raise ValueError(f"sensitivity: unknown method {method!r}; allowed: {list(SENSITIVITY_METHODS)}")
    if method == "sqnr":
        if data is not None:
            raise ValueError("sensitivity 'sqnr' is weight-only: it takes no data")
        return sqnr_sensitivity(model, candidates, example)
    if data is None:
        raise ValueError(f"sensitivity {method!r} needs data=(loss_fn, batches): it saw no data")
    loss_fn, batches = data
    return SENSITIVITY_METHODS[method](model, candidates, loss_fn, batches, example)
