"""Methods: small functions ``run(config, seed) -> (metrics dict, per-layer DataFrame or None)``.

A method is registered by name; a study's ``method`` key picks it. Built in:

* ``float``   train the float model, report its test accuracy (the reference).
* ``ptq_rtn`` round-to-nearest fake quantization of the trained float model's weights (per rules).
* ``qat``     start from the float model, fine-tune ``qat_steps`` with fake-quantized weights
              (straight-through estimator), report the quantized model.
* ``qat_lsq`` the same with LSQ: a learned step per scale group (integer formats).
* ``ptq_gptq``, ``ptq_awq``, ``ptq_smoothquant`` (calibrated on the first ``calibration_size``
  training images) and ``ptq_hqq``: the ``qlab.ptq`` model-level drivers.

Runs that differ only in seed / learning rates (and, for ``qat`` / ``ptq_rtn``, integer bit widths of one
spec family, traced) can train together as one vmapped program (:func:`run_batched`, :func:`train_variants`;
``qlab sweep --batch``), sharded over devices.

Every method shares the float model of its (model, data, training budget, seed): it is trained once
per process and reused. Metrics: ``accuracy`` (test), ``float_accuracy``, ``accuracy_drop``,
``params``, ``quantized_params``, ``bits_per_weight`` (quantized weights, scales included),
``model_bytes`` / ``model_mib`` (packed quantized weights + float32 for the rest), ``float_mib``.

Language models (``model = "gemma3"``: Gemma 3 270M, or ``"gemma3_tiny"``, a random toy for tests) run
``float``, ``ptq_rtn``, ``ptq_gptq`` (``act_order``), ``ptq_awq`` and ``ptq_hqq`` on the model loaded once per
process (:func:`run_lm`; the embedding stays float, the rules apply to the attention / MLP projections) and
report ``perplexity`` on the first ``eval_tokens`` tokens of the ``data`` text, ``float_perplexity``,
``perplexity_increase`` and the size metrics above. GPTQ / AWQ calibrate on ``calibration_seqs`` x
``calibration_len`` tokens of the ``calibration`` text: block by block on the already-quantized
predecessors (``sequential = true``, the default; ``quant_s`` includes the captures), or with
``sequential = false`` on statistics of one float pass, captured once per process and shared by the runs.

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

    if is_lm(config):
        shapes = _lm_layer_shapes(config["model"])
    else:
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
    """The float model: trained, evaluated on the test split (language models: perplexity)."""
    if is_lm(config):
        return run_lm(config, seed, progress)
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

    if is_lm(config):
        return run_lm(config, seed, progress)
    t0 = time.perf_counter()
    ds, model, info, order = _setup(config, seed, progress)
    rules = nn_rules(order, _rules_of(config))
    qmodel = with_clip_ratio(quantize(model, rules), config)
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
            one = with_clip_ratio(quantize(model, [dataclasses.replace(rule, pattern=re.escape(path))]), config)
        drops.append(info["float_accuracy"] - evaluate.accuracy(one, *ds.test))
    layers["sensitivity_drop"] = drops
    return metrics, layers


def _run_qat(config, seed, quantizer: str, progress=False):
    from qlab.train import train

    t0 = time.perf_counter()
    ds, model, info, order = _setup(config, seed, progress)
    qmodel = with_clip_ratio(quantize(model, nn_rules(order, _rules_of(config), quantizer, quantizer)), config)
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

        if is_lm(config):
            return run_lm(config, seed, progress)
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


# --------------------------------------------------------------------------- language models (Gemma 3)

#: Language models: ``gemma3`` (Gemma 3 270M, ``qlab.models.gemma3.load_gemma3``) and ``gemma3_tiny``
#: (a random Gemma3Config.tiny() model with the toy vocabulary: for tests).
LM_MODELS = ("gemma3", "gemma3_tiny")
#: A short text for ``data`` / ``calibration`` = "tiny_text" (tests).
TINY_TEXT = ("the cat sat at the inn. the heat in the attic was a trial, and the cat ran. "
             "then the tenant came in. a cat, the cat, at that hour: there it sat, content. ") * 6
#: Projection layers (quantized by the study's rules); the tied embedding always stays float.
_LM_PROJ = (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))


#: Call sites (jnp.einsum / dot / matmul inside the attention) of a language model: always float.
_LM_CALL_SITES = r"(.*/)?(einsum|dot|matmul|dot_general)_\d+"


def is_lm(config: Mapping[str, Any]) -> bool:
    """Whether the run's model is a language model (evaluated by perplexity)."""
    return config.get("model") in LM_MODELS


_lm_cache: dict[str, tuple[Any, Any]] = {}


