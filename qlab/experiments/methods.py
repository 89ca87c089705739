"""Methods: small functions ``run(config, seed) -> (metrics dict, per-layer DataFrame or None)``.

A method is registered by name; a study's ``method`` key picks it. Built in:

* ``float``   train the float model, report its test accuracy (the reference).
* ``ptq_rtn`` round-to-nearest fake quantization of the trained float model's weights (per rules).
* ``qat``     start from the float model, fine-tune ``qat_steps`` with fake-quantized weights
              (straight-through estimator), report the quantized model.
* ``qat_lsq`` the same with LSQ: a learned step per scale group (integer formats).
* ``ptq_gptq``, ``ptq_awq``, ``ptq_smoothquant`` (calibrated on the first ``calibration_size``
  training images) and ``ptq_hqq``: the ``qlab.ptq`` model-level drivers.

Runs that differ only in seed / learning rates can train together as one vmapped program
(:func:`run_batched`, :func:`train_variants`; ``qlab sweep --batch``), sharded over devices.

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
    >>> sorted(REGISTRY)
    ['float', 'ptq_awq', 'ptq_gptq', 'ptq_hqq', 'ptq_rtn', 'ptq_smoothquant', 'qat', 'qat_lsq']
"""

from __future__ import annotations

import dataclasses
import functools
import re
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["REGISTRY", "Method", "register", "quantizable_layers", "nn_rules", "quantize", "size_metrics",
           "layer_table", "float_model", "dataset", "build_model", "copy_model"]

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


#: (image shape, classes) of each dataset, known without loading it (used to check specs early).
DATA_SHAPES = {"digits": ((8, 8, 1), 10), "fashion_mnist": ((28, 28, 1), 10)}


def build_model(config: Mapping[str, Any], seed: int) -> nnx.Module:
    """A fresh float model for the run (``mlp`` with ``hidden`` sizes, or ``cnn``)."""
    from qlab.models import CNN, MLP, CNNConfig

    image_shape, classes = DATA_SHAPES[config["data"]]
    rngs = nnx.Rngs(seed)
    if config["model"] == "mlp":
        return MLP(int(np.prod(image_shape)), hidden=tuple(config["hidden"]), out=classes, rngs=rngs)
    if config["model"] == "cnn":
        base = CNNConfig.digits() if image_shape[0] <= 8 else CNNConfig.fashion_mnist()
        return CNN(dataclasses.replace(base, input_shape=image_shape, num_classes=classes), rngs=rngs)
    raise ValueError(f"model = {config['model']!r} is unknown; allowed: mlp, cnn")


