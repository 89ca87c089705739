"""Studies: a TOML file (or a dict) -> a validated list of runs, each a flat dict with a hash.

A study file::

    name = "quickstart"                 # default: the file's stem; results go to results/<name>/
    description = "int bits x group size on digits"

    [base]                              # every run starts from DEFAULTS, then these
    model = "mlp"
    hidden = [128, 128]
    data = "digits"
    steps = 400

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

Weight specs are composed from ``format`` (``"int"`` + ``bits``, or any format name such as
``"fp8_e4m3"``/``"nf4"``/``"mxfp4"``), ``granularity`` (``tensor``, ``ch``, ``g<N>``), ``symmetric``
and ``range``, unless ``weight`` gives a whole spec string. Runs of method ``float`` drop every
quantization key (so they are not repeated across a precision grid). Everything is checked before
anything runs; errors name the key, the run and the allowed values.

Example:
    >>> runs = expand({"base": {"steps": 10}, "sweep": {"bits": [8, 4], "method": ["float", "ptq_rtn"]}})
    >>> [(r["method"], r["weight"]) for r in runs]
    [('float', None), ('ptq_rtn', 'int8/ch'), ('ptq_rtn', 'int4/ch')]
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
from typing import Any, Mapping

__all__ = [
    "DEFAULTS",
    "BUILTIN_RULE_SETS",
    "ConfigError",
    "Study",
    "load_study",
    "expand",
    "config_hash",
    "weight_spec",
    "resolve_rules",
]

#: Every run key, with its default. A study may set only these (in [base], [sweep], [[include]]).
DEFAULTS: dict[str, Any] = {
    "method": "ptq_rtn",  # float | ptq_rtn | qat | qat_lsq | ptq_gptq | ptq_awq | ptq_hqq | ptq_smoothquant
    "model": "mlp",  # mlp | cnn
    "hidden": [128, 128],  # MLP hidden sizes (model = "mlp")
    "data": "digits",  # digits | fashion_mnist
    "train_size": 0,  # 0: the whole training split; N: its first N examples (small studies)
    "steps": 300,  # float training steps
    "batch_size": 64,
    "learning_rate": 3e-3,
    "qat_steps": 100,  # QAT fine-tuning steps, starting from the float model
    "qat_learning_rate": 1e-3,
    "calibration_size": 512,  # calibration images for ptq_gptq / ptq_awq / ptq_smoothquant
    "format": "int",  # "int" (+ bits) or a format / preset name: fp8_e4m3, nf4, fp4_e2m1, mxfp4, ...
    "bits": 8,  # for format = "int"
    "granularity": "ch",  # tensor | ch | g<N> (groups along the input axis)
    "symmetric": True,
    "range": "absmax",  # absmax | minmax | mse | p<q> (e.g. p99.9)
    "clip_ratio": 1.0,  # (0, 1]: weight range multiplied by this (ptq_rtn, qat); kept in a run only when < 1
    "weight": None,  # a whole weight spec string; overrides format/bits/granularity/symmetric/range
    "act": "none",  # activation spec or "none"
    "rules": "all",  # a rule set name: built-in (all, first_last_8bit) or one of [rule_sets]
    "seed": 0,
    # language models (model = "gemma3" | "gemma3_tiny"; dropped from the runs of image models)
    "eval_tokens": 1024,  # perplexity over the first N tokens (BOS + text) of the data text
    "calibration": "emma",  # calibration text (ptq_gptq / ptq_awq): an Austen novel name or "tiny_text"
    "calibration_seqs": 32,  # calibration windows ...
    "calibration_len": 256,  # ... of this many tokens (BOS + text), at fixed random offsets (seed 0)
    "act_order": False,  # ptq_gptq: quantize columns in order of decreasing Hessian diagonal
    "sequential": True,  # ptq_gptq / ptq_awq: calibrate block by block on the already-quantized predecessors
}

#: Keys that only matter to quantized methods: a ``float`` run has them all set to None.
QUANT_KEYS = ("qat_steps", "qat_learning_rate", "calibration_size", "format", "bits", "granularity", "symmetric", "range",
              "clip_ratio", "weight", "act", "rules", "calibration", "calibration_seqs", "calibration_len", "act_order",
              "sequential")
#: Methods that read ``clip_ratio`` (STE weight quantizers with a range to clip).
CLIP_METHODS = ("ptq_rtn", "qat")
#: Keys that are read only by QAT methods.
QAT_KEYS = ("qat_steps", "qat_learning_rate")

MODELS = ("mlp", "cnn", "gemma3", "gemma3_tiny")
DATASETS = ("digits", "fashion_mnist", "austen", "tiny_text")
#: Language models (evaluated by perplexity), their texts and methods.
LM_MODELS = ("gemma3", "gemma3_tiny")
LM_DATASETS = ("austen", "tiny_text")  # austen: Pride and Prejudice (evaluation text)
LM_METHODS = ("float", "ptq_rtn", "ptq_gptq", "ptq_awq", "ptq_hqq")
LM_CALIBRATION = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion", "tiny_text")
#: Keys only language models read (removed from image-model runs: their hashes do not change).
LM_KEYS = ("eval_tokens", "calibration", "calibration_seqs", "calibration_len", "act_order", "sequential")
#: Keys only image models read (None in language-model runs).
IMAGE_KEYS = ("hidden", "train_size", "steps", "batch_size", "learning_rate", "calibration_size")
TOP_LEVEL = ("name", "description", "base", "sweep", "include", "rule_sets", "batch")

#: Built-in rule sets. Patterns are regexes over layer paths (``layers/0``, ``head``, ``convs/1``...; matched with re.fullmatch);
#: ``@first`` / ``@last`` stand for the first / last quantizable layer. ``$weight`` / ``$act`` are
#: replaced by the run's weight / activation specs; ``"none"`` keeps a layer float.
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


@dataclasses.dataclass
class Study:
    """A validated study: its name, its runs (flat dicts with ``config_hash``) and rule sets.

    Example:
        >>> s = load_study({"name": "t", "sweep": {"bits": [8, 4]}})
        >>> s.name, len(s.runs)
        ('t', 2)
    """

    name: str
    runs: list[dict]
    rule_sets: dict[str, list[dict]]
    description: str = ""
    batch: bool = False
    source: str | None = None


# --------------------------------------------------------------------------- helpers


def _allowed(keys) -> str:
    return ", ".join(sorted(keys))


def _methods() -> list[str]:
    from . import methods

    return sorted(methods.REGISTRY)


def weight_spec(run: Mapping[str, Any]) -> str | None:
    """The run's weight spec string (canonical form), from ``weight`` or the composing keys.

    Example:
        >>> weight_spec({**DEFAULTS, "bits": 4, "granularity": "g32", "symmetric": False})
        'int4/g32/asym'
    """
    from qlab.numerics import parse_spec

    if run.get("method") == "float":
        return None
    if run.get("weight") not in (None, ""):
        w = str(run["weight"])
        return None if w.lower() == "none" else str(parse_spec(w))
    fmt = str(run["format"])
    head = f"int{int(run['bits'])}" if fmt in ("int", "uint") else fmt
    if fmt == "uint":
        head = "u" + head
    toks = [head, str(run["granularity"]), "sym" if run["symmetric"] else "asym", str(run["range"])]
    return str(parse_spec("/".join(toks)))


def config_hash(run: Mapping[str, Any]) -> str:
    """12 hex digits of SHA-256 over the run's canonical JSON (``config_hash`` key excluded).

    Example:
        >>> config_hash({"a": 1}) == config_hash({"a": 1.0}) or True
        True
    """
    payload = {k: v for k, v in run.items() if k != "config_hash"}
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _check_type(key: str, value, where: str):
    default = DEFAULTS[key]
    ok = True
    if key in ("weight",):
        ok = value is None or isinstance(value, str)
    elif key == "hidden":
        ok = isinstance(value, list) and all(isinstance(v, int) and v > 0 for v in value)
    elif key in ("train_size",):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool) and value > 0 or (key == "seed" and isinstance(value, int) and value >= 0)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    elif isinstance(default, str):
        ok = isinstance(value, str)
    if not ok:
        kind = {"hidden": "a list of positive integers", "weight": "a spec string"}.get(
            key,
            "true or false" if isinstance(default, bool)
            else "a positive integer" if isinstance(default, int)
            else "a positive number" if isinstance(default, float) else "a string",
        )
        raise ConfigError(f"{where}: {key} = {value!r} must be {kind}")


def _check_keys(table: Mapping, where: str):
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table of run keys, got {type(table).__name__}")
    for k in table:
        if k not in DEFAULTS:
            raise ConfigError(f"{where}: unknown key {k!r}; allowed: {_allowed(DEFAULTS)}")


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
                re.compile(r["pattern"].replace("@first", "").replace("@last", ""))
            except re.error as e:
                raise ConfigError(f"rule_sets.{name}[{i}].pattern {r['pattern']!r}: bad regex: {e}") from None
            clean.append({"pattern": r["pattern"], "weight": r.get("weight", "$weight"), "act": r.get("act", "$act")})
        sets[name] = clean
    return sets


def resolve_rules(run: Mapping[str, Any], rule_sets: Mapping[str, list[dict]] | None = None) -> list[dict]:
    """The run's rule list with ``$weight``/``$act`` substituted: ``[{pattern, weight, act}]``
    where weight/act are canonical spec strings or None (float).

    Example:
        >>> resolve_rules({**DEFAULTS, "bits": 4, "rules": "first_last_8bit"})[0]
        {'pattern': '@first|@last', 'weight': 'int8/ch', 'act': None}
    """
    from qlab.numerics import parse_spec

    sets = rule_sets if rule_sets is not None else BUILTIN_RULE_SETS
    name = run.get("rules") or "all"
    w, a = weight_spec(run), run.get("act")
    a = None if a in (None, "none", "") else str(parse_spec(a))
    out = []
    for r in sets[name]:
        def sub(v, own):
            if v in (None, False, "none", ""):
                return None
            if v == "$weight":
                return w
            if v == "$act":
                return a
            return str(parse_spec(v))

        out.append({"pattern": r["pattern"], "weight": sub(r.get("weight", "$weight"), w), "act": sub(r.get("act", "$act"), a)})
    return out


# --------------------------------------------------------------------------- validation of one run


def _validate_run(run: dict, where: str, rule_sets: Mapping[str, list[dict]]):
    from qlab.numerics import parse_spec

    for k, v in run.items():
        if v is None and (k in QUANT_KEYS or k == "weight"):
            continue
        _check_type(k, v, where)
    methods = _methods()
    if run["method"] not in methods:
        raise ConfigError(f"{where}: method = {run['method']!r} is unknown; allowed: {', '.join(methods)}")
    if run["model"] not in MODELS:
        raise ConfigError(f"{where}: model = {run['model']!r} is unknown; allowed: {', '.join(MODELS)}")
    if run["data"] not in DATASETS:
        raise ConfigError(f"{where}: data = {run['data']!r} is unknown; allowed: {', '.join(DATASETS)}")
    lm = run["model"] in LM_MODELS
    if lm and run["data"] not in LM_DATASETS:
        raise ConfigError(f"{where}: model = {run['model']!r} is a language model; data = {run['data']!r} must be "
                          f"a text: {', '.join(LM_DATASETS)}")
    if not lm and run["data"] in LM_DATASETS:
        raise ConfigError(f"{where}: data = {run['data']!r} is a text; model = {run['model']!r} needs images "
                          f"({', '.join(d for d in DATASETS if d not in LM_DATASETS)}), or use a language model: "
                          f"{', '.join(LM_MODELS)}")
    if lm and run["method"] not in LM_METHODS:
        raise ConfigError(f"{where}: method = {run['method']!r} is not supported for language models; "
                          f"allowed: {', '.join(LM_METHODS)}")
    if lm and run["calibration"] not in LM_CALIBRATION:
        raise ConfigError(f"{where}: calibration = {run['calibration']!r} is unknown; allowed: {_allowed(LM_CALIBRATION)}")
    if run["method"] == "float":
        return
    if run["rules"] not in rule_sets:
        raise ConfigError(f"{where}: rules = {run['rules']!r} is unknown; allowed: {_allowed(rule_sets)}")
    if not 0 < run["clip_ratio"] <= 1:
        raise ConfigError(f"{where}: clip_ratio = {run['clip_ratio']!r} must be in (0, 1] (1: the full range)")
    if run["clip_ratio"] != 1 and (run["method"] not in CLIP_METHODS or lm):
        raise ConfigError(f"{where}: clip_ratio = {run['clip_ratio']!r} applies to methods {', '.join(CLIP_METHODS)} "
                          f"on image models only, not {run['method']!r} on {run['model']!r}; allowed here: 1.0")
    if run.get("weight") in (None, ""):
        fmt = run["format"]
        if fmt not in ("int", "uint"):
            try:
                parse_spec(fmt)
            except ValueError as e:
                raise ConfigError(f"{where}: format = {fmt!r} is not a format: {e}") from None
        if fmt in ("int", "uint") and not 2 <= run["bits"] <= 16:
            raise ConfigError(f"{where}: bits = {run['bits']!r} must be between 2 and 16 for format 'int'")
        g = str(run["granularity"])
        if not re.fullmatch(r"tensor|ch-?\d*|g\d+(a-?\d+)?p?|b\d+x\d+", g):
            raise ConfigError(f"{where}: granularity = {g!r} is not one of: tensor, ch, g<N> (e.g. g32), b<R>x<C>")
        try:
            weight_spec(run)
        except ValueError as e:
            raise ConfigError(
                f"{where}: the weight spec composed from format/bits/granularity/symmetric/range is invalid "
                f"(range = {run['range']!r}): {e}"
            ) from None
    else:
        try:
            parse_spec(run["weight"]) if str(run["weight"]).lower() != "none" else None
        except ValueError as e:
            raise ConfigError(f"{where}: weight = {run['weight']!r} is not a valid spec: {e}") from None
    if run.get("act") not in (None, "none", ""):
        try:
            parse_spec(run["act"])
        except ValueError as e:
            raise ConfigError(f"{where}: act = {run['act']!r} is not a valid spec: {e}") from None
    try:
        resolve_rules(run, rule_sets)
    except ValueError as e:
        raise ConfigError(f"{where}: rule set {run['rules']!r} has an invalid spec: {e}") from None


def _normalize(run: dict) -> dict:
    """Canonical run: float runs drop quantization keys; PTQ runs drop QAT keys; spec strings resolved."""
    run = dict(run)
    if run["method"] == "float":
        for k in QUANT_KEYS:
            run[k] = None
    else:
        if not run["method"].startswith("qat"):
            for k in QAT_KEYS:
                run[k] = None
        if run["method"] not in ("ptq_gptq", "ptq_awq", "ptq_smoothquant"):
            run["calibration_size"] = None
        run["weight"] = weight_spec(run)
        if run.get("act") in (None, "", "none"):
            run["act"] = "none"
    if run.get("clip_ratio") in (None, 1):  # the default: not part of the run (older results keep their hashes)
        run.pop("clip_ratio", None)
    else:
        run["clip_ratio"] = float(run["clip_ratio"])
    if run["model"] != "mlp":
        run["hidden"] = None
    if run["model"] in LM_MODELS:
        for k in IMAGE_KEYS:
            run[k] = None
        if run["method"] != "ptq_gptq":
            run["act_order"] = None
        if run["method"] not in ("ptq_gptq", "ptq_awq"):
            for k in ("calibration", "calibration_seqs", "calibration_len", "sequential"):
                run[k] = None
    else:
        for k in LM_KEYS:
            run.pop(k, None)
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
        keys = list(t)
        values = []
        for k in keys:
            v = t[k]
            if not isinstance(v, list) or not v or (k == "hidden" and not isinstance(v[0], list)):
                raise ConfigError(f"{where}: {k} must be a non-empty list of values to sweep, got {v!r}")
            values.append(v)
        out.extend(dict(zip(keys, combo)) for combo in itertools.product(*values))
    return out


def expand(cfg: Mapping[str, Any], rule_sets: Mapping[str, list[dict]] | None = None) -> list[dict]:
    """Expand a study dict into validated, normalized, de-duplicated runs (each with ``config_hash``).

    Example:
        >>> runs = expand({"sweep": {"granularity": ["ch", "g16"]}})
        >>> [r["weight"] for r in runs]
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
    points = _grids(cfg.get("sweep")) if cfg.get("sweep") is not None or not includes else []
    points += [dict(inc) for inc in includes]
    runs, seen = [], set()
    for i, p in enumerate(points):
        run = {**copy.deepcopy(DEFAULTS), **copy.deepcopy(base), **p}
        label = ", ".join(f"{k}={v!r}" for k, v in p.items())
        where = f"run {i + 1} ({label or 'base'})"
        _validate_run(run, where, rule_sets)
        run = _normalize(run)
        if run["method"] != "float" and run["rules"] not in BUILTIN_RULE_SETS:
            # a user-defined rule set is part of the run's identity: hash its resolved content
            run["rules_def"] = json.dumps(resolve_rules(run, rule_sets), sort_keys=True)
        h = config_hash(run)
        if h in seen:
            continue
        seen.add(h)
        run["config_hash"] = h
        runs.append(run)
    return runs


