"""Methods: small functions ``run(config, seed) -> (metrics dict, per-layer DataFrame or None)``.

A method is registered by name; a study's ``method`` key picks it. Built in:

* ``float``   train the float model, report its test accuracy (the reference).
* ``ptq_rtn`` round-to-nearest fake quantization of the trained float model's weights (per rules).
* ``qat``     start from the float model, fine-tune ``qat_steps`` with fake-quantized weights
              (straight-through estimator), report the quantized model.
* ``qat_lsq`` the same with LSQ: a learned step per scale group (integer formats).

Every method shares the float model of its (model, data, training budget, seed): it is trained once
per process and reused. Metrics: ``accuracy`` (test), ``float_accuracy``, ``accuracy_drop``,
``params``, ``quantized_params``, ``bits_per_weight`` (quantized weights, scales included),
``model_bytes`` / ``model_mib`` (packed quantized weights + float32 for the rest), ``float_mib``.

Add your own::

    from qlab.experiments import register

    @register("my_method")
    def my_method(config, seed):
        ...
        return {"accuracy": acc, "model_mib": mib}, None

Example:
    >>> sorted(REGISTRY)[:3]
    ['float', 'ptq_rtn', 'qat']
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["REGISTRY", "Method", "register", "quantizable_layers", "assign_rules", "fake_quant_model",
           "size_metrics", "float_model", "dataset", "build_model"]

MiB = 2**20


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method: ``fn(config, seed) -> (metrics, layers_df | None)``; ``check(config)``
    raises ValueError for configs it cannot run (called before anything runs)."""

    name: str
    fn: Callable[[Mapping[str, Any], int], tuple[dict, Any]]
    check: Callable[[Mapping[str, Any]], None] | None = None
    doc: str = ""


REGISTRY: dict[str, Method] = {}


def register(name: str, check: Callable | None = None):
    """Decorator: register ``fn(config, seed) -> metrics | (metrics, layers_df)`` as method ``name``.

    Example:
        >>> @register("noop_example")
        ... def noop(config, seed):
        ...     return {"accuracy": 1.0}
        >>> "noop_example" in REGISTRY
        True
        >>> del REGISTRY["noop_example"]
    """

    def deco(fn):
        REGISTRY[name] = Method(name, fn, check, (fn.__doc__ or "").strip().split("\n")[0])
        return fn

    return deco


# --------------------------------------------------------------------------- data and models


@functools.lru_cache(maxsize=4)
def _dataset(name: str, train_size: int):
    from qlab.data import ImageDataset, Split, image_dataset

    ds = image_dataset(name, seed=0)
    if train_size and train_size < len(ds.train):
        ds = ImageDataset(ds.name, Split(ds.train.images[:train_size], ds.train.labels[:train_size]),
                          ds.val, ds.test, ds.num_classes)
    return ds


def dataset(config: Mapping[str, Any]):
    """The run's :class:`qlab.data.ImageDataset` (split seed 0; ``train_size`` > 0 keeps that many)."""
    return _dataset(config["data"], int(config.get("train_size") or 0))


def build_model(config: Mapping[str, Any], ds, seed: int) -> nnx.Module:
    """A fresh float model for the run (``mlp`` with ``hidden`` sizes, or ``cnn``)."""
    from qlab.models import CNN, MLP, CNNConfig

    rngs = nnx.Rngs(seed)
    if config["model"] == "mlp":
        return MLP(int(np.prod(ds.image_shape)), hidden=tuple(config["hidden"]), out=ds.num_classes, rngs=rngs)
    if config["model"] == "cnn":
        base = CNNConfig.digits() if ds.image_shape[0] <= 8 else CNNConfig.fashion_mnist()
        return CNN(dataclasses.replace(base, input_shape=ds.image_shape, num_classes=ds.num_classes), rngs=rngs)
    raise ValueError(f"model = {config['model']!r} is unknown; allowed: mlp, cnn")


