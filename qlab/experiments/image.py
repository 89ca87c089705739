"""The image family: MLP / CNN classifiers on digits or Fashion-MNIST, and their methods.

* ``float``   train the float model, report its test accuracy (the reference).
* ``ptq_rtn`` round-to-nearest fake quantization of the trained float model (weights; activations if ``act``),
              plus each layer's sensitivity (accuracy drop with only that layer quantized).
* ``qat``     start from the float model, fine-tune ``qat_steps`` with fake-quantized weights (STE).
* ``qat_lsq`` the same with LSQ: a learned step per scale group (integer formats); ``lsq_grad_scale``.
* ``qat_pact`` STE weights, PACT activations (a learned clip per layer input; integer formats).
  The QAT methods train with ``qat_optimizer`` (Adam, or SGD with momentum 0.9).
* ``ptq_gptq``, ``ptq_awq``, ``ptq_smoothquant`` (calibrated on the first ``calibration_size`` training
  images) and ``ptq_hqq``: the ``qlab.ptq`` model-level drivers.

Every method starts from the float model of its (model, data, training budget, seed), trained once per
process and reused. Runs that differ only in seed / learning rates (and, for ``qat`` / ``qat_lsq`` /
``ptq_rtn``, integer bit widths of one spec family, traced) can train together as one vmapped program
(:func:`run_batched`; ``qlab sweep --batch``). Metrics: ``accuracy`` (test), ``float_accuracy``,
``accuracy_drop``, and :func:`~qlab.experiments.methods.size_metrics`.

Example:
    >>> from qlab.experiments import expand
    >>> run = expand({"base": {"hidden": [16], "steps": 20, "train_size": 256, "bits": 4}})[0]
    >>> metrics, layers = run.method.run(run)
    >>> 0 <= metrics["accuracy"] <= 1, list(layers["layer"])
    (True, ['layers/0', 'head'])
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from typing import Any

import numpy as np
import optax
from flax import nnx

from qlab import analysis, evaluate, ptq
from qlab import nn as qnn
from qlab.data import ImageDataset, Split, image_dataset, load_fashion_mnist
from qlab.models import CNN, MLP, CNNConfig
from qlab.numerics import IntFormat, bit_width_family
from qlab.train import train, train_variants, xent_loss

from . import methods, search
from .methods import SEARCH_KEYS, SPEC_KEYS, Family, layer_table, register, register_family, size_metrics

__all__ = ["dataset", "build_model", "float_model", "layer_shapes", "search_costs", "evaluate_rules", "batch_signature", "run_batched", "BATCHABLE",
           "clear_caches"]


def _check_data(name: str) -> None:
    if name == "fashion_mnist":
        load_fashion_mnist("test")


FAMILY = register_family(Family(
    "image", models=("mlp", "cnn"), datasets=("digits", "fashion_mnist"),
    reads=("model", "hidden", "data", "train_size", "steps", "batch_size", "learning_rate", "seed"),
    model_keys={"hidden": ("mlp",)}, choices={"qat_optimizer": ("adam", "sgd")}, check_data=_check_data,
    metric="accuracy"))

#: (image shape, classes) of each dataset, known without loading it (used to check specs early).
DATA_SHAPES = {"digits": ((8, 8, 1), 10), "fashion_mnist": ((28, 28, 1), 10)}
_FLOAT_KEYS = ("model", "hidden", "data", "train_size", "steps", "batch_size", "learning_rate", "seed")
_float_cache: dict[tuple, tuple[Any, dict]] = {}


@functools.lru_cache(maxsize=4)
def _dataset(name: str, train_size: int):
    ds = image_dataset(name, seed=0)
    if train_size and train_size < len(ds.train):
        ds = ImageDataset(ds.name, Split(ds.train.images[:train_size], ds.train.labels[:train_size]),
                          ds.val, ds.test, ds.num_classes)
    return ds


def dataset(run) -> ImageDataset:
    """The run's :class:`qlab.data.ImageDataset` (split seed 0; ``train_size`` > 0 keeps that many).

    Example:
        >>> dataset({"data": "digits", "train_size": 100}).train.images.shape
        (100, 8, 8, 1)
    """
    return _dataset(run["data"], int(run.get("train_size") or 0))


def build_model(run, seed: int) -> nnx.Module:
    """A fresh float model for the run (``mlp`` with ``hidden`` sizes, or ``cnn``).

    Example:
        >>> type(build_model({"model": "mlp", "hidden": [8], "data": "digits"}, 0)).__name__
        'MLP'
    """
    image_shape, classes = DATA_SHAPES[run["data"]]
    rngs = nnx.Rngs(seed)
    if run["model"] == "mlp":
        return MLP(int(np.prod(image_shape)), hidden=tuple(run["hidden"]), out=classes, rngs=rngs)
    base = CNNConfig.digits() if image_shape[0] <= 8 else CNNConfig.fashion_mnist()
    return CNN(dataclasses.replace(base, input_shape=image_shape, num_classes=classes), rngs=rngs)


def _hashable(v):
    return tuple(v) if isinstance(v, list) else v


@functools.lru_cache(maxsize=16)
def _layer_shapes(model: str, hidden, data: str):
    m = build_model({"model": model, "hidden": list(hidden) if hidden else None, "data": data}, 0)
    example = np.zeros((1, *DATA_SHAPES[data][0]), np.float32)
    return tuple((p, tuple(layer.kernel.value.shape)) for p, layer in qnn.quantizable_layers(m, example))


def layer_shapes(run) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``((path, kernel shape), ...)`` of the run's quantizable layers in call order (a throwaway model).

    Example:
        >>> layer_shapes({"model": "mlp", "hidden": [16], "data": "digits"})
        (('layers/0', (64, 16)), ('head', (16, 10)))
    """
    return _layer_shapes(run["model"], _hashable(run.get("hidden")), run["data"])


