"""Studies: a TOML file (or a dict) parsed once into runs that hold final, typed values.

A study file::

    name = "quickstart"                 # default: the file's stem; results go to results/<name>/
    description = "int bits x group size on digits"

    [base]                              # every run starts from KEYS' defaults, then these
    model = "mlp"
    data = "digits"

    [sweep]                             # Cartesian product of these lists (several [[sweep]] tables: union)
    method = ["ptq_rtn", "qat"]
    bits = [8, 4, 3, 2]
    granularity = ["ch", "g16", "g32"]

    [[include]]                         # explicit runs (base + these keys), added to the grid
    method = "float"

    [rule_sets]                         # named per-layer rule sets; "$weight"/"$act" = the run's spec
    first_last_8bit = [
      { pattern = "@first|@last", weight = "int8/ch" },
      { pattern = ".*", weight = "$weight" },
    ]

Each run becomes a :class:`Run`: its method (from the registry, keyed by model family and method
name), its weight and activation :class:`~qlab.numerics.QuantSpec`, and its :class:`qlab.nn.Rule` list
(``@first`` / ``@last`` are resolved by :func:`qlab.nn.quantize_model` against the layers in call order).
Everything is checked here, before anything runs; errors name the key, the run and the allowed values.
Every key, its default and the methods that read it: :func:`schema_table`.

Example:
    >>> runs = expand({"base": {"steps": 10}, "sweep": {"bits": [8, 4], "method": ["float", "ptq_rtn"]}})
    >>> [(r.method.name, str(r.weight) if r.weight else None) for r in runs]
    [('float', None), ('ptq_rtn', 'int8/ch'), ('ptq_rtn', 'int4/ch')]
    >>> runs[2].rules
    (Rule('.*', weight='int4/ch'),)
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import json
import pathlib
import re
import tomllib
import types
from typing import Any, Mapping

from qlab import nn as qnn
from qlab.numerics import IntFormat, QuantSpec, parse_spec

from .methods import FAMILIES, REGISTRY, SEARCH_KEYS, SPEC_KEYS, Method, family_of, method_for
from .search import Search, search_of

__all__ = ["KEYS", "DEFAULTS", "BUILTIN_RULE_SETS", "ConfigError", "Key", "Run", "Study", "load_study", "expand",
           "config_hash", "spec_columns", "schema_table", "methods_table"]


@dataclasses.dataclass(frozen=True)
class Key:
    """One study key: its default and what it means (the README's schema table is built from these)."""

    default: Any
    doc: str
    kind: str = ""  # "positive" (number > 0), "nonneg" (int >= 0), "int_list", "spec"; else by the default's type


#: Every run key. A study may set only these (in [base], [sweep], [[include]]).
KEYS: dict[str, Key] = {
    "method": Key("ptq_rtn", "what to run: see the methods table"),
    "model": Key("mlp", "mlp or cnn (image family); gemma3 or gemma3_tiny (lm family)"),
    "hidden": Key([128, 128], "MLP hidden sizes (model = mlp)", "int_list"),
    "data": Key("digits", "digits or fashion_mnist (image family); austen or tiny_text (lm family: the evaluation text)"),
    "train_size": Key(0, "0: the whole training split; N: its first N examples", "nonneg"),
    "steps": Key(300, "float training steps", "positive"),
    "batch_size": Key(64, "training batch size", "positive"),
    "learning_rate": Key(3e-3, "float training learning rate (Adam)", "positive"),
    "qat_steps": Key(100, "QAT fine-tuning steps (image: from the float model; lm: from qat_init)", "positive"),
    "qat_learning_rate": Key(1e-3, "QAT learning rate (Adam; image QAT: of qat_optimizer)", "positive"),
    "calibration_size": Key(512, "calibration images (first N of the training split)", "positive"),
    "format": Key("int", '"int" / "uint" (+ bits) or a format name: fp8_e4m3, nf4, fp4_e2m1, mxfp4, ...'),
    "bits": Key(8, "integer bit width, 2..16 (format int / uint)", "positive"),
    "granularity": Key("ch", "tensor, ch, g<N> (groups along the input axis) or b<R>x<C>"),
    "symmetric": Key(True, "no zero point (true) or an integer zero point (false)"),
    "range": Key("absmax", "absmax, minmax, mse or p<q> (e.g. p99.9)"),
    "clip_ratio": Key(1.0, "(0, 1]: the weight range multiplied by this", "positive"),
    "weight": Key(None, "a whole weight spec string; overrides format / bits / granularity / symmetric / range",
                  "spec"),
    "act": Key("none", 'activation spec, or "none"', "spec"),
    "rules": Key("all", "rule set: all, first_last_8bit, first_last_float, or one of [rule_sets]"),
    "seed": Key(0, "model init and batch order (the float model and QAT)", "nonneg"),
    "eval_tokens": Key(86016, "perplexity over the first N tokens of the data text: up to 1024, one sequence (BOS + "
                              "text); above, a multiple of 1024: N / 1024 rows of BOS + the next 1,023 text tokens. "
                              "86016 (84 rows): the shortest multiple of 1024 from which float Gemma 3 270M's "
                              "perplexity on Pride and Prejudice has a standard error under 1% (measured to 98304: "
                              "0.93%; 8.05% at 1024; benchmarks/eval_length.py); it costs about 23 min of the float model on 2 shared CPU "
                              "cores (16 s per 1,024 tokens), twice that per quantized run (both models are scored)",
                       "positive"),
    "calibration": Key("emma", "calibration text: an Austen novel name, kjv, fortunes or tiny_text"),
    "calibration_seqs": Key(32, "calibration windows ...", "positive"),
    "calibration_len": Key(256, "... of this many tokens (BOS + text), at fixed random offsets", "positive"),
    "act_order": Key(False, "GPTQ: quantize columns in order of decreasing Hessian diagonal"),
    "sequential": Key(True, "calibrate block by block on the already-quantized predecessors (false: one float "
                            "pass, shared by the runs)"),
    "budget_bpw": Key(None, "searched mixed precision: a budget in bits per weight over the searched layers (scales "
                            "included), or a spec string (e.g. \"int3/ch\"): the bytes of that spec on every searched "
                            "layer; the search gives each layer one of `candidates`", "budget"),
    "budget_mib": Key(None, "searched mixed precision: a budget in MiB for the whole packed model", "budget"),
    "candidates": Key(["int2/ch", "int3/ch", "int4/ch", "int8/ch"],
                      "the weight specs the search may give a layer (\"keep\": float); used with a budget", "str_list"),
    "sensitivity": Key("sqnr", "how the search scores a layer at a candidate: sqnr, measured, fisher or hutchinson "
                               "(computed once per float model and shared by the runs); used with a budget"),
    "allocation": Key("dp", "how the search allocates bytes: dp, milp (exact) or greedy; used with a budget"),
    "search_embed": Key(False, "lm searched runs: the search may also choose the tied embedding's spec (the "
                               "embedding is 62% of Gemma 3 270M's weights); uniform runs compare at equal bytes "
                               "with a rule set that quantizes it too, e.g. {pattern = \".*\"}"),
    "qat_init": Key("rtn", "lm qat: the kernels QAT starts from: rtn (the float kernels) or gptq (GPTQ's, calibrated "
                           "as ptq_gptq)"),
    "qat_seq_len": Key(128, "lm qat: tokens the model reads per window of the calibration text (BOS + text), "
                            "predicting the next ones", "positive"),
    "qat_optimizer": Key("adam", "image QAT: adam (Adam) or sgd (SGD, momentum 0.9: the LSQ paper's optimizer), at "
                                 "qat_learning_rate"),
    "outlier_threshold": Key(None, "lm ptq_rtn: LLM.int8's decomposition: input columns whose |x| exceeds this "
                                   "anywhere in the sequence stay float with their weight rows (needs act)",
                             "optional_positive"),
    "alpha": Key(0.5, "ptq_smoothquant: migration strength in [0, 1], s = max|X|^alpha / max|W|^(1 - alpha)", "unit"),
    "smooth": Key("norm_inputs", "ptq_smoothquant: the layers smoothed: norm_inputs (q/k/v and gate/up, whose "
                                 "inputs follow a norm, as in the paper), all (every projection), or none (the "
                                 "unsmoothed W8A8 baseline under the same activation calibration)"),
    "act_scales": Key("dynamic", "ptq_smoothquant: dynamic (each input's own range) or static (one per-tensor range "
                                 "per layer from the calibration maximum: the paper's O3)"),
    "saliency": Key("activation", "rtn_salient: how a projection's salient input channels are chosen: activation "
                                  "(mean |x| on the calibration text), weight (L2 norm of the kernel row) or "
                                  "random (drawn with seed)"),
    "salient_fraction": Key(0.01, "rtn_salient: the share of each projection's input channels that is salient, "
                                  "in (0, 1) (at least one channel)", "unit"),
    "salient_scale": Key(None, "rtn_salient: none keeps the salient channels' weight rows float (AWQ Table 1); s: "
                               "scales them by s before RTN and their activations by 1/s (AWQ Table 2)",
                         "optional_positive"),
    "zero_dims": Key("systematic", "zero_outliers: systematic (the hidden dimensions that are outlier features in "
                                   ">= 25% of the layers, LLM.int8's definition, on the evaluation text) or random "
                                   "(as many other dimensions, drawn with seed)"),
    "lsq_grad_scale": Key(True, "qat_lsq: scale the learned steps' gradients by LSQ's g = 1/sqrt(N Qp) (N values share "
                                "a step); false: g = 1 (the LSQ paper's ablation)"),
}
DEFAULTS: dict[str, Any] = {k: v.default for k, v in KEYS.items()}
#: Keys added after results were first committed: left out of a run (and its hash) when it does not read them.
LATE_KEYS = ("eval_tokens", "calibration", "calibration_seqs", "calibration_len", "act_order", "sequential",
             "clip_ratio")
#: Keys left out of a run (and its hash) when its method does not read them (added after results were committed).
METHOD_ONLY_KEYS = ("qat_init", "qat_seq_len", "search_embed", "qat_optimizer", "lsq_grad_scale", "outlier_threshold",
                    "alpha", "smooth", "act_scales", "saliency", "salient_fraction", "salient_scale", "zero_dims")
#: Keys left out of a run (and its hash) at their default value (so results from before the key keep their hashes).
OMIT_AT_DEFAULT = ("clip_ratio", "qat_optimizer", "lsq_grad_scale", "outlier_threshold")
TOP_LEVEL = ("name", "description", "base", "sweep", "include", "rule_sets", "batch")

#: Built-in rule sets. Patterns are regexes over layer paths (``layers/0``, ``head``, ``convs/1``...; matched
#: with re.fullmatch); ``@first`` / ``@last`` stand for the first / last quantizable layer in call order.
#: ``$weight`` / ``$act`` are replaced by the run's weight / activation specs; ``"none"`` keeps a layer float.
BUILTIN_RULE_SETS: dict[str, list[dict]] = {
    "all": [{"pattern": ".*", "weight": "$weight", "act": "$act"}],
    "first_last_8bit": [
        {"pattern": "@first|@last", "weight": "int8/ch", "act": "$act"},
        {"pattern": ".*", "weight": "$weight", "act": "$act"},
    ],
    "first_last_float": [
        {"pattern": "@first|@last", "weight": "none", "act": "none"},
        {"pattern": ".*", "weight": "$weight", "act": "$act"},
    ],
}


class ConfigError(ValueError):
    """A study that cannot run; the message names the key, the run and the allowed values."""


def _spec_or_none(text) -> QuantSpec | None:
    return None if text in (None, False, "", "none", "None") else parse_spec(str(text))


@dataclasses.dataclass(frozen=True)
class Run:
    """One run of a study, with final values: ``method`` (a registered :class:`Method`), ``weight`` / ``act``
    specs, ``rules`` (:class:`qlab.nn.Rule`, first match wins; empty for float runs), the rule set's name,
    and ``config``: every key, normalized (keys the method does not read are None), which is hashed into
    ``config_hash``. ``run["key"]`` reads ``config``.

    Example:
        >>> run = expand({"base": {"method": "qat", "weight": "int4/g16"}})[0]
        >>> run.method.name, run.weight.bits, run["qat_steps"], run["calibration_size"]
        ('qat', 4, 100, None)
    """

    config: Mapping[str, Any]
    config_hash: str
    method: Method
    weight: QuantSpec | None
    act: QuantSpec | None
    rules: tuple[qnn.Rule, ...]
    rule_set: str | None
    search: Search | None = None

    def __getitem__(self, key):
        return self.config_hash if key == "config_hash" else self.config[key]

    def __contains__(self, key):
        return key == "config_hash" or key in self.config

    def get(self, key, default=None):
        return self[key] if key in self else default

    @property
    def seed(self) -> int:
        return int(self.config["seed"])

    @property
    def mixed(self) -> bool:
        """Whether layers get different specs (a rule set other than ``all``, or a searched run)."""
        return self.search is not None or self.rule_set not in (None, "all")

    @property
    def label(self) -> str:
        """What the run quantized with: ``"int4/g32"``, ``"first_last_8bit(int2/ch)"``, ``"float"``, or for a
        searched run its sensitivity and budget: ``"searched(sqnr, bytes of int3/ch)"``.

        Example:
            >>> [r.label for r in expand({"sweep": {"rules": ["all", "first_last_8bit"], "bits": [2]}})]
            ['int2/ch', 'first_last_8bit(int2/ch)']
            >>> expand({"base": {"hidden": [8], "budget_bpw": 3.5}})[0].label
            'searched(sqnr, 3.5 bpw)'
        """
        if self.search is not None:
            act = "" if self.act is None else f" act {self.act}"
            return f"{self.search.label[:-1]}, {self.search.budget_label}){act}"
        base = str(self.weight) if self.weight is not None else "float"
        if self.act is not None:
            base += f" act {self.act}"
        return f"{self.rule_set}({base})" if self.mixed else base

    def columns(self) -> dict:
        """The run's config columns for a result row, written from the typed values: ``weight`` is the
        :attr:`label`, and format / bits / granularity / symmetric / range describe the weight spec that
        ran (None for float and mixed runs; their layers are in layers.csv).

        Example:
            >>> r = expand({"base": {"weight": "nf4/g16"}})[0]
            >>> {k: r.columns()[k] for k in ("weight", "format", "bits", "granularity")}
            {'weight': 'nf4/g16', 'format': 'nf4', 'bits': 4, 'granularity': 'g16'}
        """
        cols = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in self.config.items() if k != "rules_def"}
        uniform = self.weight if not self.mixed else None
        cols.update(spec_columns(uniform))
        if self.search is not None:  # its layers' specs are in layers.csv
            cols.update(weight=self.label, rules=self.search.label, act=None if self.act is None else str(self.act))
            return cols
        weight = "float" if self.weight is None else str(self.weight)
        cols["weight"] = None if self.weight is None and not self.mixed else (
            f"{self.rule_set}({weight})" if self.mixed else weight)
        cols["act"] = None if self.act is None else str(self.act)
        return cols


