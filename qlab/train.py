"""A small, explicit training loop for NNX models (classification or next-token LM).

The loop knows nothing about quantization, but it is built for models that carry extra state:

* everything matching ``wrt`` (default ``nnx.Param``, which includes subclasses such as learnable
  quantizer parameters) is differentiated and updated by the optax optimizer;
* any other ``nnx.Variable`` the forward pass mutates (e.g. an EMA of activation ranges, a step
  counter) is carried through the jitted step and written back to the model.

The step is one ``jax.jit``-compiled function of the model's and the ``nnx.Optimizer``'s state
(``nnx.split`` once, ``nnx.merge`` inside; the pattern Flax recommends for speed), so it costs no
per-step graph traversal. Results are deterministic for a seed.

Example:
    >>> from flax import nnx
    >>> from qlab.data import digits_dataset
    >>> from qlab.models import MLP
    >>> ds = digits_dataset(seed=0)
    >>> model = MLP(64, hidden=(64,), out=10, rngs=nnx.Rngs(0))
    >>> hist = train(model, ds, steps=50, batch_size=64, progress=False)
    >>> hist.loss[-1] < hist.loss[0]
    True
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from . import data as _data
from . import distributed

__all__ = ["History", "train", "train_variants", "variant_sharding", "xent_loss", "lm_loss", "LOSSES",
           "f32_master"]


# --------------------------------------------------------------------------- losses


def xent_loss(model: Callable, batch) -> jax.Array:
    """Mean softmax cross-entropy of ``model(x)`` against integer labels; ``batch = (x, y)``.

    Example:
        >>> import jax.numpy as jnp
        >>> model = lambda x: jnp.zeros((x.shape[0], 4))
        >>> round(float(xent_loss(model, (jnp.ones((2, 3)), jnp.array([0, 1])))), 4)  # log(4)
        1.3863
    """
    x, y = batch
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


def lm_loss(model: Callable, batch) -> jax.Array:
    """Mean next-token cross-entropy; ``batch`` is int tokens (B, T+1): inputs ``[:, :-1]``, targets ``[:, 1:]``.

    Example:
        >>> import jax.numpy as jnp
        >>> model = lambda t: jnp.zeros(t.shape + (8,))
        >>> round(float(lm_loss(model, jnp.zeros((2, 5), jnp.int32))), 4)  # log(8)
        2.0794
    """
    tokens = batch
    logits = model(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:]).mean()


#: Built-in losses by name: ``loss="xent"`` (classification) or ``loss="lm"`` (next token).
LOSSES: dict[str, Callable] = {"xent": xent_loss, "lm": lm_loss}


# --------------------------------------------------------------------------- history


@dataclasses.dataclass
class History:
    """What :func:`train` records: the loss of every step, evaluations, and wall time.

    ``evals`` is a list of dicts ``{"step": s, **metrics}`` (from ``eval_fn``).

    Example:
        >>> h = History(loss=[2.0, 1.0], evals=[{"step": 2, "accuracy": 0.9}])
        >>> h.final_loss, h.to_frame().shape
        (1.0, (2, 3))
    """

    loss: list[float] = dataclasses.field(default_factory=list)
    evals: list[dict] = dataclasses.field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0

    @property
    def final_loss(self) -> float:
        """The last step's loss (``nan`` if no step ran).

        Example:
            >>> History(loss=[3.0, 2.5]).final_loss
            2.5
        """
        return self.loss[-1] if self.loss else float("nan")

    def to_frame(self):
        """The per-step losses as a pandas DataFrame (``step``, ``loss``), evaluations merged in by step.

        Example:
            >>> History(loss=[1.0]).to_frame().columns.tolist()
            ['step', 'loss']
        """
        df = pd.DataFrame({"step": np.arange(1, len(self.loss) + 1), "loss": self.loss})
        if self.evals:
            df = df.merge(pd.DataFrame(self.evals), on="step", how="left")
        return df


# --------------------------------------------------------------------------- the loop


def _default_eval_fn(dataset, loss_name: str, batch_size: int, seq_len: int | None):
    from . import evaluate

    if isinstance(dataset, _data.ImageDataset) and len(dataset.val):
        x, y = dataset.val
        return lambda m: {"val_accuracy": evaluate.accuracy(m, x, y, batch_size=max(batch_size, 256))}
    if isinstance(dataset, _data.CharCorpus) and len(dataset.val) > 1 and seq_len:
        val = dataset.val
        return lambda m: {"val_nll": evaluate.nll(m, val, seq_len=seq_len, batch_size=batch_size)}
    return None


def _make_batches(data, loss_name, *, batch_size, seed, steps, epochs, seq_len):
    """Turn ``data`` (dataset, arrays or an iterable of batches) into an iterator of batches."""
    if isinstance(data, _data.ImageDataset):
        data = data.train
    if isinstance(data, _data.CharCorpus):
        data = data.train
    if isinstance(data, _data.Split):
        data = (data.images, data.labels)
    if loss_name == "lm" and isinstance(data, (np.ndarray, jax.Array)) and data.ndim == 1:
        if seq_len is None:
            raise ValueError("training an LM on a token array needs seq_len=")
        if epochs is not None:
            steps = int(epochs * (len(data) // (batch_size * seq_len)))
        return _data.lm_batches(data, seq_len, batch_size, seed, steps=steps), steps
    if isinstance(data, tuple) and all(isinstance(a, (np.ndarray, jax.Array)) for a in data):
        if epochs is not None and steps is None:
            steps = epochs * (len(data[0]) // batch_size)
        return _data.batches(data, batch_size, seed, epochs=epochs, steps=steps), steps
    if isinstance(data, (np.ndarray, jax.Array)):
        return _data.batches(data, batch_size, seed, epochs=epochs, steps=steps), steps
    it = iter(data)
    return (itertools.islice(it, steps) if steps is not None else it), steps


def train(
    model: nnx.Module,
    data: Any,
    *,
    steps: int | None = None,
    epochs: int | None = None,
    batch_size: int = 128,
    optimizer: optax.GradientTransformation | nnx.Optimizer | None = None,
    learning_rate: float = 1e-3,
    loss: str | Callable = "xent",
    seed: int = 0,
    seq_len: int | None = None,
    wrt: Any = nnx.Param,
    progress: bool = True,
    eval_every: int | None = None,
    eval_fn: Callable[[nnx.Module], Mapping[str, float]] | None = None,
    log_every: int = 10,
    mesh: Mesh | None = None,
    fsdp_axis: int = 0,
    accumulate: int = 1,
    param_dtype: Any = None,
) -> History:
    """Train ``model`` in place and return its :class:`History`.

    Args:
        model: an NNX module. Its state matching ``wrt`` is trained; other Variables that the forward
            pass mutates (statistics, counters) are updated in place as the forward pass dictates.
        data: one of: an :class:`~qlab.data.ImageDataset` (uses ``train``; evaluates on ``val``), a
            :class:`~qlab.data.Split` or ``(x, y)`` arrays (shuffled by ``seed``), a
            :class:`~qlab.data.CharCorpus` or 1-D token array (random windows of ``seq_len + 1``,
            ``loss="lm"``), or any iterable of ready batches (``(x, y)`` tuples or token arrays).
        steps / epochs: how long; ``steps`` wins if both are given. An iterable runs until exhausted
            (or ``steps``). For token arrays, an epoch is ``len(tokens) // (batch_size * seq_len)`` steps.
        optimizer: an optax transformation (default ``optax.adam(learning_rate)``), wrapped in a fresh
            ``nnx.Optimizer(model, tx, wrt=wrt)``; or an existing ``nnx.Optimizer`` of this model, to carry
            its state (e.g. Adam moments, step count) across several ``train`` calls (``wrt`` is then its own).
        loss: ``"xent"``, ``"lm"`` or a callable ``loss(model, batch) -> scalar``.
        seed: shuffling / window sampling seed (model init has its own ``nnx.Rngs``).
        wrt: an nnx filter of the state to differentiate and update (default ``nnx.Param``).
        progress: show a ``tqdm.auto`` bar with the running loss.
        eval_every: call ``eval_fn(model)`` every this many steps and at the end; default ``eval_fn``
            is validation accuracy (image datasets) or validation NLL (char corpora, needs ``seq_len``).
        log_every: how often (steps) the progress bar's loss is refreshed.
        mesh: a device mesh (:func:`qlab.distributed.make_mesh`; default: the one of an enclosing
            :func:`qlab.distributed.use_mesh` block, else one device): each batch is split over all its devices
            (every process passes the same global batch), the state's ``fsdp_axis`` over its ``"fsdp"`` axis
            (:func:`qlab.distributed.param_shardings`); one ``jax.jit`` program with those shardings. Losses and
            parameters equal the one-device run up to float reduction order. A batch the mesh does not divide,
            or a layout that splits a quantization group, is a ValueError before the first step.
        accumulate: split each batch into this many equal micro-batches (rows ``j, j+k, ...``), average
            their gradients, apply one update: the same step as the whole batch, with a k times smaller
            activation footprint (forward-mutated statistics see k calls).
        param_dtype: e.g. ``jnp.bfloat16``: the trained parameters are stored in this dtype (cast at the
            start), the optimizer keeps an f32 master copy and f32 moments (:func:`f32_master`); needs
            ``optimizer`` to be an optax transformation or None.

    Returns:
        :class:`History` with one loss per step (floats), evaluations, wall seconds.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlab.data import char_splits
        >>> from qlab.models import Transformer, TransformerConfig
        >>> corpus = char_splits("abcd" * 500)
        >>> cfg = TransformerConfig(corpus.vocab_size, d_model=32, n_layers=1, n_heads=2, d_ff=64, max_len=16)
        >>> model = Transformer(cfg, rngs=nnx.Rngs(0))
        >>> hist = train(model, corpus, loss="lm", seq_len=16, steps=30, batch_size=8, progress=False)
        >>> hist.final_loss < 0.5 * hist.loss[0]
        True
    """
    if isinstance(loss, str) and loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; known: {sorted(LOSSES)} or a callable")
    loss_name = loss if isinstance(loss, str) else getattr(loss, "__name__", "custom")
    loss_fn = LOSSES[loss] if isinstance(loss, str) else loss
    if steps is None and epochs is None and not _is_iterable_of_batches(data):
        raise ValueError("give steps= or epochs=")
    tx = _adam(learning_rate) if optimizer is None else optimizer
    batch_iter, total = _make_batches(
        data, loss_name, batch_size=batch_size, seed=seed, steps=steps, epochs=None if steps else epochs,
        seq_len=seq_len,
    )
    if eval_every is not None and eval_fn is None:
        eval_fn = _default_eval_fn(data, loss_name, batch_size, seq_len)
        if eval_fn is None:
            raise ValueError("eval_every needs eval_fn= for this kind of data")

    mesh = distributed.current_mesh() if mesh is None else mesh
    if not isinstance(accumulate, int) or accumulate < 1:
        raise ValueError(f"accumulate must be a positive integer, got {accumulate!r}")
    if mesh is not None:
        distributed.check_blocks(model, mesh, fsdp_axis)
    if param_dtype is not None:
        if isinstance(optimizer, nnx.Optimizer):
            raise ValueError("param_dtype= needs optimizer= an optax transformation (or None), not an nnx.Optimizer")
        _cast_params(model, wrt, param_dtype)
        tx = f32_master(tx)
    if isinstance(optimizer, nnx.Optimizer):
        opt, wrt = optimizer, optimizer.wrt
    else:
        opt = nnx.Optimizer(model, tx, wrt=wrt)
    graphdef, state = nnx.split((model, opt))

    if mesh is None:
        step_fn = functools.partial(_train_step, graphdef, loss_fn, wrt, accumulate)
        if accumulate > 1:
            batch_iter = _checked(batch_iter, lambda b: _check_micro(b, accumulate))
    else:
        step_fn, state = _sharded_step(graphdef, loss_fn, wrt, accumulate, state, mesh, fsdp_axis)
        batch_iter = (distributed.shard_batch(b, mesh) for b in
                      _checked(batch_iter, lambda b: distributed.check_batch(b, mesh, accumulate)))

    batch_iter = prefetch(batch_iter if mesh is not None else map(jax.device_put, batch_iter))
    hist = History()
    bar = None
    if progress:
        from tqdm.auto import tqdm  # deferred: picks the notebook or the terminal bar at first use

        bar = tqdm(total=total, desc="train", leave=True, dynamic_ncols=True)
    losses: list = []
    t0 = time.perf_counter()
    n = 0
    try:
        for batch in batch_iter:
            state, value = step_fn(state, batch)
            losses.append(value)
            n += 1
            if bar is not None:
                bar.update(1)
                if n % log_every == 0:
                    bar.set_postfix(loss=f"{float(value):.4f}")
            if eval_every and n % eval_every == 0:
                nnx.update((model, opt), state)
                hist.evals.append({"step": n, **_floats(eval_fn(model))})
        nnx.update((model, opt), state)
        if eval_every and n % eval_every != 0 and n > 0:
            hist.evals.append({"step": n, **_floats(eval_fn(model))})
        hist.loss = [float(v) for v in jax.device_get(losses)]
    finally:
        nnx.update((model, opt), state)
        if bar is not None:
            if hist.loss:
                bar.set_postfix(loss=f"{hist.loss[-1]:.4f}")
            bar.close()
    hist.steps = n
    hist.seconds = time.perf_counter() - t0
    return hist


@functools.lru_cache(maxsize=32)
def _adam(learning_rate: float) -> optax.GradientTransformation:
    # optax transformations are pure: reusing one keeps the compiled step cached across train() calls.
    return optax.adam(learning_rate)


def _step(graphdef, loss_fn, wrt, accumulate, state, batch):
    model, opt = nnx.merge(graphdef, state)
    if accumulate == 1:
        value, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model, batch)
    else:
        value, grads = _accumulated_grads(model, loss_fn, wrt, accumulate, batch)
    opt.update(model, grads)
    return nnx.state((model, opt)), value


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3), donate_argnums=4)
def _train_step(graphdef, loss_fn, wrt, accumulate, state, batch):
    """One optimizer step on the (model, optimizer) state; compiled once per structure/loss/filter."""
    return _step(graphdef, loss_fn, wrt, accumulate, state, batch)


def _sharded_step(graphdef, loss_fn, wrt, accumulate, state, mesh, fsdp_axis):
    """(jitted step with the mesh's in/out shardings, the state placed on the mesh)."""
    shapes = tuple((np.shape(a), np.dtype(a.dtype)) for a in jax.tree.leaves(state))
    fn, state_sh = _sharded_program(graphdef, loss_fn, wrt, accumulate, mesh, fsdp_axis, jax.tree.structure(state),
                                    shapes)
    state = jax.tree.map(lambda a, sh: jax.make_array_from_callback(np.shape(a), sh, lambda i: np.asarray(a)[i]),
                         state, state_sh)
    return fn, state


@functools.lru_cache(maxsize=16)
def _sharded_program(graphdef, loss_fn, wrt, accumulate, mesh, fsdp_axis, treedef, shapes):
    # cached like _train_step's jit: the next train() of a same-structure model reuses the compiled program
    state = jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(s, d) for s, d in shapes])

    # the model's arrays over "fsdp" (replicated across "data"); the optimizer's over every device (ZeRO-1):
    # gradients are reduce-scattered to the optimizer shards and the new parameters all-gathered, which on
    # these CPU devices costs a fraction of one all-reduce of replicated gradients (benchmarks/sharding.py)
    def layout(path, a):
        over = (distributed.FSDP,) if path[0].key == 0 else (distributed.DATA, distributed.FSDP)
        return distributed.leaf_sharding(a, mesh, fsdp_axis, over)

    state_sh = jax.tree_util.tree_map_with_path(layout, state)
    replicated = NamedSharding(mesh, PartitionSpec())
    fn = jax.jit(functools.partial(_step, graphdef, loss_fn, wrt, accumulate),
                 out_shardings=(state_sh, replicated), donate_argnums=0)
    return fn, state_sh