@functools.lru_cache(maxsize=16)
def _candidate_costs(model: str, hidden, data: str, candidates: tuple[str, ...], spec: str | None):
    m = build_model({"model": model, "hidden": list(hidden) if hidden else None, "data": data}, 0)
    example = np.zeros((1, *DATA_SHAPES[data][0]), np.float32)
    table = analysis.candidate_table(m, candidates, example)
    keep = analysis.candidate_table(m, [analysis.KEEP], example)
    other = qnn.model_size(qnn.quantize_model(m, (), allow_unmatched=True))["packed_bytes"] - int(keep["bytes"].sum())
    spec_table = None if spec is None else analysis.candidate_table(m, [spec], example)
    return table, int(other), spec_table


def search_costs(run):
    """``(candidate table, bytes outside the searched weights, table of a spec-string budget or None)`` of a
    searched run's model (a throwaway model of the same shapes: no data, no training).

    Example:
        >>> from qlab.experiments import expand
        >>> t, other, _ = search_costs(expand({"base": {"hidden": [16], "budget_bpw": 4.0}})[0])
        >>> sorted(set(t.layer)), other
        (['head', 'layers/0'], 104)
    """
    s = run.search
    spec = s.budget if isinstance(s.budget, str) else None
    return _candidate_costs(run["model"], _hashable(run.get("hidden")), run["data"], s.candidates, spec)


def check_rules(run) -> None:
    """Raise ValueError if a rule matches no layer of the run's model, or a weight spec does not fit a
    layer it matches, or (a searched run) a layer has no usable candidate or the budget is below the
    smallest reachable size (checked when the study is loaded; no data, no training).

    Example:
        >>> from qlab.experiments import expand
        >>> expand({"base": {"hidden": [16], "weight": "int4/g32"}})
        Traceback (most recent call last):
        ...
        qlab.experiments.study.ConfigError: run 1 (base) (method='ptq_rtn', weight='int4/g32'): weight spec 'int4/g32' does not fit layer 'head' (kernel 16x10): per_group.size: 32 does not divide ...
    """
    if run.search is not None:
        search.check_search(run.search, *search_costs(run))
        return
    methods.check_rules(run.rules, layer_shapes(run), run.method.name)


def _check_lsq(run) -> None:
    check_rules(run)
    for r in run.rules:
        for what, spec in (("weight", r.weight), ("act", r.act)):
            if spec is not None and not isinstance(spec.fmt, IntFormat):
                raise ValueError(f"method 'qat_lsq' learns integer step sizes; {what} spec {str(spec)!r} is not an "
                                 "integer format (allowed: int2..int8, uint*)")