def spec_columns(spec: QuantSpec | None) -> dict:
    """format / bits / granularity / symmetric / range of a spec (all None for None).

    Example:
        >>> spec_columns(parse_spec("int3/g64/asym/mse"))
        {'format': 'int', 'bits': 3, 'granularity': 'g64', 'symmetric': False, 'range': 'mse'}
    """
    if spec is None:
        return dict.fromkeys(("format", "bits", "granularity", "symmetric", "range"))
    if isinstance(spec.fmt, IntFormat):
        fmt = "int" if spec.fmt.signed else "uint"
    else:
        fmt = str(spec).split("/")[0]
    return {"format": fmt, "bits": spec.bits, "granularity": spec.granularity.token(), "symmetric": spec.symmetric,
            "range": spec.range.token()}


@dataclasses.dataclass(frozen=True)
class Study:
    """A validated study: its name, its runs and rule sets.

    Example:
        >>> s = load_study({"name": "t", "sweep": {"bits": [8, 4]}})
        >>> s.name, len(s.runs)
        ('t', 2)
    """

    name: str
    runs: tuple[Run, ...]
    rule_sets: Mapping[str, list[dict]]
    description: str = ""
    batch: bool = False
    source: str | None = None


# --------------------------------------------------------------------------- helpers


def _allowed(keys) -> str:
    return ", ".join(sorted(keys))