def _micro(a, k):
    # rows j, j+k, j+2k, ... form micro-batch j: each device keeps its own rows for every micro-batch
    return jnp.swapaxes(a.reshape((a.shape[0] // k, k) + a.shape[1:]), 0, 1)


def _check_micro(batch, k):
    for a in jax.tree.leaves(batch):
        if np.shape(a)[0] % k:
            raise ValueError(f"accumulate={k} does not divide a batch of {np.shape(a)[0]} rows")


def prefetch(batches, ahead: int = 1):
    """Yield ``batches`` while the next ``ahead`` are already drawn: with JAX's asynchronous dispatch, the host
    builds (and starts transferring) batch k+1 while the device computes step k. ``train`` feeds its steps so.

    Example:
        >>> drawn = []
        >>> def source():
        ...     for i in range(3):
        ...         drawn.append(i)
        ...         yield i
        >>> [(b, list(drawn)) for b in prefetch(source())]
        [(0, [0, 1]), (1, [0, 1, 2]), (2, [0, 1, 2])]
    """
    it, queue = iter(batches), collections.deque()
    for b in it:
        queue.append(b)
        if len(queue) > ahead:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def _checked(it, check):
    for i, b in enumerate(it):
        if i == 0:
            check(b)
        yield b


def _accumulated_grads(model, loss_fn, wrt, k, batch):
    """Mean loss and gradient over ``k`` micro-batches (a ``lax.scan``; other Variables carried through)."""
    gdef, diff, rest = nnx.split(model, wrt, ...)

    def pure(d, r, mb):
        m = nnx.merge(gdef, d, r)
        return loss_fn(m, mb), nnx.state(m, nnx.Not(wrt))

    def body(carry, mb):
        r, gsum, lsum = carry
        (value, r), g = jax.value_and_grad(pure, has_aux=True)(diff, r, mb)
        return (r, jax.tree.map(jnp.add, gsum, g), lsum + value), None

    zeros = jax.tree.map(jnp.zeros_like, diff)
    micro = jax.tree.map(lambda a: _micro(a, k), batch)
    (rest, gsum, lsum), _ = jax.lax.scan(body, (rest, zeros, jnp.zeros((), jnp.float32)), micro)
    nnx.update(model, rest)
    return lsum / k, jax.tree.map(lambda g: g / k, gsum)


def _cast_params(model, wrt, dtype) -> None:
    params = nnx.state(model, wrt)
    nnx.update(model, jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, params))


class MasterState(NamedTuple):
    """:func:`f32_master`'s state: the f32 copy of the parameters and the wrapped optimizer's state."""

    master: Any
    inner: Any


def f32_master(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Wrap ``tx`` for low-precision (e.g. bf16) parameters: it keeps an f32 master copy and runs ``tx`` on f32
    gradients; the updates it returns set each parameter to its master value rounded to the parameter's dtype.

    Example:
        >>> import jax.numpy as jnp, optax
        >>> tx = f32_master(optax.sgd(1e-3))
        >>> p = {"w": jnp.ones(2, jnp.bfloat16)}
        >>> st = tx.init(p)
        >>> for _ in range(3):  # 3 updates of 1e-3: each one alone is below bf16's resolution at 1.0
        ...     u, st = tx.update({"w": jnp.ones(2, jnp.bfloat16)}, st, p)
        ...     p = optax.apply_updates(p, u)
        >>> st.master["w"].dtype, round(float(st.master["w"][0]), 6), p["w"].dtype
        (dtype('float32'), 0.997, dtype(bfloat16))
    """
    def f32(t):
        return jax.tree.map(lambda a: a.astype(jnp.float32), t)

    def init(params):
        master = f32(params)
        return MasterState(master, tx.init(master))

    def update(grads, state, params=None, **extra):
        if params is None:
            raise ValueError("f32_master: update needs params (the low-precision parameters)")
        upd, inner = tx.update(f32(grads), state.inner, state.master, **extra)
        master = optax.apply_updates(state.master, upd)
        # p + (m - p) == m in f32 (Sterbenz), so apply_updates then rounds m to the parameter dtype
        return jax.tree.map(lambda m, p: m - p.astype(jnp.float32), master, params), MasterState(master, inner)

    return optax.GradientTransformation(init, update)


def _is_iterable_of_batches(data) -> bool:
    return not isinstance(
        data, (_data.ImageDataset, _data.CharCorpus, _data.Split, tuple, np.ndarray, jax.Array)
    ) and hasattr(data, "__iter__")


def _floats(metrics: Mapping[str, Any]) -> dict:
    return {k: float(v) for k, v in metrics.items()}


# --------------------------------------------------------------------------- many variants as one program


def _stack(trees):
    # on the host: eager jnp.stack would compile one op per leaf shape
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def variant_sharding(n: int):
    """A NamedSharding splitting the variant axis over as many devices as divide ``n`` (None: 1 device).

    Example:
        >>> variant_sharding(1) is None
        True
    """
    ndev = jax.device_count()
    k = max(d for d in range(1, min(ndev, n) + 1) if n % d == 0)
    if k <= 1:
        return None
    mesh = Mesh(np.array(jax.devices()[:k]), ("variants",))
    return NamedSharding(mesh, PartitionSpec("variants"))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3, 4))
def _train_scan(graphdef, tx, params, rest, opt_state, idx, x, y):
    """All steps of every variant: vmap over variants of a lax.scan over steps."""
    def loss_fn(p, r, xb, yb):
        m = nnx.merge(graphdef, p, r)
        logits = m(xb)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), yb).mean()
        return loss, nnx.state(m, nnx.Not(nnx.Param))

    def one(p, r, o, ids):
        def step(carry, i):
            p, r, o = carry
            (loss, r), g = jax.value_and_grad(loss_fn, has_aux=True)(p, r, x[i], y[i])
            updates, o = tx.update(g, o, p)
            return (optax.apply_updates(p, updates), r, o), loss

        (p, r, o), losses = jax.lax.scan(step, (p, r, o), ids)
        return p, r, o, losses

    return jax.vmap(one)(params, rest, opt_state, idx)


@functools.lru_cache(maxsize=4)
def _variant_adam():
    return optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)


def train_variants(models: list[nnx.Module], ds, *, steps: int, batch_size: int, learning_rates, seeds) -> np.ndarray:
    """Train same-structure models together, in place, as ONE compiled program: ``jax.vmap`` over
    the variants of a ``lax.scan`` over the steps. Each variant keeps its own learning rate (a traced
    Adam hyperparameter) and its own batch order (``qlab.data.batches`` with its seed, as
    :func:`qlab.train.train` uses). With several devices the variants are sharded over them.
    Returns the losses, shape (variants, steps).

    Example:
        >>> from qlab.data import digits_dataset
        >>> from qlab.models import MLP
        >>> ds = digits_dataset()
        >>> ms = [MLP(64, hidden=(16,), rngs=nnx.Rngs(s)) for s in range(3)]
        >>> train_variants(ms, ds, steps=20, batch_size=32, learning_rates=[1e-3, 3e-3, 1e-2], seeds=[0, 1, 2]).shape
        (3, 20)
    """
    tx = _variant_adam()
    splits = [nnx.split(m, nnx.Param, ...) for m in models]
    graphdef = splits[0][0]
    if any(s[0] != graphdef for s in splits[1:]):
        raise ValueError("train_variants: the models differ in structure (specs, shapes); batch only traced values")
    params = _stack([s[1] for s in splits])
    rest = _stack([s[2] for s in splits])
    opt_state = _init_opt(tx, params)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(np.asarray(learning_rates, np.float32))
    x, y = ds.train
    idx = np.stack([np.stack(list(_data.batches(np.arange(len(y)), batch_size, int(sd), steps=steps))) for sd in seeds])
    sharding = variant_sharding(len(models))
    if sharding is not None:
        params, rest, opt_state, idx = jax.device_put((params, rest, opt_state, idx), sharding)
    params, rest, opt_state, losses = _train_scan(graphdef, tx, params, rest, opt_state, jnp.asarray(idx),
                                                  jnp.asarray(x), jnp.asarray(y))
    params, rest = jax.device_get((params, rest))  # unstack on the host (no per-shape slicing programs)
    for i, m in enumerate(models):
        nnx.update(m, jax.tree.map(lambda a: jnp.asarray(a[i]), params), jax.tree.map(lambda a: jnp.asarray(a[i]), rest))
    return np.asarray(losses)


@functools.partial(jax.jit, static_argnums=0)
def _init_opt(tx, params):
    return jax.vmap(tx.init)(params)