def _check_pact(run) -> None:
    check_rules(run)
    if run.act is None:
        raise ValueError("method 'qat_pact' learns the activations' clip (PACT): set act, e.g. act = \"uint4\" "
                         "(unsigned: inputs after a ReLU are >= 0)")
    for r in run.rules:
        if r.act is not None and (not isinstance(r.act.fmt, IntFormat) or not r.act.symmetric):
            raise ValueError(f"method 'qat_pact' clips to [0, alpha] (uint) or [-alpha, alpha] (int); act spec "
                             f"{str(r.act)!r} is not a symmetric integer format (allowed: uint2..uint8, int2..int8)")


def _float_key(run) -> tuple:
    return tuple(_hashable(run.get(k)) for k in _FLOAT_KEYS)


def float_model(run, progress: bool = False):
    """The trained float model for the run's (model, data, budget, seed): ``(model, info)`` where
    ``info = {float_accuracy, train_s}``. Trained once per process; a fresh copy is returned.

    Example:
        >>> m, info = float_model({"model": "mlp", "hidden": [8], "data": "digits", "train_size": 128, "steps": 5,
        ...                        "batch_size": 32, "learning_rate": 1e-3, "seed": 0})
        >>> sorted(info)
        ['float_accuracy', 'train_s']
    """
    key = _float_key(run)
    if key not in _float_cache:
        ds = dataset(run)
        model = build_model(run, int(run["seed"]))
        t0 = time.perf_counter()
        train(model, ds, steps=int(run["steps"]), batch_size=int(run["batch_size"]),
              learning_rate=float(run["learning_rate"]), seed=int(run["seed"]), progress=progress)
        info = {"float_accuracy": evaluate.accuracy(model, *ds.test), "train_s": time.perf_counter() - t0}
        if len(_float_cache) > 8:
            _float_cache.clear()
        _float_cache[key] = (model, info)
    model, info = _float_cache[key]
    return qnn.copy_model(model), dict(info)


def clear_caches() -> None:
    """Forget the float models (and the search's sensitivity tables) computed in this process.

    Example:
        >>> clear_caches()
    """
    _float_cache.clear()
    search.clear_search_cache()


def _quantize(run, model, ds, rules=None) -> nnx.Module:
    return qnn.quantize_model(model, run.rules if rules is None else rules, example=ds.test.images[:1])


def evaluate_rules(run, rules) -> dict:
    """Round-to-nearest quantization of the run's float model by ``rules`` (e.g. an ``Allocation.rules()``),
    evaluated: ``{accuracy, model_mib, model_bytes, bits_per_weight, ...}`` (what a ``ptq_rtn`` row reports).

    Example:
        >>> from qlab.experiments import expand
        >>> run = expand({"base": {"hidden": [8], "steps": 5, "train_size": 64}})[0]
        >>> m = evaluate_rules(run, [qnn.Rule(".*", weight="int8/ch")])
        >>> m["model_bytes"], 0 <= m["accuracy"] <= 1
        (700, True)
    """
    ds = dataset(run)
    model, info = float_model(run)
    qmodel = qnn.quantize_model(model, rules, example=ds.test.images[:1])
    return {"accuracy": evaluate.accuracy(qmodel, *ds.test), "float_accuracy": info["float_accuracy"],
            **size_metrics(qmodel)}


def _sensitivity_batches(ds, size: int = 500):
    """Held-out data of the measured / Fisher / Hutchinson sensitivities: the validation split, in batches."""
    x, y = ds.val.images, ds.val.labels
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def _rules(run, model, ds):
    """``(rules, extra metrics, (allocation, sensitivity table) or None)``: the run's own rules, or (a searched run) those the search
    chose for the float ``model`` (its sensitivity computed once per float model and shared by the runs)."""
    if run.search is None:
        return run.rules, {}, None
    s = run.search
    table, other, spec_table = search_costs(run)
    budget = search.check_search(s, table, other, spec_table)

    def compute():
        data = None if s.sensitivity == "sqnr" else (xent_loss, _sensitivity_batches(ds))
        return analysis.sensitivity(model, table, s.sensitivity, data=data)

    scores, sens_s = search.sensitivity_table((_float_key(run), s.sensitivity, s.candidates), compute)
    rules, alloc, extra = search.searched_rules(s, scores, budget, run.act, run.method.rule_options)
    return rules, {**extra, "sensitivity_s": sens_s}, (alloc, scores)