def config_hash(config: Mapping[str, Any]) -> str:
    """12 hex digits of SHA-256 over the run's canonical JSON (``config_hash`` key excluded).

    Example:
        >>> config_hash({"a": 1}) == config_hash({"a": 1, "config_hash": "x"})
        True
    """
    payload = {k: v for k, v in config.items() if k != "config_hash"}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _check_type(key: str, value, where: str):
    k = KEYS[key]
    default, kind = k.default, k.kind
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "spec":
        ok, want = value is None or isinstance(value, str), "a spec string"
    elif kind == "budget":
        ok = value is None or (number and value > 0) or (key == "budget_bpw" and isinstance(value, str))
        want = "a positive number" + (" or a spec string (the bytes of that spec on every layer)"
                                      if key == "budget_bpw" else "")
    elif kind == "str_list":
        ok = isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)
        want = "a non-empty list of strings"
    elif kind == "int_list":
        ok = isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
        want = "a list of positive integers"
    elif kind == "optional_positive":
        ok, want = value is None or (number and value > 0), "a positive number (or left out)"
    elif kind == "unit":
        ok, want = number and 0 <= value <= 1, "a number in [0, 1]"
    elif kind == "nonneg":
        ok, want = isinstance(value, int) and not isinstance(value, bool) and value >= 0, "an integer >= 0"
    elif isinstance(default, bool):
        ok, want = isinstance(value, bool), "true or false"
    elif isinstance(default, int):
        ok, want = number and isinstance(value, int) and value > 0, "a positive integer"
    elif isinstance(default, float):
        ok, want = number and value > 0, "a positive number"
    else:
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise ConfigError(f"{where}: {key} = {value!r} must be {want}")