_FLOAT_KEYS = ("model", "hidden", "data", "train_size", "steps", "batch_size", "learning_rate")
_float_cache: dict[tuple, tuple[Any, dict]] = {}


def float_model(config: Mapping[str, Any], seed: int, progress: bool = False):
    """The trained float model for the run's (model, data, budget, seed): ``(model, info)`` where
    ``info = {float_accuracy, train_s}``. Trained once per process; a fresh clone is returned."""
    from qlab import evaluate
    from qlab.train import train

    key = tuple(json_key(config.get(k)) for k in _FLOAT_KEYS) + (seed,)
    if key not in _float_cache:
        ds = dataset(config)
        model = build_model(config, ds, seed)
        t0 = time.perf_counter()
        train(model, ds, steps=int(config["steps"]), batch_size=int(config["batch_size"]),
              learning_rate=float(config["learning_rate"]), seed=seed, progress=progress)
        info = {"float_accuracy": evaluate.accuracy(model, *ds.test), "train_s": time.perf_counter() - t0}
        if len(_float_cache) > 8:
            _float_cache.clear()
        _float_cache[key] = (model, info)
    model, info = _float_cache[key]
    return copy_model(model), dict(info)


def copy_model(model: nnx.Module) -> nnx.Module:
    """A deep copy (new arrays: safe when training donates the copy's buffers)."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.tree.map(lambda x: jnp.array(x, copy=True), state))


def json_key(v):
    return tuple(v) if isinstance(v, list) else v


# --------------------------------------------------------------------------- layers and rules


def _path_str(path) -> str:
    return "/".join(str(p) for p in path)


def quantizable_layers(model: nnx.Module, example=None) -> list[tuple[str, nnx.Module]]:
    """``[(path, module)]`` of the model's ``nnx.Linear`` / ``nnx.Conv`` layers in call order when
    ``example`` (an input batch) is given, else in graph order. Paths are ``"layers/0"``, ``"head"``.

    Example:
        >>> from qlab.models import MLP
        >>> [p for p, _ in quantizable_layers(MLP(4, hidden=(8,), rngs=nnx.Rngs(0)), np.zeros((1, 4)))]
        ['layers/0', 'head']
    """
    layers = [(_path_str(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, (nnx.Linear, nnx.Conv))]
    if example is None:
        return layers
    order: list[int] = []
    originals = {cls: cls.__call__ for cls in (nnx.Linear, nnx.Conv)}

    def wrap(cls):
        f = originals[cls]

        def call(self, *a, **k):
            order.append(id(self))
            return f(self, *a, **k)

        return call

    try:
        for cls in originals:
            cls.__call__ = wrap(cls)
        jax.eval_shape(lambda x: model(x), jnp.asarray(example))
    finally:
        for cls, f in originals.items():
            cls.__call__ = f
    rank = {}
    for i, ident in enumerate(order):
        rank.setdefault(ident, i)
    return sorted(layers, key=lambda pm: rank.get(id(pm[1]), len(order)))


def _resolve_spec(spec, ndim: int):
    from qlab.numerics import parse_spec

    spec = parse_spec(spec)
    return dataclasses.replace(spec, granularity=spec.granularity.resolve(ndim - 1, ndim - 2))


def assign_rules(paths: list[str], rules: list[Mapping[str, Any]]) -> dict[str, dict]:
    """First matching rule per layer path (``re.fullmatch``; ``@first``/``@last`` = first/last path).
    Returns ``{path: {"weight": spec or None, "act": spec or None, "rule": i}}``; paths no rule
    matches stay float.

    Example:
        >>> assign_rules(["layers/0", "head"], [{"pattern": "@last", "weight": None}, {"pattern": ".*", "weight": "int4/ch"}])
        {'layers/0': {'weight': 'int4/ch', 'act': None, 'rule': 1}, 'head': {'weight': None, 'act': None, 'rule': 0}}
    """
    out = {}
    for path in paths:
        for i, r in enumerate(rules):
            pat = r["pattern"]
            if paths:
                pat = pat.replace("@first", re.escape(paths[0])).replace("@last", re.escape(paths[-1]))
            if re.fullmatch(pat, path):
                out[path] = {"weight": r.get("weight"), "act": r.get("act"), "rule": i}
                break
    return out


def _quantize_kernel(kernel, spec):
    from qlab.numerics import fake_quant

    return fake_quant(kernel, _resolve_spec(spec, kernel.ndim))


def fake_quant_model(model: nnx.Module, assignment: Mapping[str, dict]) -> nnx.Module:
    """A clone of ``model`` whose assigned kernels are replaced by their fake-quantized values (RTN).

    Example:
        >>> from qlab.models import MLP
        >>> m = MLP(4, hidden=(8,), rngs=nnx.Rngs(0))
        >>> q = fake_quant_model(m, {"head": {"weight": "int2/ch"}})
        >>> len(np.unique(np.asarray(q.head.kernel[...])[:, 0])) <= 4
        True
    """
    q = copy_model(model)
    for path, m in quantizable_layers(q):
        spec = assignment.get(path, {}).get("weight")
        if spec:
            m.kernel.value = _quantize_kernel(m.kernel.value, spec)
    return q


def size_metrics(model: nnx.Module, assignment: Mapping[str, dict]) -> dict:
    """Parameter counts and packed size of ``model`` quantized by ``assignment`` (weights only;
    everything unquantized counted as float32).

    Example:
        >>> from qlab.models import MLP
        >>> m = MLP(64, hidden=(32,), rngs=nnx.Rngs(0))
        >>> size_metrics(m, {"layers/0": {"weight": "int8/ch"}})["quantized_params"]
        2048
    """
    from qlab.numerics import packed_nbytes

    params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(model, nnx.Param)))
    qparams, qbytes = 0, 0
    for path, m in quantizable_layers(model):
        spec = assignment.get(path, {}).get("weight")
        if spec:
            shape = tuple(m.kernel.value.shape)
            qparams += math.prod(shape)
            qbytes += packed_nbytes(_resolve_spec(spec, len(shape)), shape)
    float_bytes = 4 * params
    model_bytes = qbytes + 4 * (params - qparams)
    return {
        "params": params,
        "quantized_params": qparams,
        "bits_per_weight": (8 * qbytes / qparams) if qparams else 32.0,
        "model_bytes": model_bytes,
        "model_mib": model_bytes / MiB,
        "float_mib": float_bytes / MiB,
        "compression": float_bytes / model_bytes,
    }


def layer_table(float_m: nnx.Module, quant_m: nnx.Module, assignment: Mapping[str, dict], example=None):
    """Per-layer DataFrame: layer, kind, shape, params, weight spec, bits/weight, packed bytes,
    weight SQNR (dB) and relative error of ``quant_m``'s effective weights against ``float_m``'s."""
    import pandas as pd

    from qlab.numerics import bits_per_weight, packed_nbytes, sqnr_db

    qmods = dict(quantizable_layers(quant_m))
    rows = []
    for i, (path, m) in enumerate(quantizable_layers(float_m, example)):
        w = np.asarray(m.kernel.value)
        a = assignment.get(path, {})
        spec = a.get("weight")
        wq = np.asarray(qmods[path].kernel.value)
        shape = tuple(w.shape)
        err = float(np.sum((wq - w) ** 2) / max(np.sum(w**2), 1e-30))
        rows.append({
            "order": i,
            "layer": path,
            "kind": type(m).__name__,
            "shape": "x".join(map(str, shape)),
            "params": int(w.size),
            "weight_spec": spec or "float",
            "act_spec": a.get("act") or "none",
            "bits_per_weight": bits_per_weight(_resolve_spec(spec, w.ndim), shape) if spec else 32.0,
            "packed_bytes": packed_nbytes(_resolve_spec(spec, w.ndim), shape) if spec else 4 * w.size,
            "weight_sqnr_db": float(sqnr_db(w, wq)) if spec else float("inf"),
            "weight_rel_error": err,
        })
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- QAT (local fake-quant)


class LSQStep(nnx.Param):
    """A learned LSQ step size (trained with the weights; filter with ``nnx.OfType(LSQStep)``)."""


def _lsq_view(kernel, spec):
    from qlab.numerics.granularity import to_view

    spec = _resolve_spec(spec, kernel.ndim)
    xv, axes = to_view(kernel, spec.granularity)
    return spec, xv, axes


def _lsq_init(kernel, spec):
    # LSQ's rule (as qlab.numerics.lsq_init_step), per scale group of the spec's granularity
    spec, xv, axes = _lsq_view(kernel, spec)
    qp = max(spec.fmt.qmax, 1)
    m = jnp.mean(jnp.abs(xv), axis=axes, keepdims=True)
    return jnp.maximum(2 * m / math.sqrt(qp), 1e-8)


def _lsq_kernel(kernel, step, spec):
    from qlab.numerics import lsq_fake_quant
    from qlab.numerics.granularity import from_view

    rspec, xv, axes = _lsq_view(kernel, spec)
    y = lsq_fake_quant(xv, step, rspec.fmt)
    return from_view(y, rspec.granularity, kernel.shape)


def _qat_forward_model(model, assignment, lsq: bool):
    """A merged copy of ``model`` whose kernels are fake-quantized (STE or LSQ) from its params; used
    inside the loss so gradients flow to the float weights (and LSQ steps)."""
    out = nnx.merge(*nnx.split(model))
    for path, m in quantizable_layers(out):
        spec = assignment.get(path, {}).get("weight")
        if not spec:
            continue
        if lsq:
            m.kernel = nnx.Param(_lsq_kernel(m.kernel.value, m.lsq_step.value, spec))
        else:
            m.kernel = nnx.Param(_quantize_kernel(m.kernel.value, spec))
    return out


def _make_qat_loss(assignment: Mapping[str, dict], lsq: bool):
    from qlab.train import xent_loss

    frozen = tuple(sorted((p, a.get("weight")) for p, a in assignment.items()))

    def qat_loss(model, batch):
        return xent_loss(_qat_forward_model(model, dict((p, {"weight": w}) for p, w in frozen), lsq), batch)

    return qat_loss


def _check_quant(config):
    if config.get("act") not in (None, "none"):
        raise ValueError(f"act = {config['act']!r}: activation quantization is not supported by method "
                         f"{config['method']!r} yet; allowed: 'none'")


def _check_lsq(config):
    _check_quant(config)
    from qlab.experiments.config import resolve_rules
    from qlab.numerics import IntFormat, parse_spec

    for r in config.get("_rules") or resolve_rules(config):
        if r["weight"] and not isinstance(parse_spec(r["weight"]).fmt, IntFormat):
            raise ValueError(f"method 'qat_lsq' learns integer step sizes; weight {r['weight']!r} is not an "
                             "integer format (allowed: int2..int8, uint*)")


def _rules_of(config):
    from qlab.experiments.config import resolve_rules

    return config.get("_rules") or resolve_rules(config)


def _setup(config, seed, progress):
    ds = dataset(config)
    model, info = float_model(config, seed, progress=progress)
    example = ds.test.images[:1]
    paths = [p for p, _ in quantizable_layers(model, example)]
    assignment = assign_rules(paths, _rules_of(config))
    return ds, model, info, example, assignment


def _finish(ds, float_m, quant_m, assignment, info, example, t0, extra=None):
    from qlab import evaluate

    acc = evaluate.accuracy(quant_m, *ds.test)
    metrics = {
        "accuracy": acc,
        "float_accuracy": info["float_accuracy"],
        "accuracy_drop": info["float_accuracy"] - acc,
        **size_metrics(float_m, assignment),
        "float_train_s": info["train_s"],
        **(extra or {}),
    }
    metrics["method_s"] = time.perf_counter() - t0
    return metrics, layer_table(float_m, quant_m, assignment, example)


@register("float")
def run_float(config, seed, progress=False):
    """The float model: trained, evaluated on the test split."""
    ds = dataset(config)
    model, info = float_model(config, seed, progress=progress)
    return {
        "accuracy": info["float_accuracy"],
        "float_accuracy": info["float_accuracy"],
        "accuracy_drop": 0.0,
        **size_metrics(model, {}),
        "float_train_s": info["train_s"],
    }, None


@register("ptq_rtn", check=_check_quant)
def run_ptq_rtn(config, seed, progress=False):
    """Round-to-nearest post-training quantization of the float model's weights."""
    from qlab import evaluate

    t0 = time.perf_counter()
    ds, model, info, example, assignment = _setup(config, seed, progress)
    qmodel = fake_quant_model(model, assignment)
    metrics, layers = _finish(ds, model, qmodel, assignment, info, example, t0)
    # sensitivity: accuracy drop when only this layer is quantized
    drops = []
    for path in layers["layer"]:
        if path in assignment and assignment[path].get("weight"):
            one = fake_quant_model(model, {path: assignment[path]})
            drops.append(info["float_accuracy"] - evaluate.accuracy(one, *ds.test))
        else:
            drops.append(0.0)
    layers["sensitivity_drop"] = drops
    return metrics, layers