def with_clip_ratio(qmodel: nnx.Module, run, *, always: bool = False) -> nnx.Module:
    """``qmodel`` with the run's ``clip_ratio`` (when not 1, or ``always``) held by every STE weight
    quantizer (``WeightQuantizer.set_traced``: the weight range is multiplied by it). In place; returns it.

    Example:
        >>> from qlab.experiments import expand
        >>> run = expand({"base": {"hidden": [8], "clip_ratio": 0.5}})[0]
        >>> qm = with_clip_ratio(qnn.quantize_model(build_model(run, 0), run.rules), run)
        >>> float(qm.head.weight_quant.clip_ratio[...])
        0.5
    """
    c = float(run.get("clip_ratio") or 1.0)
    if c == 1.0 and not always:
        return qmodel
    for layer in qnn.quantized_layers(qmodel).values():
        if layer.weight_quant is not None and layer.weight_quant.method == "ste":
            layer.weight_quant.set_traced(clip_ratio=c)
    return qmodel


def _setup(run, progress):
    ds = dataset(run)
    model, info = float_model(run, progress=progress)
    order = [p for p, _ in qnn.quantizable_layers(model, ds.test.images[:1])]
    return ds, model, info, order


def _finish(ds, qmodel, info, order, t0, extra=None, template=None, alloc=None):
    eff = qnn.effective_model(qmodel, template) if template is not None else None
    acc = evaluate.accuracy(qmodel if eff is None else eff, *ds.test)
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
    layers = layer_table(qmodel, order)
    return metrics, layers if alloc is None else search.chosen_columns(layers, *alloc)


@register("float", family="image")
def run_float(run, progress=False):
    """The float model: trained, evaluated on the test split."""
    model, info = float_model(run, progress=progress)
    return {
        "accuracy": info["float_accuracy"],
        "float_accuracy": info["float_accuracy"],
        "accuracy_drop": 0.0,
        **size_metrics(qnn.quantize_model(model, (), allow_unmatched=True)),
        "float_train_s": info["train_s"],
        **({"batched": info["batched"]} if "batched" in info else {}),
    }, None


@register("ptq_rtn", family="image", reads=(*SPEC_KEYS, "clip_ratio", *SEARCH_KEYS), check=check_rules)
def run_ptq_rtn(run, progress=False):
    """Round-to-nearest post-training quantization of the float model (weights; activations if ``act``)."""
    t0 = time.perf_counter()
    ds, model, info, order = _setup(run, progress)
    rules, extra, alloc = _rules(run, model, ds)
    qmodel = with_clip_ratio(_quantize(run, model, ds, rules), run)
    metrics, layers = _finish(ds, qmodel, info, order, t0, extra, template=model, alloc=alloc)
    # sensitivity: accuracy drop when only this layer is quantized (by its rule)
    eff = qnn.effective_model(qmodel, model)
    rules = qnn.resolve_positions(rules, order)
    drops = []
    for path in layers["layer"]:
        rule = qnn.first_match(rules, path)
        if rule is None or rule.is_float:
            drops.append(0.0)
            continue
        if eff is not None:  # the float model with just this layer's kernel quantized
            one = qnn.copy_model(model)
            dict(qnn.quantizable_layers(one))[path].kernel.value = dict(qnn.quantizable_layers(eff))[path].kernel[...]
        else:
            one = with_clip_ratio(qnn.quantize_model(model, [dataclasses.replace(rule, pattern=re.escape(path))]), run)
        drops.append(info["float_accuracy"] - evaluate.accuracy(one, *ds.test))
    layers["sensitivity_drop"] = drops
    return metrics, layers


def qat_optimizer(run):
    """The optax optimizer of the run's QAT: ``optax.adam(qat_learning_rate)`` (``qat_optimizer = "adam"``, also
    when the run does not say) or ``optax.sgd(qat_learning_rate, momentum=0.9)`` (``"sgd"``, the LSQ paper's).

    Example:
        >>> qat_optimizer({"qat_optimizer": "sgd", "qat_learning_rate": 0.01}) is not None
        True
    """
    return _optimizer(run.get("qat_optimizer") or "adam", float(run["qat_learning_rate"]))


@functools.lru_cache(maxsize=32)
def _optimizer(name: str, lr: float) -> optax.GradientTransformation:
    # one object per (name, lr): optax transformations are pure, and reusing one keeps the compiled step cached
    if name == "adam":
        return optax.adam(lr)
    if name == "sgd":
        return optax.sgd(lr, momentum=0.9)
    raise ValueError(f"qat_optimizer = {name!r} is unknown; allowed: adam, sgd")