def _check_keys(table: Mapping, where: str):
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table of run keys, got {type(table).__name__}")
    for k in table:
        if k not in KEYS:
            raise ConfigError(f"{where}: unknown key {k!r}; allowed: {_allowed(KEYS)}")


def _rule_sets(raw) -> dict[str, list[dict]]:
    sets = copy.deepcopy(BUILTIN_RULE_SETS)
    if raw is None:
        return sets
    if not isinstance(raw, Mapping):
        raise ConfigError("[rule_sets] must be a table: name = [ {pattern=..., weight=..., act=...}, ... ]")
    for name, rules in raw.items():
        if not isinstance(rules, list) or not rules:
            raise ConfigError(f"rule_sets.{name}: must be a non-empty list of {{pattern, weight, act}} tables")
        clean = []
        for i, r in enumerate(rules):
            if not isinstance(r, Mapping) or "pattern" not in r:
                raise ConfigError(f"rule_sets.{name}[{i}]: needs a 'pattern' (a regex over layer paths)")
            for k in r:
                if k not in ("pattern", "weight", "act"):
                    raise ConfigError(f"rule_sets.{name}[{i}]: unknown key {k!r}; allowed: act, pattern, weight")
            try:
                re.compile(r["pattern"])
            except re.error as e:
                raise ConfigError(f"rule_sets.{name}[{i}].pattern {r['pattern']!r}: bad regex: {e}") from None
            clean.append({"pattern": r["pattern"], "weight": r.get("weight", "$weight"), "act": r.get("act", "$act")})
        sets[name] = clean
    return sets