def lm_model(name: str):
    """``(model, tokenizer)`` of a language model, loaded once per process (the shared float model:
    methods must not change it, or must restore it)."""
    if name not in _lm_cache:
        from qlab.models import gemma3 as G

        if name == "gemma3":
            _lm_cache[name] = G.load_gemma3()
        elif name == "gemma3_tiny":
            _lm_cache[name] = (G.Gemma3(G.Gemma3Config.tiny(), rngs=nnx.Rngs(0)), G.build_tokenizer(*G.tiny_vocab(320)))
        else:
            raise ValueError(f"model = {name!r} is not a language model; allowed: {', '.join(LM_MODELS)}")
    return _lm_cache[name]


@functools.lru_cache(maxsize=16)
def _lm_layer_shapes(name: str) -> tuple[tuple[str, tuple[int, int]], ...]:
    from qlab.models.gemma3 import Gemma3Config

    c = Gemma3Config() if name == "gemma3" else Gemma3Config.tiny()
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"q_proj": (c.d_model, q), "k_proj": (c.d_model, kv), "v_proj": (c.d_model, kv), "o_proj": (q, c.d_model),
              "gate_proj": (c.d_model, c.ffn_dim), "up_proj": (c.d_model, c.ffn_dim), "down_proj": (c.ffn_dim, c.d_model)}
    return tuple((f"layers/{i}/{blk}/{n}", shapes[n]) for i in range(c.n_layers) for blk, names in _LM_PROJ for n in names)


def _lm_linears(model) -> dict[str, nnx.Linear]:
    return {f"layers/{i}/{blk}/{n}": getattr(getattr(layer, blk), n)
            for i, layer in enumerate(model.layers) for blk, names in _LM_PROJ for n in names}


def _lm_text(name: str) -> str:
    if name == "tiny_text":
        return TINY_TEXT
    from qlab.data.text import load_austen

    return load_austen("prideprejudice" if name == "austen" else name)


@functools.lru_cache(maxsize=8)
def _lm_eval_ids(model: str, data: str, eval_tokens: int):
    _, tok = lm_model(model)
    return jnp.asarray([tok.encode(_lm_text(data)).ids[:eval_tokens]], jnp.int32)


@functools.lru_cache(maxsize=8)
def _lm_float_ppl(model: str, data: str, eval_tokens: int) -> tuple[float, float]:
    from qlab.models.gemma3 import perplexity

    t = time.perf_counter()
    ppl = perplexity(lm_model(model)[0], _lm_eval_ids(model, data, eval_tokens))
    return ppl, time.perf_counter() - t


def _lm_calibration(model: str, calibration: str, seqs: int, length: int) -> np.ndarray:
    """``seqs`` windows of ``length`` tokens (BOS + text) at fixed random offsets (seed 0) of the text."""
    _, tok = lm_model(model)
    ids = np.asarray(tok.encode(_lm_text(calibration)).ids[1:], np.int32)
    if len(ids) <= length:
        raise ValueError(f"calibration text {calibration!r} has {len(ids)} tokens: too short for calibration_len = {length}")
    bos = lm_model(model)[0].config.bos_id
    starts = np.random.default_rng(0).integers(0, len(ids) - length, seqs)
    return np.stack([np.concatenate([[bos], ids[s:s + length - 1]]) for s in starts]).astype(np.int32)


_lm_stats_cache: dict[tuple, Any] = {}


def _lm_stats(model_name: str, calibration: str, seqs: int, length: int):
    """Calibration statistics of every projection's input, captured once (one float pass) per process."""
    from qlab import nn as qnn

    key = (model_name, calibration, seqs, length)
    if key not in _lm_stats_cache:
        _lm_stats_cache.clear()  # large (Hessians): keep one set
        model = lm_model(model_name)[0]
        calib = _lm_calibration(model_name, calibration, seqs, length)
        qm0 = quantize(model, (qnn.Rule("embed"), qnn.Rule("|".join(map(re.escape, _lm_linears(model))), weight="int8/ch")))
        _lm_stats_cache[key] = qnn.capture(qm0, [jnp.asarray(calib[i:i + 4]) for i in range(0, len(calib), 4)],
                                           forward=lambda m, b: m.features(b),
                                           stats=("hessian", "mean_abs", "absmax", "inputs"), max_input_rows=512)
    return _lm_stats_cache[key]


def _lm_effective_kernels(qmodel) -> dict[str, jax.Array]:
    """``{path: dequantize(q) / s}`` of every converted layer (``s``: an AWQ input scale)."""
    from qlab import nn as qnn

    out = {}
    for path, L in qnn.quantized_layers(qmodel).items():
        w = jnp.asarray(L.weight_value())
        if getattr(L, "input_scale", None) is not None:
            w = w / jnp.asarray(L.input_scale[...]).reshape(-1, 1)
        out[path] = w
    return out