def _run_qat(run, progress=False):
    t0 = time.perf_counter()
    ds, model, info, order = _setup(run, progress)
    rules, extra, alloc = _rules(run, model, ds)
    qmodel = with_clip_ratio(_quantize(run, model, ds, rules), run)
    hist = train(qmodel, ds, steps=int(run["qat_steps"]), batch_size=int(run["batch_size"]),
                 optimizer=qat_optimizer(run), seed=run.seed + 1, progress=progress)
    qmodel.eval()
    diverged = not np.isfinite(np.asarray(hist.loss, np.float64)).all()
    extra = {"qat_final_loss": hist.final_loss, "qat_s": hist.seconds, "qat_diverged": diverged, **extra}
    return _finish(ds, qmodel, info, order, t0, extra, template=model, alloc=alloc)


_QAT_KEYS = ("qat_steps", "qat_learning_rate", "qat_optimizer")


@register("qat", family="image", reads=(*SPEC_KEYS, *_QAT_KEYS, "clip_ratio", *SEARCH_KEYS), check=check_rules)
def run_qat(run, progress=False):
    """Quantization-aware fine-tuning (STE) from the float model, ``qat_steps`` steps."""
    return _run_qat(run, progress)


@register("qat_lsq", family="image", reads=(*SPEC_KEYS, *_QAT_KEYS, "lsq_grad_scale"), check=_check_lsq,
          rule_keys=("lsq_grad_scale",), weight_quantizer="lsq", act_quantizer="lsq")
def run_qat_lsq(run, progress=False):
    """Quantization-aware fine-tuning with LSQ learned step sizes (integer formats)."""
    return _run_qat(run, progress)


@register("qat_pact", family="image", reads=(*SPEC_KEYS, *_QAT_KEYS), check=_check_pact, act_quantizer="pact")
def run_qat_pact(run, progress=False):
    """Quantization-aware fine-tuning: STE weights, PACT activations (a learned clip per layer input; needs `act`)."""
    return _run_qat(run, progress)


def _make_ptq(algo: str, calibrated: bool):
    fn = getattr(ptq, algo)

    def run_ptq(run, progress=False):
        t0 = time.perf_counter()
        ds, model, info, order = _setup(run, progress)
        rules, extra, alloc = _rules(run, model, ds)
        rules = qnn.resolve_positions(rules, order)
        if calibrated:
            x = ds.train.images[:int(run["calibration_size"])]
            qmodel = fn(model, rules, [x[i:i + 128] for i in range(0, len(x), 128)])
        else:
            qmodel = fn(model, rules)
        return _finish(ds, qmodel, info, order, t0, extra, template=model, alloc=alloc)

    run_ptq.__doc__ = f"qlab.ptq.{algo} of the float model" + (
        " (calibration: the first calibration_size training images)." if calibrated else " (no calibration data).")
    return run_ptq


for _algo, _calibrated in (("gptq", True), ("awq", True), ("hqq", False), ("smoothquant", True)):
    register(f"ptq_{_algo}", family="image", reads=SPEC_KEYS + (("calibration_size",) if _calibrated else ())
             + (SEARCH_KEYS if _algo == "gptq" else ()), check=check_rules)(_make_ptq(_algo, _calibrated))


# --------------------------------------------------------------------------- batched variants

#: Keys whose values are traced, not compiled in: runs of a :data:`BATCHABLE` method that differ only in
#: these (and, for :data:`TRACED_BITS` methods, integer bit widths and clip ratios) train as one program.
BATCH_KEYS = ("seed", "learning_rate", "qat_learning_rate")
BATCHABLE = {"float", "ptq_rtn", "qat", "qat_lsq"}
TRACED_BITS = {"ptq_rtn", "qat", "qat_lsq"}


def _spec_family(spec):
    return None if spec is None else str(bit_width_family(spec))