def _weight_spec(config: Mapping[str, Any]) -> QuantSpec | None:
    """The weight spec from ``weight`` or the composing keys (format, bits, granularity, symmetric, range)."""
    if config.get("weight") not in (None, ""):
        return _spec_or_none(config["weight"])
    fmt = str(config["format"])
    head = f"int{int(config['bits'])}" if fmt in ("int", "uint") else fmt
    if fmt == "uint":
        head = "u" + head
    sym = "sym" if config["symmetric"] else "asym"
    return parse_spec("/".join([head, str(config["granularity"]), sym, str(config["range"])]))


def _resolved_rules(rule_set: list[dict], weight: QuantSpec | None, act: QuantSpec | None) -> list[dict]:
    """``[{pattern, weight, act}]`` with ``$weight`` / ``$act`` substituted: canonical spec strings or None."""

    def sub(v, own):
        if v in ("$weight", "$act"):
            return None if own is None else str(own)
        spec = _spec_or_none(v)
        return None if spec is None else str(spec)

    return [{"pattern": r["pattern"], "weight": sub(r.get("weight", "$weight"), weight),
             "act": sub(r.get("act", "$act"), act)} for r in rule_set]


# --------------------------------------------------------------------------- one run


def _search(config: dict, method: Method, where: str) -> Search | None:
    if not set(SEARCH_KEYS) <= set(method.reads):
        return None
    try:
        search = search_of(config)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if search is not None and config["rules"] != "all":
        raise ConfigError(f"{where}: rules = {config['rules']!r} with a budget: a searched run takes its per-layer "
                          "specs from the search; leave rules = \"all\" (hand rule sets are for runs without a budget)")
    return search