def run_lm(config, seed, progress=False):
    """A method on a language model: perplexity of the first ``eval_tokens`` tokens of the ``data`` text.

    The quantized model is evaluated through the float model with its projection kernels replaced by
    the effective (fake-quantized) weights, so every spec shares one compiled evaluation."""
    from qlab import nn as qnn
    from qlab import ptq
    from qlab.models.gemma3 import perplexity

    t0 = time.perf_counter()
    model, _ = lm_model(config["model"])
    key = (config["model"], config["data"], int(config["eval_tokens"]))
    fppl, feval_s = _lm_float_ppl(*key)
    method = config["method"]
    if method == "float":
        return {"perplexity": fppl, "float_perplexity": fppl, "perplexity_increase": 0.0,
                **size_metrics(quantize(model, ())), "eval_s": feval_s}, None
    linears = _lm_linears(model)
    order = list(linears)
    # the study's rules are for the projections: the embedding and the attention call sites (q.k^T, p.v) stay float
    rules = (qnn.Rule("embed"), qnn.Rule(_LM_CALL_SITES)) + nn_rules(order, _rules_of(config))
    calib_tokens = 0
    tq = time.perf_counter()
    if method == "ptq_rtn":
        qm = ptq.rtn(model, rules)
    elif method in ("ptq_gptq", "ptq_awq"):
        ckey = (config["model"], config["calibration"], int(config["calibration_seqs"]), int(config["calibration_len"]))
        calib_tokens = ckey[2] * ckey[3]
        if config.get("sequential"):  # block by block: statistics depend on the run's own quantization
            calib = _lm_calibration(*ckey)
            cal = dict(calibration_batches=[jnp.asarray(calib[i:i + 4]) for i in range(0, len(calib), 4)],
                       forward=lambda m, b: m.features(b), sequential=True)
        else:  # one float pass, captured once per process and shared by the runs
            cal = dict(calibration_batches=None, calibration_stats=_lm_stats(*ckey))
            tq = time.perf_counter()
        if method == "ptq_gptq":
            qm = ptq.gptq(model, rules, act_order=bool(config.get("act_order")), **cal)
        else:
            qm = ptq.awq(model, rules, max_input_rows=512, **cal)
    elif method == "ptq_hqq":
        qm = ptq.hqq(model, rules)
    else:
        raise ValueError(f"method = {method!r} is not supported for language models")
    quant_s = time.perf_counter() - tq
    kernels = _lm_effective_kernels(qm)
    orig = {p: linears[p].kernel[...] for p in kernels}
    te = time.perf_counter()
    try:
        for p, w in kernels.items():
            linears[p].kernel.value = w
        ppl = perplexity(model, _lm_eval_ids(*key))
    finally:
        for p, w in orig.items():
            linears[p].kernel.value = w
    metrics = {"perplexity": ppl, "float_perplexity": fppl, "perplexity_increase": ppl - fppl,
               **size_metrics(qm), "quant_s": quant_s, "eval_s": time.perf_counter() - te,
               "calib_tokens": calib_tokens}
    layers = layer_table(qm, order)
    metrics["method_s"] = time.perf_counter() - t0
    return metrics, layers


# --------------------------------------------------------------------------- batched variants

#: Keys whose values are traced, not compiled in: runs of a :data:`BATCHABLE` method that differ
#: only in these train together as one vmapped program (see :func:`run_batched`).
BATCH_KEYS = ("seed", "learning_rate", "qat_learning_rate", "config_hash")
#: Methods that support batched execution.
BATCHABLE = {"float", "ptq_rtn", "qat", "qat_lsq"}
#: Keys that carry the quantization specs; :func:`batch_signature` compares them up to the integer bit
#: width where the method can trace it (``qat``: STE quantizers; ``qat_lsq``: LSQ weights, not activations;
#: ``ptq_rtn`` trains nothing quantized).
SPEC_KEYS = ("bits", "weight", "act", "rules_def")
#: Methods whose runs may differ in integer bit widths and still train as one program.
TRACED_BITS = {"ptq_rtn", "qat", "qat_lsq"}


def _spec_family(spec: str | None) -> str | None:
    """The spec string of ``spec``'s :func:`qlab.numerics.spec.bit_width_family` (None stays None)."""
    from qlab.numerics.spec import bit_width_family

    return None if spec is None else str(bit_width_family(spec))