def batch_signature(run) -> str:
    """What runs must share to train as one vmapped program (``qlab sweep --batch``): every key but
    :data:`BATCH_KEYS`; for methods in :data:`TRACED_BITS` the rules are compared with integer bit widths
    masked (``int2/ch`` and ``int8/ch`` batch; ``int4/ch`` and ``int4/g32`` or ``fp8_e4m3/ch`` do not).

    Example:
        >>> from qlab.experiments import expand
        >>> a, b, c = expand({"base": {"method": "qat"}, "sweep": {"bits": [2, 8], "granularity": ["ch"]},
        ...                   "include": [{"method": "qat", "granularity": "g16"}]})
        >>> batch_signature(a) == batch_signature(b), batch_signature(a) == batch_signature(c)
        (True, False)
    """
    cfg = {k: v for k, v in run.config.items() if k not in BATCH_KEYS}
    if run.method.name in TRACED_BITS:
        for k in ("bits", "weight", "act", "rules_def", "clip_ratio"):
            cfg.pop(k, None)
        act = str if run.method.name == "qat_lsq" else _spec_family  # LSQ activations: static bits
        cfg["rules"] = [(r.pattern, _spec_family(r.weight), None if r.act is None else act(r.act)) for r in run.rules]
    return json.dumps(cfg, sort_keys=True, default=str)


def _ensure_floats_batched(runs) -> None:
    """Train the float models the runs need and the cache lacks, all together (same structure)."""
    todo, seen = [], set()
    for r in runs:
        k = _float_key(r)
        if k not in _float_cache and k not in seen:
            seen.add(k)
            todo.append((k, r))
    if len(todo) < 2:
        return
    ds = dataset(todo[0][1])
    models = [build_model(r, r.seed) for _, r in todo]
    t0 = time.perf_counter()
    r0 = todo[0][1]
    train_variants(models, ds, steps=int(r0["steps"]), batch_size=int(r0["batch_size"]),
                   learning_rates=[float(r["learning_rate"]) for _, r in todo], seeds=[r.seed for _, r in todo])
    dt = (time.perf_counter() - t0) / len(todo)
    for (k, _), m in zip(todo, models):
        _float_cache[k] = (m, {"float_accuracy": evaluate.accuracy(m, *ds.test), "train_s": dt, "batched": len(todo)})


def _traced_views(qmodels):
    g0 = nnx.graphdef(qmodels[0])
    if all(nnx.graphdef(q) == g0 for q in qmodels[1:]):
        return qmodels
    return [qnn.traced_variant(q, qmodels[0]) for q in qmodels]


def run_batched(runs, progress: bool = False) -> list[tuple[dict, Any]]:
    """Run runs of one :func:`batch_signature`: float models trained as one vmapped program, then (QAT
    methods) the quantized models fine-tuned as one vmapped program with traced bit widths
    (:func:`qlab.nn.traced_variant`); each run keeps its own static specs for its metrics.

    Example:
        >>> from qlab.experiments import expand
        >>> runs = expand({"base": {"hidden": [8], "steps": 10, "train_size": 128}, "sweep": {"seed": [0, 1]}})
        >>> [round(m["bits_per_weight"], 3) for m, _ in run_batched(runs)]
        [8.486, 8.486]
    """
    if len(_float_cache) + len(runs) > 8:
        _float_cache.clear()
    _ensure_floats_batched(runs)
    method = runs[0].method
    adam = all((r.get("qat_optimizer") or "adam") == "adam" for r in runs)  # train_variants: Adam only
    if method.name not in ("qat", "qat_lsq") or len(runs) < 2 or not adam:
        return [r.method.run(r, progress=progress) for r in runs]
    t0 = time.perf_counter()
    setups = [_setup(r, False) for r in runs]
    clip = any(float(r.get("clip_ratio") or 1.0) != 1.0 for r in runs)  # then every variant holds one (1.0 too)
    qmodels = [with_clip_ratio(_quantize(r, m, ds), r, always=clip) for r, (ds, m, info, order) in zip(runs, setups)]
    views = _traced_views(qmodels)
    losses = train_variants(views, setups[0][0], steps=int(runs[0]["qat_steps"]), batch_size=int(runs[0]["batch_size"]),
                            learning_rates=[float(r["qat_learning_rate"]) for r in runs],
                            seeds=[r.seed + 1 for r in runs])
    if views is not qmodels:  # trained values back into each run's own-spec model
        for qm, v in zip(qmodels, views):
            nnx.update(qm, nnx.state(v, nnx.Not(qnn.QuantOverride)))
    dt = (time.perf_counter() - t0) / len(runs)
    out = []
    for (ds, m, info, order), qm, ls in zip(setups, qmodels, losses):
        qm.eval()
        out.append(_finish(ds, qm, info, order, time.perf_counter() - dt,
                           {"qat_final_loss": float(ls[-1]), "qat_s": dt, "batched": len(runs)}, template=m))
    return out