def _validate(config: dict, where: str, rule_sets) -> tuple[Method, QuantSpec | None, QuantSpec | None, list | None]:
    for k, v in config.items():
        if v is not None or KEYS[k].kind not in ("spec", "budget", "optional_positive"):
            _check_type(k, v, where)
    try:
        fam = family_of(config["model"])
        method = method_for(config["model"], config["method"])
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]}") from None
    if config["data"] not in fam.datasets:
        other = [f for f in FAMILIES.values() if config["data"] in f.datasets]
        hint = (f" (a dataset of the {other[0].name} family: models {', '.join(other[0].models)})" if other else "")
        raise ConfigError(f"{where}: data = {config['data']!r} cannot feed model {config['model']!r}{hint}; "
                          f"allowed: {', '.join(fam.datasets)}")
    for key, allowed in fam.choices.items():
        if key in method.reads + fam.reads and config[key] not in allowed:
            raise ConfigError(f"{where}: {key} = {config[key]!r} is unknown; allowed: {_allowed(allowed)}")
    if not method.quantizes:
        return method, None, None, None
    if config["rules"] not in rule_sets:
        raise ConfigError(f"{where}: rules = {config['rules']!r} is unknown; allowed: {_allowed(rule_sets)}")
    if "clip_ratio" in method.reads and not 0 < config["clip_ratio"] <= 1:
        raise ConfigError(f"{where}: clip_ratio = {config['clip_ratio']!r} must be in (0, 1] (1: the full range)")
    if config.get("weight") in (None, ""):
        fmt = config["format"]
        if fmt not in ("int", "uint"):
            try:
                parse_spec(fmt)
            except ValueError as e:
                raise ConfigError(f"{where}: format = {fmt!r} is not a format: {e}") from None
        elif not 2 <= config["bits"] <= 16:
            raise ConfigError(f"{where}: bits = {config['bits']!r} must be between 2 and 16 for format {fmt!r}")
        g = str(config["granularity"])
        if not re.fullmatch(r"tensor|ch-?\d*|g\d+(a-?\d+)?p?|b\d+x\d+", g):
            raise ConfigError(f"{where}: granularity = {g!r} is not one of: tensor, ch, g<N> (e.g. g32), b<R>x<C>")
        what = f"the weight spec composed from format/bits/granularity/symmetric/range (range = {config['range']!r})"
    else:
        what = f"weight = {config['weight']!r} is not a valid spec"
    try:
        weight = _weight_spec(config)
    except ValueError as e:
        raise ConfigError(f"{where}: {what}: {e}") from None
    try:
        act = _spec_or_none(config.get("act"))
    except ValueError as e:
        raise ConfigError(f"{where}: act = {config['act']!r} is not a valid spec: {e}") from None
    try:
        resolved = _resolved_rules(rule_sets[config["rules"]], weight, act)
    except ValueError as e:
        raise ConfigError(f"{where}: rule set {config['rules']!r} has an invalid spec: {e}") from None
    return method, weight, act, resolved


def _normalize(config: dict, method: Method, weight: QuantSpec | None, resolved, rule_sets,
               search: Search | None = None) -> dict:
    """Keys the method does not read become None (late keys are left out); spec keys canonical. This is
    what a run's hash covers, so the rule must not change for results on disk to keep their hashes."""
    fam = FAMILIES[method.family]
    reads = set(fam.reads) | set(method.reads) | {"method"} | (set(method.search_reads) if search else set())
    out = {}
    for k, v in config.items():
        models = fam.model_keys.get(k)
        if k in reads and (models is None or config["model"] in models):
            out[k] = v
        elif k in LATE_KEYS and not any(k in m.reads for (f, _), m in REGISTRY.items() if f == fam.name):
            continue  # a key this family never reads: not part of its runs
        elif k in METHOD_ONLY_KEYS:
            continue
        else:
            out[k] = None
    for k in OMIT_AT_DEFAULT:
        if out.get(k) is None or out.get(k) == KEYS[k].default:
            out.pop(k, None)
        elif isinstance(KEYS[k].default, float):
            out[k] = float(out[k])
    for k in SEARCH_KEYS:
        if search is None:  # not part of an unsearched run (results from before the search keep their hashes)
            out.pop(k, None)
        elif isinstance(out.get(k), int) and not isinstance(out.get(k), bool):
            out[k] = float(out[k])
    if search is not None:  # the search gives the specs: the uniform spec keys do not describe this run
        for k in ("format", "bits", "granularity", "symmetric", "range"):
            out[k] = None
    if method.quantizes:
        out["weight"] = None if weight is None else str(weight)
        if out.get("act") in (None, "", "none"):
            out["act"] = "none"
        if search is None and out["rules"] not in BUILTIN_RULE_SETS:  # a user rule set is part of the run's identity
            out["rules_def"] = json.dumps(resolved, sort_keys=True)
    return out