def batch_signature(run: Mapping[str, Any]) -> str:
    """What runs must share to train as one vmapped program (``qlab sweep --batch``): every key but
    :data:`BATCH_KEYS` (seed, learning rates); for methods in :data:`TRACED_BITS` the resolved rules
    are compared with integer bit widths masked (``int2/ch`` and ``int8/ch`` batch; ``int4/ch`` and
    ``int4/g32`` or ``fp8_e4m3/ch`` do not).

    Example:
        >>> from qlab.experiments.config import expand
        >>> a, b, c = expand({"base": {"method": "qat"}, "sweep": {"bits": [2, 8], "granularity": ["ch"]},
        ...                   "include": [{"method": "qat", "granularity": "g16"}]})
        >>> batch_signature(a) == batch_signature(b), batch_signature(a) == batch_signature(c)
        (True, False)
    """
    import json

    cfg = {k: v for k, v in run.items() if k not in BATCH_KEYS and not k.startswith("_")}
    if run.get("method") in TRACED_BITS:
        for k in (*SPEC_KEYS, "clip_ratio"):
            cfg.pop(k, None)
        act = (lambda a: a) if run["method"] == "qat_lsq" else _spec_family  # LSQ activations: static bits
        cfg["rules"] = [(r["pattern"], _spec_family(r["weight"]), act(r["act"])) for r in _rules_of(run)]
    return json.dumps(cfg, sort_keys=True, default=str)


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
    """Run configs of one :func:`batch_signature` (differing in seed, learning rates and, for ``qat`` /
    ``qat_lsq``, integer bit widths and clip ratios): float models trained as one vmapped program, then (QAT methods) the quantized
    models fine-tuned as one vmapped program. Bit widths are traced (``qlab.nn.nnx_quant.traced_variant``):
    each run keeps its own static specs for its metrics (bits_per_weight, model size, layer table)."""
    if is_lm(runs[0]):
        return [REGISTRY[r["method"]].fn(r, int(r["seed"]), progress=progress) for r in runs]
    if len(_float_cache) + len(runs) > 8:
        _float_cache.clear()
    _ensure_floats_batched(runs)
    method = runs[0]["method"]
    if method not in ("qat", "qat_lsq") or len(runs) < 2:
        return [REGISTRY[r["method"]].fn(r, int(r["seed"]), progress=progress) for r in runs]
    quantizer = "lsq" if method == "qat_lsq" else "ste"
    t0 = time.perf_counter()
    setups = [_setup(r, int(r["seed"]), False) for r in runs]
    clip = any(float(r.get("clip_ratio", 1.0)) != 1.0 for r in runs)  # then every variant holds one (1.0 too)
    qmodels = [with_clip_ratio(quantize(m, nn_rules(order, _rules_of(r), quantizer, quantizer)), r, always=clip)
               for r, (ds, m, info, order) in zip(runs, setups)]
    views = _traced_views(qmodels)
    losses = train_variants(views, setups[0][0], steps=int(runs[0]["qat_steps"]),
                            batch_size=int(runs[0]["batch_size"]),
                            learning_rates=[float(r["qat_learning_rate"]) for r in runs],
                            seeds=[int(r["seed"]) + 1 for r in runs])
    if views is not qmodels:  # trained values back into each run's own-spec model
        from qlab.nn.quantizers import QuantOverride

        for qm, v in zip(qmodels, views):
            nnx.update(qm, nnx.state(v, nnx.Not(QuantOverride)))
    dt = (time.perf_counter() - t0) / len(runs)
    out = []
    for (ds, m, info, order), qm, ls in zip(setups, qmodels, losses):
        if hasattr(qm, "eval"):
            qm.eval()
        out.append(_finish(ds, qm, info, order, time.perf_counter() - dt,
                           {"qat_final_loss": float(ls[-1]), "qat_s": dt, "batched": len(runs)}, template=m))
    return out


def _traced_views(qmodels: list[nnx.Module]) -> list[nnx.Module]:
    """``qmodels`` as they are when their graphs are equal, else views of them on the first one's graph
    with integer bit widths as traced state (``qlab.nn.nnx_quant.traced_variant``)."""
    from qlab.nn.nnx_quant import traced_variant

    g0 = nnx.graphdef(qmodels[0])
    if all(nnx.graphdef(q) == g0 for q in qmodels[1:]):
        return qmodels
    return [traced_variant(q, qmodels[0]) for q in qmodels]


def with_clip_ratio(qmodel: nnx.Module, config: Mapping[str, Any], *, always: bool = False) -> nnx.Module:
    """``qmodel`` with the run's ``clip_ratio`` (when not 1, or ``always``) held by every STE weight
    quantizer (``WeightQuantizer.set_traced``: the weight range is multiplied by it). In place; returns it."""
    from qlab import nn as qnn

    c = float(config.get("clip_ratio") or 1.0)
    if c == 1.0 and not always:
        return qmodel
    for L in qnn.quantized_layers(qmodel).values():
        if L.weight_quant is not None and L.weight_quant.method == "ste":
            L.weight_quant.set_traced(clip_ratio=c)
    return qmodel