def check_data(runs: list[dict]):
    """Raise ConfigError (with install instructions) if a dataset a run needs is missing.

    Example:
        >>> check_data([{"data": "digits"}])
    """
    for name in sorted({r["data"] for r in runs}):
        try:
            if name == "digits":
                import sklearn.datasets  # noqa: F401
            elif name == "fashion_mnist":
                from qlab.data import load_fashion_mnist

                load_fashion_mnist("test")
            elif name == "austen":
                from qlab.data.text import load_austen

                load_austen("prideprejudice")
        except (ImportError, FileNotFoundError, OSError) as e:
            raise ConfigError(f"data = {name!r} is not available: {e}") from None


def load_study(source, *, name: str | None = None, check: bool = True) -> Study:
    """Read (TOML path) or take (dict) a study, validate everything, and expand its runs.

    Example:
        >>> load_study({"name": "x", "include": [{"method": "float"}]}).runs[0]["method"]
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
    rule_sets = _rule_sets(cfg.get("rule_sets"))
    runs = expand(cfg, rule_sets)
    if not runs:
        raise ConfigError("the study expands to no runs")
    if check:
        check_data(runs)
    batch = cfg.get("batch", False)
    if not isinstance(batch, bool):
        raise ConfigError(f"batch = {batch!r} must be true or false")
    return Study(
        name=str(study_name), runs=runs, rule_sets=rule_sets, description=str(cfg.get("description", "")),
        batch=batch, source=str(path) if path else None,
    )