def _make_run(config: dict, where: str, rule_sets) -> Run:
    method, weight, act, resolved = _validate(config, where, rule_sets)
    search = _search(config, method, where) if method.quantizes else None
    if search is not None:
        weight = None
    normalized = _normalize(config, method, weight, resolved, rule_sets, search)
    rules = ()
    if method.quantizes and search is None:
        from_keys = {k: config[k] for k in method.rule_keys}  # study keys that are Rule fields of this method's rules
        rules = tuple(qnn.Rule(r["pattern"], weight=r["weight"], act=r["act"], **from_keys,
                               **{k: v for k, v in method.rule_options.items()
                                  if r["weight" if k.startswith("weight") else "act"] is not None})
                      for r in resolved)
    run = Run(types.MappingProxyType(normalized), config_hash(normalized), method, weight, act, rules,
              normalized["rules"] if method.quantizes else None, search)
    if method.check is not None:
        try:
            method.check(run)
        except ValueError as e:
            raise ConfigError(f"{where} (method={method.name!r}, weight={run.label!r}): {e}") from None
    return run


# --------------------------------------------------------------------------- expansion


def _grids(sweep) -> list[dict]:
    if sweep is None:
        return [{}]
    tables = sweep if isinstance(sweep, list) else [sweep]
    out = []
    for i, t in enumerate(tables):
        where = "[sweep]" if not isinstance(sweep, list) else f"[[sweep]] #{i + 1}"
        _check_keys(t, where)
        values = []
        for k, v in t.items():
            if not isinstance(v, list) or not v or (k == "hidden" and not isinstance(v[0], list)):
                raise ConfigError(f"{where}: {k} must be a non-empty list of values to sweep, got {v!r}")
            values.append(v)
        out.extend(dict(zip(t, combo)) for combo in itertools.product(*values))
    return out


def expand(cfg: Mapping[str, Any], rule_sets: Mapping[str, list[dict]] | None = None) -> list[Run]:
    """Expand a study dict into validated, normalized, de-duplicated :class:`Run` s.

    Example:
        >>> [r.label for r in expand({"sweep": {"granularity": ["ch", "g16"]}})]
        ['int8/ch', 'int8/g16']
    """
    for k in cfg:
        if k not in TOP_LEVEL:
            raise ConfigError(f"unknown top-level key {k!r}; allowed: {_allowed(TOP_LEVEL)}")
    rule_sets = _rule_sets(cfg.get("rule_sets")) if rule_sets is None else rule_sets
    base = cfg.get("base", {})
    _check_keys(base, "[base]")
    includes = cfg.get("include", [])
    if isinstance(includes, Mapping):
        includes = [includes]
    for i, inc in enumerate(includes):
        _check_keys(inc, f"[[include]] #{i + 1}")
    points = [(p, False) for p in _grids(cfg.get("sweep"))] if cfg.get("sweep") is not None or not includes else []
    points += [(dict(inc), True) for inc in includes]
    runs, seen, read = [], set(), set()
    for i, (p, explicit) in enumerate(points):
        config = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(base), **p}
        label = ", ".join(f"{k}={v!r}" for k, v in p.items())
        where = f"run {i + 1} ({label or 'base'})"
        run = _make_run(config, where, rule_sets)
        reads = _reads(run)
        if explicit and (unread := sorted(k for k in p if k not in reads)):
            raise ConfigError(f"{where}: method {run.method.name!r} does not read {', '.join(unread)}; it reads: "
                              f"{', '.join(sorted(reads))}")
        read |= reads
        if run.config_hash in seen:
            continue
        seen.add(run.config_hash)
        runs.append(run)
    set_keys = set(base) | {k for p, _ in points for k in p}
    if unread := sorted(set_keys - read - {"method", "seed"}):
        readers = {k: sorted({f"{m.name}" for m in REGISTRY.values() if k in m.reads}) for k in unread}
        detail = "; ".join(f"{k} (read by: {', '.join(r) or 'model-specific runs'})" for k, r in readers.items())
        raise ConfigError(f"the study sets keys that none of its runs reads: {detail}")
    return runs


def _reads(run: Run) -> set[str]:
    fam = FAMILIES[run.method.family]
    keys = set(fam.reads) | set(run.method.reads) | {"method"} | (set(run.method.search_reads) if run.search else set())
    return {k for k in keys if fam.model_keys.get(k) is None or run["model"] in fam.model_keys[k]}