def _run_qat(config, seed, lsq: bool, progress=False):
    from qlab.train import train

    t0 = time.perf_counter()
    ds, model, info, example, assignment = _setup(config, seed, progress)
    float_m = copy_model(model)
    if lsq:
        for path, m in quantizable_layers(model):
            spec = assignment.get(path, {}).get("weight")
            if spec:
                m.lsq_step = LSQStep(_lsq_init(m.kernel.value, spec))
    hist = train(model, ds, steps=int(config["qat_steps"]), batch_size=int(config["batch_size"]),
                 learning_rate=float(config["qat_learning_rate"]), seed=seed + 1,
                 loss=_make_qat_loss(assignment, lsq), progress=progress)
    qmodel = _qat_forward_model(model, assignment, lsq)
    for _, m in quantizable_layers(qmodel):
        if hasattr(m, "lsq_step"):
            del m.lsq_step
    return _finish(ds, float_m, qmodel, assignment, info, example, t0,
                   {"qat_final_loss": hist.final_loss, "qat_s": hist.seconds})


@register("qat", check=_check_quant)
def run_qat(config, seed, progress=False):
    """Quantization-aware fine-tuning (STE) from the float model, ``qat_steps`` steps."""
    return _run_qat(config, seed, lsq=False, progress=progress)


@register("qat_lsq", check=_check_lsq)
def run_qat_lsq(config, seed, progress=False):
    """Quantization-aware fine-tuning with LSQ learned step sizes (integer formats)."""
    return _run_qat(config, seed, lsq=True, progress=progress)


# --------------------------------------------------------------------------- batched variants

#: Keys whose values are traced (not part of the compiled program): runs differing only in these
#: train together as one vmapped program (see :func:`run_batched`).
BATCH_KEYS = ("seed", "learning_rate", "qat_learning_rate", "config_hash")
#: Methods that support batched execution.
BATCHABLE: set[str] = set()


def run_batched(runs: list[dict], progress: bool = False) -> list[tuple[dict, Any]]:
    """Run several configs that differ only in :data:`BATCH_KEYS` as one vmapped program."""
    return [REGISTRY[r["method"]].fn(r, int(r["seed"]), progress=progress) for r in runs]
