"""What a method is: one registry keyed by (model family, method name), and the metrics every method reports.

A *family* is a kind of model with its datasets and the study keys all of its methods read (``image``:
the MLP / CNN classifiers, :mod:`qlab.experiments.image`; ``lm``: Gemma 3, :mod:`qlab.experiments.lm`). A
*method* is a function ``run(run, progress) -> (metrics, per-layer DataFrame | None)`` registered for one
family, with the study keys it reads: the study validates and normalizes every run against those
declarations (a key no run reads is an error; keys a run's method does not read are blanked, so they
neither split nor repeat runs).

Add your own (for the image family, reading the precision keys)::

    from qlab.experiments import register, SPEC_KEYS

    @register("my_method", family="image", reads=SPEC_KEYS)
    def my_method(run, progress=False):
        model, info = image.float_model(run)
        ...
        return {"accuracy": acc, **size_metrics(qmodel)}, None

Example:
    >>> sorted(name for family, name in REGISTRY if family == "lm")
    ['float', 'ptq_awq', 'ptq_gptq', 'ptq_hqq', 'ptq_rtn', 'ptq_smoothquant', 'qat', 'rtn_salient', 'zero_outliers']
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np
from flax import nnx

from qlab import nn as qnn
from qlab.numerics import bits_per_weight

__all__ = ["Family", "Method", "FAMILIES", "REGISTRY", "SPEC_KEYS", "SEARCH_KEYS", "register", "register_family", "method_for",
           "family_of", "check_layer_shapes", "check_rules", "size_metrics", "layer_table", "MiB"]

MiB = 2**20

#: The keys that compose a run's weight / activation specs and rule set (read by every quantizing method).
SPEC_KEYS = ("format", "bits", "granularity", "symmetric", "range", "weight", "act", "rules")
#: The keys of a searched run (``budget_bpw`` or ``budget_mib`` set: :mod:`qlab.experiments.search`), read by
#: the methods that can take their per-layer specs from a search.
SEARCH_KEYS = ("budget_bpw", "budget_mib", "candidates", "sensitivity", "allocation")


@dataclasses.dataclass(frozen=True)
class Family:
    """A kind of model: its ``models`` and ``datasets`` (key values), the keys every method of the family
    reads (``reads``), keys read only by some ``models`` (``model_keys``: key -> models), the allowed values
    of family-specific keys (``choices``), ``check_data(name)``, which raises with install instructions when
    a dataset is missing, and the ``metric`` its runs report."""

    name: str
    models: tuple[str, ...]
    datasets: tuple[str, ...]
    reads: tuple[str, ...]
    model_keys: dict = dataclasses.field(default_factory=dict)
    choices: dict = dataclasses.field(default_factory=dict)
    check_data: Callable[[str], None] | None = None
    metric: str = "accuracy"


@dataclasses.dataclass(frozen=True)
class Method:
    """A registered method. ``run(run, progress) -> (metrics, layers_df | None)``; ``reads``: the study keys
    it reads beyond its family's; ``check(run)`` raises ValueError for a run it cannot do (called when the
    study is loaded, before anything runs); ``rule_options``: :class:`qlab.nn.Rule` fields its rules get
    (e.g. LSQ quantizers); ``rule_keys``: study keys (among ``reads``) passed to its rules as the
    :class:`qlab.nn.Rule` fields of the same name (e.g. ``lsq_grad_scale``)."""

    name: str
    family: str
    run: Callable[..., Any]
    reads: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None
    rule_options: dict = dataclasses.field(default_factory=dict)
    doc: str = ""
    search_reads: tuple[str, ...] = ()  # keys read only by its searched runs (a budget set)
    rule_keys: tuple[str, ...] = ()  # keys passed to its rules as Rule fields of the same name

    @property
    def quantizes(self) -> bool:
        """Whether the method reads the precision keys (every method but ``float``)."""
        return "weight" in self.reads


FAMILIES: dict[str, Family] = {}
REGISTRY: dict[tuple[str, str], Method] = {}


def register_family(family: Family) -> Family:
    """Add a model family (its models, datasets and common keys).

    Example:
        >>> FAMILIES["image"].models
        ('mlp', 'cnn')
    """
    FAMILIES[family.name] = family
    return family


def register(name: str, *, family: str = "image", reads=(), check: Callable | None = None, search_reads=(),
             rule_keys=(), **rule_options):
    """Decorator: register ``fn(run, progress=False) -> metrics | (metrics, layers_df)`` as method ``name``
    of ``family``, reading the study keys ``reads`` (beyond the family's own) and, in its searched runs only,
    ``search_reads``. ``rule_options``: fixed :class:`qlab.nn.Rule` fields of its rules; ``rule_keys``: keys of
    ``reads`` whose values become the Rule fields of the same name.

    Example:
        >>> @register("noop_example", reads=("qat_steps",))
        ... def noop(run, progress=False):
        ...     return {"accuracy": 1.0}
        >>> method_for("mlp", "noop_example").reads
        ('qat_steps',)
        >>> del REGISTRY["image", "noop_example"]
    """

    if unread := [k for k in rule_keys if k not in reads]:
        raise ValueError(f"register({name!r}): rule_keys {unread} must also be in reads")

    def deco(fn):
        REGISTRY[family, name] = Method(name, family, fn, tuple(reads), check, dict(rule_options),
                                        (fn.__doc__ or "").strip().split("\n")[0], tuple(search_reads),
                                        tuple(rule_keys))
        return fn

    return deco


def family_of(model: str) -> Family:
    """The family whose ``models`` include ``model`` (KeyError naming the allowed models otherwise).

    Example:
        >>> family_of("gemma3").name
        'lm'
    """
    for fam in FAMILIES.values():
        if model in fam.models:
            return fam
    allowed = ", ".join(m for f in FAMILIES.values() for m in f.models)
    raise KeyError(f"model = {model!r} is unknown; allowed: {allowed}")


def method_for(model: str, name: str) -> Method:
    """The method ``name`` for ``model``'s family (KeyError naming what that family allows otherwise).

    Example:
        >>> method_for("mlp", "qat").reads[-3:]
        ('candidates', 'sensitivity', 'allocation')
    """
    fam = family_of(model)
    if (fam.name, name) in REGISTRY:
        return REGISTRY[fam.name, name]
    allowed = sorted(n for f, n in REGISTRY if f == fam.name)
    elsewhere = sorted(f for f, n in REGISTRY if n == name)
    why = f" (a method of the {', '.join(elsewhere)} family, not of {fam.name!r} models)" if elsewhere else ""
    raise KeyError(f"method = {name!r} is not available for model {model!r}{why}; allowed: {', '.join(allowed)}")


# --------------------------------------------------------------------------- shared by every family


def check_layer_shapes(shapes, rules) -> None:
    """Raise ValueError if a rule's weight spec cannot quantize a layer it matches first (e.g. a group
    size that does not divide the layer's input features). ``shapes``: ``[(path, kernel shape)]``.

    Example:
        >>> check_layer_shapes([("head", (100, 10))], [qnn.Rule(".*", weight="int4/g32")])
        Traceback (most recent call last):
        ...
        ValueError: weight spec 'int4/g32' does not fit layer 'head' (kernel 100x10): per_group.size: 32 does not divide ...
    """
    for path, shape in shapes:
        rule = qnn.first_match(rules, path)
        if rule is None or rule.weight is None:
            continue
        spec = rule.weight.resolve(len(shape) - 1, len(shape) - 2)
        try:
            bits_per_weight(spec, shape)
        except ValueError as e:
            raise ValueError(f"weight spec {str(rule.weight)!r} does not fit layer {path!r} "
                             f"(kernel {'x'.join(map(str, shape))}): {e}") from None


def check_rules(rules, shapes, method: str) -> None:
    """The checks every quantizing method makes when a study is loaded: each rule matches some layer of
    ``shapes`` (``@first`` / ``@last`` resolved in that order), each weight spec fits the layers it quantizes
    (:func:`check_layer_shapes`), and ``ptq_hqq`` gets asymmetric weight specs.

    Example:
        >>> check_rules([qnn.Rule("decoder/.*", weight="int4/ch")], [("head", (16, 10))], "ptq_rtn")
        Traceback (most recent call last):
        ...
        ValueError: rule 'decoder/.*' matches no layer; layers: head
    """
    paths = [p for p, _ in shapes]
    rules = qnn.resolve_positions(rules, paths)
    for r in rules:
        if not any(r.matches(p) for p in paths):
            shown = ", ".join(paths[:8]) + (f", ... ({len(paths)} layers)" if len(paths) > 8 else "")
            raise ValueError(f"rule {r.pattern!r} matches no layer; layers: {shown}")
    check_layer_shapes(shapes, rules)
    if method == "ptq_hqq":
        for r in rules:
            if r.weight is not None and r.weight.symmetric:
                raise ValueError(f"method 'ptq_hqq' needs asymmetric integer weight specs; weight {str(r.weight)!r} "
                                 "is symmetric: set symmetric = false (e.g. int4/g32/asym, int4/g128/asym/zp=float)")


def size_metrics(qmodel: nnx.Module, report=None) -> dict:
    """Parameter counts and packed size of a ``qlab.nn`` model (or a float model): params,
    quantized_params, bits_per_weight (over quantized weights, scales included), model_bytes,
    model_mib, float_mib (the float baseline in float32), native_dtype and float_native_mib (the float
    baseline in the model's own dtype: bfloat16 for Gemma 3, see ``qlab.nn.model_size``), compression.

    Example:
        >>> from qlab.models import MLP
        >>> m = qnn.quantize_model(MLP(64, hidden=(32,), rngs=nnx.Rngs(0)), [qnn.Rule("layers/0", weight="int8/ch")],
        ...                        allow_unmatched=True)
        >>> size_metrics(m)["quantized_params"]
        2048
    """
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
        "native_dtype": size["native_dtype"],
        "float_native_mib": size["float_native_bytes"] / MiB,
        "compression": size["float_bytes"] / size["packed_bytes"],
    }


def layer_table(qmodel: nnx.Module, order: list[str]):
    """``qlab.nn.layer_report`` (weight layers) in call order, with an ``order`` column; the SQNR
    column is renamed ``weight_sqnr_db``; float layers have ``weight_spec = "float"``.

    Example:
        >>> from qlab.models import MLP
        >>> m = qnn.quantize_model(MLP(4, hidden=(8,), rngs=nnx.Rngs(0)), [qnn.Rule("head", weight="int4/ch")],
        ...                        allow_unmatched=True)
        >>> layer_table(m, ["layers/0", "head"])[["layer", "weight_spec"]].values.tolist()
        [['layers/0', 'float'], ['head', 'int4/ch1']]
    """
    rep = qnn.layer_report(qmodel, warn=False)
    rep = rep[~rep["kind"].astype(str).str.startswith("call:")].copy()
    rank = {p: i for i, p in enumerate(order)}
    rep.insert(0, "order", rep["layer"].map(lambda p: rank.get(p, len(rank))))
    rep["weight_spec"] = rep["weight_spec"].fillna("float")
    rep["act_spec"] = rep["act_spec"].fillna("none")
    rep = rep.rename(columns={"sqnr_db": "weight_sqnr_db"})
    return rep.sort_values("order").reset_index(drop=True)