def check_data(runs) -> None:
    """Raise ConfigError (with install instructions) if a dataset a run needs is missing.

    Example:
        >>> check_data(expand({"base": {"data": "digits"}}))
    """
    for fam_name, data in sorted({(r.method.family, r["data"]) for r in runs}):
        fam = FAMILIES[fam_name]
        try:
            if fam.check_data is not None:
                fam.check_data(data)
        except (ImportError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"data = {data!r} is not available: {e}") from None


def load_study(source, *, name: str | None = None, check: bool = True) -> Study:
    """Read (TOML path) or take (dict) a study, validate everything, and expand its runs.
    ``check=False`` skips the check that the datasets are installed.

    Example:
        >>> load_study({"name": "x", "include": [{"method": "float"}]}).runs[0].method.name
        'float'
    """
    path = None
    if isinstance(source, (str, pathlib.Path)):
        path = pathlib.Path(source)
        if not path.is_file():
            raise ConfigError(f"study file not found: {path}")
        try:
            cfg = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
    elif isinstance(source, Mapping):
        cfg = copy.deepcopy(dict(source))
    else:
        raise ConfigError(f"a study is a TOML path or a dict, got {type(source).__name__}")
    for k in cfg:
        if k not in TOP_LEVEL:
            raise ConfigError(f"unknown top-level key {k!r}; allowed: {_allowed(TOP_LEVEL)}")
    study_name = name or cfg.get("name") or (path.stem if path else None)
    if not study_name or not re.fullmatch(r"[\w.-]+", str(study_name)):
        raise ConfigError(f"name = {study_name!r}: a study needs a name of letters, digits, '_', '-', '.'")
    batch = cfg.get("batch", False)
    if not isinstance(batch, bool):
        raise ConfigError(f"batch = {batch!r} must be true or false")
    rule_sets = _rule_sets(cfg.get("rule_sets"))
    runs = expand(cfg, rule_sets)
    if not runs:
        raise ConfigError("the study expands to no runs")
    if check:
        check_data(runs)
    return Study(name=str(study_name), runs=tuple(runs), rule_sets=rule_sets,
                 description=str(cfg.get("description", "")), batch=batch, source=str(path) if path else None)


def schema_table() -> str:
    """Every study key as a markdown table: key, default, meaning, and the methods that read it
    (``all``: every method of the families that read it).

    Example:
        >>> print(schema_table().splitlines()[2])
        | `method` | `"ptq_rtn"` | what to run: see the methods table | all |
    """

    def readers(key):
        fams = [f for f in FAMILIES.values() if key in f.reads]
        names = sorted({f"{m.name} ({m.family})" for m in REGISTRY.values() if key in m.reads and
                        m.family not in {f.name for f in fams}})
        parts = [f"all {f.name}" + (f" ({', '.join(f.model_keys[key])})" if key in f.model_keys else "")
                 for f in fams]
        if key == "method":
            return "all"
        if key in SPEC_KEYS:
            return "every method but float"
        if key in SEARCH_KEYS:
            return "searched runs of " + ", ".join(names)
        searched = sorted({f"{m.name} ({m.family})" for m in REGISTRY.values()
                           if key in m.search_reads and key not in m.reads})
        return ", ".join(parts + names + (["searched runs of " + ", ".join(searched)] if searched else []))

    lines = ["| key | default | meaning | read by |", "|---|---|---|---|"]
    for k, spec in KEYS.items():
        lines.append(f"| `{k}` | `{json.dumps(spec.default)}` | {spec.doc} | {readers(k)} |")
    return "\n".join(lines)


def methods_table() -> str:
    """Every registered method as a markdown table: family, name, what it does, the keys it reads beyond
    its family's (the precision keys are abbreviated as "spec keys", the budget keys as "search keys").

    Example:
        >>> print(methods_table().splitlines()[2])
        | image | `float` | The float model: trained, evaluated on the test split. | |
    """
    lines = ["| family | method | what it does | reads, beyond its family's keys |", "|---|---|---|---|"]
    for (family, name), m in sorted(REGISTRY.items()):
        keys = [k for k in m.reads if k not in SPEC_KEYS and k not in SEARCH_KEYS]
        searches = set(SEARCH_KEYS) <= set(m.reads)
        reads = ", ".join((["spec keys"] if m.quantizes else []) + (["search keys"] if searches else [])
                          + [f"`{k}`" for k in keys])
        lines.append(f"| {family} | `{name}` | {m.doc.replace('``', '`')} | {reads} |".replace("|  |", "| |"))
    return "\n".join(lines)