@functools.lru_cache(maxsize=16)
def _layer_shapes(model: str, hidden, data: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    cfg = {"model": model, "hidden": list(hidden) if hidden else None, "data": data}
    m = build_model(cfg, 0)
    example = np.zeros((1, *DATA_SHAPES[data][0]), np.float32)
    return tuple((p, tuple(l.kernel.value.shape)) for p, l in quantizable_layers(m, example))


def check_shapes(config: Mapping[str, Any]) -> None:
    """Raise ValueError if a rule's weight spec cannot quantize a layer it matches (e.g. a group
    size that does not divide the layer's input features). Cheap: no data, a throwaway model.

    Example:
        >>> check_shapes({"model": "mlp", "hidden": [100], "data": "digits",
        ...               "_rules": [{"pattern": ".*", "weight": "int4/g32", "act": None}]})
        Traceback (most recent call last):
        ...
        ValueError: weight spec 'int4/g32' does not fit layer 'head' (kernel 100x10): per_group.size: 32 does not divide ...
    """
    from qlab.numerics import bits_per_weight, parse_spec

    shapes = _layer_shapes(config["model"], json_key(config.get("hidden")), config["data"])
    paths = [p for p, _ in shapes]
    for rule in nn_rules(paths, _rules_of(config)):
        for path, shape in shapes:
            if not rule.matches(path):
                continue
            if rule.weight is not None:
                spec = parse_spec(rule.weight)
                spec = dataclasses.replace(spec, granularity=spec.granularity.resolve(len(shape) - 1, len(shape) - 2))
                try:
                    bits_per_weight(spec, shape)
                except ValueError as e:
                    raise ValueError(f"weight spec {str(rule.weight)!r} does not fit layer {path!r} "
                                     f"(kernel {'x'.join(map(str, shape))}): {e}") from None
        paths = [p for p in paths if not rule.matches(p)]
        shapes = tuple((p, s) for p, s in shapes if p in paths)


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
        model = build_model(config, seed)
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


def nn_rules(paths: list[str], rules: list[Mapping[str, Any]], weight_quantizer: str = "ste",
             act_quantizer: str = "ste"):
    """A study's rule list (``[{pattern, weight, act}]``) as :class:`qlab.nn.Rule` objects, with
    ``@first`` / ``@last`` replaced by the first / last layer path (in call order).

    Example:
        >>> nn_rules(["layers/0", "head"], [{"pattern": "@last", "weight": None}, {"pattern": ".*", "weight": "int4/ch"}])
        (Rule('head'), Rule('.*', weight='int4/ch'))
    """
    from qlab import nn as qnn

    out = []
    for r in rules:
        pat = r["pattern"]
        if paths:
            pat = pat.replace("@first", re.escape(paths[0])).replace("@last", re.escape(paths[-1]))
        w, a = r.get("weight"), r.get("act")
        out.append(qnn.Rule(pat, weight=w, act=a,
                            weight_quantizer=weight_quantizer if w else "ste",
                            act_quantizer=act_quantizer if a else "ste"))
    return tuple(out)


def quantize(model: nnx.Module, rules, **kw) -> nnx.Module:
    """``qlab.nn.quantize_model`` with rules that may match nothing (a rule set shared by models)."""
    import warnings

    from qlab import nn as qnn

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return qnn.quantize_model(model, rules, allow_unmatched=True, **kw)


def size_metrics(qmodel: nnx.Module, report=None) -> dict:
    """Parameter counts and packed size of a ``qlab.nn`` model (or a float model): params,
    quantized_params, bits_per_weight (over quantized weights, scales included), model_bytes,
    model_mib, float_mib, compression.

    Example:
        >>> from qlab.models import MLP
        >>> m = quantize(MLP(64, hidden=(32,), rngs=nnx.Rngs(0)), nn_rules([], [{"pattern": "layers/0", "weight": "int8/ch"}]))
        >>> size_metrics(m)["quantized_params"]
        2048
    """
    from qlab import nn as qnn

    size = qnn.model_size(qmodel)
    rep = qnn.layer_report(qmodel, sqnr=False, warn=False) if report is None else report
    q = rep[rep["weight_spec"].notna() & (rep["params"] > 0)]
    qparams = int(q["params"].sum())
    qbytes = int(q["packed_bytes"].sum())
    return {
        "params": size["params"],
        "quantized_params": qparams,
        "bits_per_weight": (8 * qbytes / qparams) if qparams else 32.0,
        "model_bytes": size["packed_bytes"],
        "model_mib": size["packed_bytes"] / MiB,
        "float_mib": size["float_bytes"] / MiB,
        "compression": size["float_bytes"] / size["packed_bytes"],
    }


def layer_table(qmodel: nnx.Module, order: list[str]):
    """``qlab.nn.layer_report`` (weight layers) in call order, with an ``order`` column; the SQNR
    column is renamed ``weight_sqnr_db``."""
    from qlab import nn as qnn

    rep = qnn.layer_report(qmodel, warn=False)
    rep = rep[~rep["kind"].astype(str).str.startswith("call:")].copy()
    rank = {p: i for i, p in enumerate(order)}
    rep.insert(0, "order", rep["layer"].map(lambda p: rank.get(p, len(rank))))
    rep["weight_spec"] = rep["weight_spec"].fillna("float")
    rep["act_spec"] = rep["act_spec"].fillna("none")
    rep = rep.rename(columns={"sqnr_db": "weight_sqnr_db"})
    return rep.sort_values("order").reset_index(drop=True)


def effective_model(qmodel: nnx.Module, template: nnx.Module) -> nnx.Module | None:
    """A float model (``template``'s structure) holding ``qmodel``'s effective weights (fake-quantized
    kernels, trained biases), or None when some layer quantizes activations. Models of one structure
    share one compiled evaluation, whatever their specs, so evaluating many specs is cheap.

    Example:
        >>> from qlab.models import MLP
        >>> m = MLP(4, hidden=(8,), rngs=nnx.Rngs(0))
        >>> e = effective_model(quantize(m, nn_rules([], [{"pattern": "head", "weight": "int2/ch"}])), m)
        >>> len(np.unique(np.asarray(e.head.kernel[...])[:, 0])) <= 4
        True
    """
    from qlab import nn as qnn

    qls, fls = qnn.quantized_layers(qmodel), qnn.float_layers(qmodel)
    if any(L.act_quant is not None for L in qls.values()):
        return None
    out = copy_model(template)
    for path, m in quantizable_layers(out):
        if path in qls:
            L = qls[path]
            w = jnp.asarray(L.weight_value())
            if getattr(L, "input_scale", None) is not None:  # (x / s) @ W  ==  x @ (W / s[:, None])
                if w.ndim != 2:
                    return None
                w = w / jnp.asarray(L.input_scale[...]).reshape(-1, 1)
            m.kernel.value = w
            src = L.layer
        elif path in fls:
            src = fls[path]
            m.kernel.value = src.kernel[...]
        else:
            return None
        if getattr(m, "bias", None) is not None and getattr(src, "bias", None) is not None:
            m.bias.value = src.bias[...]
    return out


def _check_quant(config):
    check_shapes(config)


def _check_lsq(config):
    from qlab.numerics import IntFormat, parse_spec

    check_shapes(config)
    for r in _rules_of(config):
        for k in ("weight", "act"):
            if r[k] and not isinstance(parse_spec(r[k]).fmt, IntFormat):
                raise ValueError(f"method 'qat_lsq' learns integer step sizes; {k} spec {r[k]!r} is not an "
                                 "integer format (allowed: int2..int8, uint*)")


def _rules_of(config):
    from qlab.experiments.config import resolve_rules

    return config.get("_rules") or resolve_rules(config)


def _setup(config, seed, progress):
    ds = dataset(config)
    model, info = float_model(config, seed, progress=progress)
    order = [p for p, _ in quantizable_layers(model, ds.test.images[:1])]
    return ds, model, info, order


def _finish(ds, qmodel, info, order, t0, extra=None, template=None):
    from qlab import evaluate

    eff = effective_model(qmodel, template) if template is not None else None
    acc = evaluate.accuracy(qmodel if eff is None else eff, *ds.test)
    layers = layer_table(qmodel, order)
    metrics = {
        "accuracy": acc,
        "float_accuracy": info["float_accuracy"],
        "accuracy_drop": info["float_accuracy"] - acc,
        **size_metrics(qmodel),
        "float_train_s": info["train_s"],
        **({"float_batched": info["batched"]} if "batched" in info else {}),
        **(extra or {}),
    }
    metrics["method_s"] = time.perf_counter() - t0
    return metrics, layers


@register("float")
def run_float(config, seed, progress=False):
    """The float model: trained, evaluated on the test split."""
    model, info = float_model(config, seed, progress=progress)
    return {
        "accuracy": info["float_accuracy"],
        "float_accuracy": info["float_accuracy"],
        "accuracy_drop": 0.0,
        **size_metrics(quantize(model, ())),
        "float_train_s": info["train_s"],
        **({"batched": info["batched"]} if "batched" in info else {}),
    }, None


@register("ptq_rtn", check=_check_quant)
def run_ptq_rtn(config, seed, progress=False):
    """Round-to-nearest post-training quantization of the float model (weights; activations if ``act``)."""
    from qlab import evaluate

    t0 = time.perf_counter()
    ds, model, info, order = _setup(config, seed, progress)
    rules = nn_rules(order, _rules_of(config))
    qmodel = quantize(model, rules)
    metrics, layers = _finish(ds, qmodel, info, order, t0, template=model)
    # sensitivity: accuracy drop when only this layer is quantized (by its rule)
    eff = effective_model(qmodel, model)
    drops = []
    for path in layers["layer"]:
        rule = next((r for r in rules if re.fullmatch(r.pattern, path)), None)
        if rule is None or rule.is_float:
            drops.append(0.0)
            continue
        if eff is not None:  # float model with just this layer's kernel quantized
            one = copy_model(model)
            dict(quantizable_layers(one))[path].kernel.value = dict(quantizable_layers(eff))[path].kernel[...]
        else:
            one = quantize(model, [dataclasses.replace(rule, pattern=re.escape(path))])
        drops.append(info["float_accuracy"] - evaluate.accuracy(one, *ds.test))
    layers["sensitivity_drop"] = drops
    return metrics, layers


def _run_qat(config, seed, quantizer: str, progress=False):
    from qlab.train import train

    t0 = time.perf_counter()
    ds, model, info, order = _setup(config, seed, progress)
    qmodel = quantize(model, nn_rules(order, _rules_of(config), quantizer, quantizer))
    hist = train(qmodel, ds, steps=int(config["qat_steps"]), batch_size=int(config["batch_size"]),
                 learning_rate=float(config["qat_learning_rate"]), seed=seed + 1, progress=progress)
    if hasattr(qmodel, "eval"):
        qmodel.eval()
    return _finish(ds, qmodel, info, order, t0, {"qat_final_loss": hist.final_loss, "qat_s": hist.seconds},
                   template=model)


@register("qat", check=_check_quant)
def run_qat(config, seed, progress=False):
    """Quantization-aware fine-tuning (STE) from the float model, ``qat_steps`` steps."""
    return _run_qat(config, seed, "ste", progress=progress)


@register("qat_lsq", check=_check_lsq)
def run_qat_lsq(config, seed, progress=False):
    """Quantization-aware fine-tuning with LSQ learned step sizes (integer formats)."""
    return _run_qat(config, seed, "lsq", progress=progress)


# --------------------------------------------------------------------------- PTQ algorithms (qlab.ptq)

#: method name -> (qlab.ptq driver, needs calibration data)
PTQ_ALGORITHMS = {"ptq_gptq": ("gptq", True), "ptq_awq": ("awq", True), "ptq_hqq": ("hqq", False),
                  "ptq_smoothquant": ("smoothquant", True)}


def _check_ptq(config):
    from qlab.numerics import parse_spec

    check_shapes(config)
    if config["method"] == "ptq_hqq":
        for r in _rules_of(config):
            if r["weight"] and parse_spec(r["weight"]).symmetric:
                raise ValueError(f"method 'ptq_hqq' needs asymmetric integer weight specs; weight {r['weight']!r} "
                                 "is symmetric: set symmetric = false (e.g. int4/g32/asym)")


def _make_ptq(name: str, algo: str, calibrated: bool):
    def run(config, seed, progress=False):
        from qlab import ptq

        t0 = time.perf_counter()
        ds, model, info, order = _setup(config, seed, progress)
        rules = nn_rules(order, _rules_of(config))
        fn = getattr(ptq, algo)
        if calibrated:
            n = int(config.get("calibration_size") or 512)
            x = ds.train.images[:n]
            qmodel = fn(model, rules, [x[i:i + 128] for i in range(0, len(x), 128)])
        else:
            qmodel = fn(model, rules)
        return _finish(ds, qmodel, info, order, t0, template=model)

    run.__name__ = f"run_{name}"
    run.__doc__ = f"qlab.ptq.{algo} of the float model" + (" (calibration: the first calibration_size training images)."
                                                        if calibrated else " (no calibration data).")
    return run


for _name, (_algo, _cal) in PTQ_ALGORITHMS.items():
    register(_name, check=_check_ptq)(_make_ptq(_name, _algo, _cal))


# --------------------------------------------------------------------------- batched variants

#: Keys whose values are traced, not compiled in: runs of a :data:`BATCHABLE` method that differ
#: only in these train together as one vmapped program (see :func:`run_batched`).
BATCH_KEYS = ("seed", "learning_rate", "qat_learning_rate", "config_hash")
#: Methods that support batched execution.
BATCHABLE = {"float", "ptq_rtn", "qat", "qat_lsq"}


def _stack(trees):
    # on the host: eager jnp.stack would compile one op per leaf shape
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _variant_sharding(n: int):
    """A NamedSharding splitting the variant axis over as many devices as divide ``n`` (None: 1 device)."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    ndev = jax.device_count()
    k = max(d for d in range(1, min(ndev, n) + 1) if n % d == 0)
    if k <= 1:
        return None
    mesh = Mesh(np.array(jax.devices()[:k]), ("variants",))
    return NamedSharding(mesh, PartitionSpec("variants"))


@functools.partial(jax.jit, static_argnums=(0, 1), donate_argnums=(2, 3, 4))
def _train_scan(graphdef, tx, params, rest, opt_state, idx, x, y):
    """All steps of every variant: vmap over variants of a lax.scan over steps."""
    import optax

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
def _tx():
    import optax

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
    from qlab.data import batches

    tx = _tx()
    splits = [nnx.split(m, nnx.Param, ...) for m in models]
    graphdef = splits[0][0]
    if any(s[0] != graphdef for s in splits[1:]):
        raise ValueError("train_variants: the models differ in structure (specs, shapes); batch only traced values")
    params = _stack([s[1] for s in splits])
    rest = _stack([s[2] for s in splits])
    opt_state = _init_opt(tx, params)
    opt_state.hyperparams["learning_rate"] = jnp.asarray(np.asarray(learning_rates, np.float32))
    x, y = ds.train
    idx = np.stack([np.stack(list(batches(np.arange(len(y)), batch_size, int(sd), steps=steps))) for sd in seeds])
    sharding = _variant_sharding(len(models))
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


def _float_key(config, seed):
    return tuple(json_key(config.get(k)) for k in _FLOAT_KEYS) + (seed,)


def _ensure_floats_batched(runs: list[dict]):
    """Train the float models the runs need and the cache lacks, all together (same structure)."""
    from qlab import evaluate

    todo, seen = [], set()
    for r in runs:
        k = _float_key(r, int(r["seed"]))
        if k not in _float_cache and k not in seen:
            seen.add(k)
            todo.append(r)
    if len(todo) < 2:
        return
    ds = dataset(todo[0])
    models = [build_model(r, int(r["seed"])) for r in todo]
    t0 = time.perf_counter()
    train_variants(models, ds, steps=int(todo[0]["steps"]), batch_size=int(todo[0]["batch_size"]),
                   learning_rates=[float(r["learning_rate"]) for r in todo], seeds=[int(r["seed"]) for r in todo])
    dt = (time.perf_counter() - t0) / len(todo)
    for r, m in zip(todo, models):
        _float_cache[_float_key(r, int(r["seed"]))] = (m, {"float_accuracy": evaluate.accuracy(m, *ds.test),
                                                           "train_s": dt, "batched": len(todo)})


def run_batched(runs: list[dict], progress: bool = False) -> list[tuple[dict, Any]]:
    """Run configs that differ only in :data:`BATCH_KEYS`: float models trained as one vmapped
    program, then (QAT methods) the quantized models fine-tuned as one vmapped program."""
    if len(_float_cache) + len(runs) > 8:
        _float_cache.clear()
    _ensure_floats_batched(runs)
    method = runs[0]["method"]
    if method not in ("qat", "qat_lsq") or len(runs) < 2:
        return [REGISTRY[r["method"]].fn(r, int(r["seed"]), progress=progress) for r in runs]
    quantizer = "lsq" if method == "qat_lsq" else "ste"
    t0 = time.perf_counter()
    setups = [_setup(r, int(r["seed"]), False) for r in runs]
    qmodels = [quantize(m, nn_rules(order, _rules_of(r), quantizer, quantizer))
               for r, (ds, m, info, order) in zip(runs, setups)]
    losses = train_variants(qmodels, setups[0][0], steps=int(runs[0]["qat_steps"]),
                            batch_size=int(runs[0]["batch_size"]),
                            learning_rates=[float(r["qat_learning_rate"]) for r in runs],
                            seeds=[int(r["seed"]) + 1 for r in runs])
    dt = (time.perf_counter() - t0) / len(runs)
    out = []
    for (ds, m, info, order), qm, ls in zip(setups, qmodels, losses):
        if hasattr(qm, "eval"):
            qm.eval()
        out.append(_finish(ds, qm, info, order, time.perf_counter() - dt,
                           {"qat_final_loss": float(ls[-1]), "qat_s": dt, "batched": len(runs)}, template=m))
    return out
