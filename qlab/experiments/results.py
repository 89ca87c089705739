"""Result storage: one JSON file per finished run, written atomically; CSV tables rebuilt from them.

Layout of ``results/<study>/``::

    runs/<config_hash>.json   one finished run: {"row": {...config, metrics, meta}, "layers": [...] | null}
    runs/<config_hash>.claim  a run some sweep is working on now (removed when it finishes or stops)
    runs.csv                  one row per run of the current study (rebuilt from runs/*.json)
    layers.csv                per-layer rows (config_hash, method, weight, ... + layer columns)
    study.json                the expanded study (names, runs)
    *.png                     plots

A run's JSON is written to a temporary file in the same folder, flushed, fsync'ed and then
``os.replace``'d into place, so a process killed at any instant leaves either the complete file or
none (stray ``*.tmp`` files are ignored and cleaned up). Tables are rebuilt the same way, and an empty or
corrupted ``runs.csv`` is rebuilt from the run records. A sweep claims a run (an exclusively created
``.claim`` file) before starting it, so two sweeps on one folder never do the same run; a claim whose
process is gone (same host) or that is older than ``QLAB_CLAIM_TTL`` seconds (default 6 h) is taken over.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> write_run(d, {"config_hash": "abc", "accuracy": 0.5})
    >>> [r["row"]["accuracy"] for r in read_runs(d)]
    [0.5]
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import socket
import tempfile
import time
from typing import Any, Iterable, Mapping

import pandas as pd

from qlab.numerics import parse_spec

__all__ = ["study_times", "write_run", "read_runs", "atomic_write_text", "rebuild_tables", "load_results", "runs_dir", "setting_label",
           "method_labels", "method_table", "markdown_table", "result_row", "claim_run", "release_run", "compare_tables",
           "spearman", "predictor_table", "sensitivity_from_layers", "seed_stats", "range_labels", "range_table",
           "RANGE_ORDER"]


def runs_dir(out) -> pathlib.Path:
    return pathlib.Path(out) / "runs"


def atomic_write_text(path, text: str):
    """Write ``text`` to ``path`` atomically (temp file in the same folder + fsync + ``os.replace``).

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> atomic_write_text(p, "hi"); p.read_text()
        'hi'
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if hasattr(v, "item") and not isinstance(v, (list, dict, str)):
        return _clean(v.item())
    return v


def write_run(out, row: Mapping[str, Any], layers: Iterable[Mapping[str, Any]] | None = None):
    """Store one finished run as ``runs/<row['config_hash']>.json`` (atomic)."""
    payload = {
        "row": {k: _clean(v) for k, v in row.items()},
        "layers": None if layers is None else [{k: _clean(v) for k, v in r.items()} for r in layers],
    }
    atomic_write_text(runs_dir(out) / f"{row['config_hash']}.json", json.dumps(payload, indent=1, default=str))


def _abandoned(tmp: pathlib.Path) -> bool:
    """A temp file whose writer (pid in its name) is gone, or that is older than 10 minutes; a live
    writer's (another sweep on this folder) is left alone."""
    parts = tmp.name.split(".")
    pid = next((int(p) for p in parts[2:-1] if p.isdigit()), None)
    if time.time() - tmp.stat().st_mtime > 600 or pid is None:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return pid == os.getpid()  # ours and not being written now (writes are synchronous)


def read_runs(out, hashes: Iterable[str] | None = None) -> list[dict]:
    """Every complete run JSON under ``out/runs`` (only ``hashes`` if given), sorted by file name.
    Stale temp files are removed."""
    d = runs_dir(out)
    if not d.is_dir():
        return []
    for tmp in d.glob(".*.tmp"):
        try:
            if _abandoned(tmp):
                tmp.unlink()
        except OSError:
            pass
    want = None if hashes is None else set(hashes)
    runs = []
    for p in sorted(d.glob("*.json")):
        if want is not None and p.stem not in want:
            continue
        try:
            runs.append(json.loads(p.read_text()))
        except (json.JSONDecodeError, OSError):
            continue  # cannot happen with atomic writes; a hand-edited file is skipped, the run redone
    return runs


def _frames(records: list[dict], order: list[str] | None = None):
    if order is not None:
        rank = {h: i for i, h in enumerate(order)}
        records = sorted(records, key=lambda r: rank.get(r["row"].get("config_hash"), len(rank)))
    rows = [r["row"] for r in records]
    runs = pd.DataFrame(rows)
    if order is not None and len(runs):
        rank = {h: i for i, h in enumerate(order)}
        runs = runs.assign(_o=runs["config_hash"].map(rank)).sort_values("_o").drop(columns="_o").reset_index(drop=True)
    layer_rows = []
    keys = ("config_hash", "method", "weight", "rules", "seed")
    for r in records:
        for lr in r.get("layers") or []:
            layer_rows.append({**{k: r["row"].get(k) for k in keys}, **lr})
    layers = pd.DataFrame(layer_rows)
    for df in (runs, layers):
        for c in df.columns:
            if df[c].dtype == object and df[c].isin(["inf", "-inf"]).any():
                df[c] = df[c].replace({"inf": math.inf, "-inf": -math.inf})
    return runs, layers


def rebuild_tables(out, hashes: list[str] | None = None):
    """Rebuild ``runs.csv`` and ``layers.csv`` from the run JSONs (those in ``hashes``, in that order).
    Returns ``(runs_df, layers_df)``."""
    records = read_runs(out, hashes)
    runs, layers = _frames(records, hashes)
    out = pathlib.Path(out)
    atomic_write_text(out / "runs.csv", runs.to_csv(index=False))
    if len(layers):
        atomic_write_text(out / "layers.csv", layers.to_csv(index=False))
    return runs, layers


def load_results(out, layers: bool = False):
    """Read a study's ``runs.csv`` (and ``layers.csv`` with ``layers=True``) as DataFrames. ``out`` is a folder
    or a study name under ``results/``. An empty or corrupted ``runs.csv`` is rebuilt from ``runs/*.json``.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> write_run(d, {"config_hash": "abc", "accuracy": 0.5})
        >>> _ = open(f"{d}/runs.csv", "w").write('config_hash,acc\\n"abc')   # a torn file
        >>> load_results(d)["accuracy"].tolist()
        [0.5]
    """
    p = pathlib.Path(out)
    if not p.is_dir() and (pathlib.Path("results") / str(out)).is_dir():
        p = pathlib.Path("results") / str(out)
    try:
        runs = pd.read_csv(p / "runs.csv")
        if "config_hash" not in runs:
            raise ValueError("no config_hash column")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, ValueError, UnicodeDecodeError, FileNotFoundError) as e:
        if not runs_dir(p).is_dir():
            raise FileNotFoundError(f"{p}: no readable runs.csv ({e}) and no runs/ records to rebuild it from") from None
        study = p / "study.json"
        order = None
        if study.is_file():
            order = [r["config_hash"] for r in json.loads(study.read_text()).get("runs", []) if "config_hash" in r]
        runs, _ = rebuild_tables(p, order)
    if not layers:
        return runs
    lp = p / "layers.csv"
    return runs, (pd.read_csv(lp) if lp.is_file() and lp.stat().st_size else pd.DataFrame())


def result_row(study: str, run, metrics: Mapping[str, Any], meta: Mapping[str, Any], wall_s: float) -> dict:
    """One row of ``runs.csv``: the study's name, the run's hash and config columns (written from its typed
    values: :meth:`qlab.experiments.Run.columns`), its metrics, wall time and the environment.

    Example:
        >>> from qlab.experiments import expand
        >>> row = result_row("s", expand({"base": {"bits": 4}})[0], {"accuracy": 0.9}, {}, 1.0)
        >>> row["weight"], row["bits"], row["accuracy"]
        ('int4/ch', 4, 0.9)
    """
    return {
        "study": study,
        "config_hash": run.config_hash,
        **run.columns(),
        **dict(metrics),
        "wall_s": wall_s,
        **dict(meta),
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _claim_path(out, config_hash: str) -> pathlib.Path:
    return runs_dir(out) / f"{config_hash}.claim"


def _stale(claim: Mapping[str, Any]) -> bool:
    ttl = float(os.environ.get("QLAB_CLAIM_TTL", 6 * 3600))
    if time.time() - float(claim.get("time", 0)) > ttl:
        return True
    if claim.get("host") == socket.gethostname():
        try:
            os.kill(int(claim["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, KeyError, ValueError, TypeError):
            return False
    return False


def claim_run(out, config_hash: str) -> bool:
    """Claim a run for this process before starting it: True if claimed, False if another live sweep holds it.
    A claim left by a process that is gone (same host) or older than ``QLAB_CLAIM_TTL`` seconds is taken over.

    Example:
        >>> import tempfile
        >>> d = tempfile.mkdtemp()
        >>> claim_run(d, "abc"), claim_run(d, "abc")
        (True, False)
        >>> release_run(d, "abc"); claim_run(d, "abc")
        True
    """
    path = _claim_path(out, config_hash)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                claim = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                claim = {}  # being written right now, or torn: judged by its age
                claim["time"] = path.stat().st_mtime if path.exists() else 0
            if not _stale(claim):
                return False
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(body)
        return True
    return False


def release_run(out, config_hash: str) -> None:
    """Remove this process's claim on a run (finished, failed or interrupted).

    Example:
        >>> import tempfile
        >>> release_run(tempfile.mkdtemp(), "nothing")  # no claim: nothing to do
    """
    try:
        _claim_path(out, config_hash).unlink()
    except FileNotFoundError:
        pass


def compare_tables(table, reference, *, metrics=("accuracy", "perplexity", "bits_per_weight", "model_bytes"),
                   atol: float = 0.005):
    """Compare a study's table with a reference table, run by run (``config_hash``): ``(ok, lines)`` where
    ``ok`` says every run of ``table`` is in the reference with every shared metric within ``atol``
    (relative for perplexity), and ``lines`` say what differs.

    Example:
        >>> a = pd.DataFrame({"config_hash": ["x", "y"], "accuracy": [0.9, 0.8]})
        >>> compare_tables(a, a.assign(accuracy=[0.9, 0.7]))
        (False, ['y accuracy: 0.8 vs reference 0.7'])
    """
    ref = reference.set_index("config_hash")
    lines = []
    for _, row in table.iterrows():
        h = row["config_hash"]
        if h not in ref.index:
            lines.append(f"{h}: not in the reference")
            continue
        for m in metrics:
            if m not in row or m not in ref.columns or pd.isna(row[m]) and pd.isna(ref.at[h, m]):
                continue
            a, b = float(row[m]), float(ref.at[h, m])
            tol = atol * abs(b) if m == "perplexity" else (0 if m in ("bits_per_weight", "model_bytes") else atol)
            if not abs(a - b) <= tol + 1e-12:
                lines.append(f"{h} {m}: {a:.6g} vs reference {b:.6g}")
    return not lines, lines


def setting_label(weight) -> str:
    """A short label for a weight spec: bits (or format) and granularity, e.g. ``"W4 g128"``, ``"W8 ch"``,
    ``"float"``; symmetry, range and zero-point options are dropped (so HQQ's asymmetric spec shares its row).

    Example:
        >>> setting_label("int4/g128/asym/zp=float"), setting_label("int8/ch"), setting_label(None)
        ('W4 g128', 'W8 ch', 'float')
    """
    if weight is None or (isinstance(weight, float) and math.isnan(weight)) or weight in ("", "none", "float"):
        return "float"
    if "(" in str(weight):  # a mixed run, labelled by its rule set: "first_last_8bit(int2/ch)"
        return str(weight)
    parts = str(parse_spec(str(weight))).split("/")
    head = "W" + parts[0][3:] if parts[0].startswith("int") else parts[0]
    return f"{head} {parts[1]}" if len(parts) > 1 else head


def method_labels(table) -> list[str]:
    """The ``method`` column with GPTQ's act-order runs named apart (``"ptq_gptq act-order"``) and language-model
    QAT by its start (``"qat from gptq"``), for tables and plot series.

    Example:
        >>> import pandas as pd
        >>> method_labels(pd.DataFrame({"method": ["ptq_gptq", "ptq_gptq", "qat"], "act_order": [False, True, None]}))
        ['ptq_gptq', 'ptq_gptq act-order', 'qat']
        >>> method_labels(pd.DataFrame({"method": ["qat", "qat"], "qat_init": ["rtn", "gptq"]}))
        ['qat from rtn', 'qat from gptq']
    """
    none = [None] * len(table)
    act = table["act_order"] if "act_order" in table else none
    init = table["qat_init"] if "qat_init" in table else none
    return [f"{m} act-order" if m == "ptq_gptq" and str(a).lower() in ("true", "1", "1.0")
            else f"{m} from {i}" if m == "qat" and isinstance(i, str) else m
            for m, a, i in zip(table["method"], act, init)]


def method_table(table, metric: str = "perplexity", digits: int = 4):
    """Pivot a study's runs into ``setting x method``: one row per weight setting (:func:`setting_label`),
    one column per method (``ptq_gptq`` with ``act_order`` true becomes ``ptq_gptq act-order``), cells the
    ``metric`` rounded to ``digits`` significant digits; the float run, if any, is its own row. Rows whose
    ``collapsed`` column is true (a perplexity above the vocabulary size) read ``collapsed``.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"method": ["float", "ptq_rtn", "ptq_gptq", "ptq_gptq"], "weight": [None] + ["int4/ch"] * 3,
        ...                   "act_order": [None, None, False, True], "perplexity": [17.26, 64.6, 25.8, 23.6]})
        >>> method_table(t).loc["W4 ch", ["ptq_rtn", "ptq_gptq", "ptq_gptq act-order"]].tolist()
        [64.6, 25.8, 23.6]
        >>> method_table(t).loc["float", "float"]
        np.float64(17.26)
        >>> method_table(t.assign(collapsed=[False, True, False, False])).loc["W4 ch", "ptq_rtn"]
        'collapsed'
    """
    t = table.copy()
    t["setting"] = [setting_label(w) for w in t.get("weight", [None] * len(t))]
    t["method"] = method_labels(t)
    t[metric] = [float(f"{v:.{digits}g}") for v in t[metric]]
    if "collapsed" in t:
        t[metric] = [("collapsed" if c is True or c == 1 else v) for v, c in zip(t[metric], t["collapsed"])]
    piv = t.pivot_table(index="setting", columns="method", values=metric, aggfunc="first", sort=False)
    cols = [c for c in ["float", "ptq_rtn", "ptq_gptq", "ptq_gptq act-order", "ptq_awq", "ptq_hqq", "ptq_smoothquant"]
            if c in piv.columns]
    piv = piv[cols + [c for c in piv.columns if c not in cols]]
    piv.columns.name = None
    return piv


def seed_stats(table, metric: str = "accuracy", by=None, *, scale: float = 1.0, digits: int = 1) -> pd.DataFrame:
    """Runs that differ only in ``seed`` folded into one row per configuration: the ``by`` columns, ``n`` (runs),
    ``mean`` and ``std`` (sample standard deviation, ddof 1; NaN for a single run) of ``metric`` times ``scale``,
    and ``mean ± std``: the two as text with ``digits`` decimals (the mean alone for a single run). ``by``: the
    columns naming a configuration; default: the study keys (:data:`qlab.experiments.KEYS`) of ``table`` other
    than ``seed`` that take more than one value. Rows keep the order of their first run; NaN is a value.

    Example:
        >>> t = pd.DataFrame({"method": ["a", "a", "a", "b"], "seed": [0, 1, 2, 0], "accuracy": [0.5, 0.75, 1.0, 0.25]})
        >>> seed_stats(t, scale=100).values.tolist()
        [['a', 3, 75.0, 25.0, '75.0 ± 25.0'], ['b', 1, 25.0, nan, '25.0']]
    """
    if by is None:
        from .study import KEYS  # noqa: PLC0415 -- study imports nothing from here; kept lazy all the same

        by = [k for k in KEYS if k != "seed" and k in table and table[k].nunique(dropna=False) > 1]
    by = [by] if isinstance(by, str) else list(by)
    values = table[metric].astype(float) * scale
    if not by:
        groups = [((), values)]
    else:
        groups = [(k if isinstance(k, tuple) else (k,), g[metric].astype(float) * scale)
                  for k, g in table.groupby(by, sort=False, dropna=False)]
    rows = []
    for key, v in groups:
        mean, std = float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else math.nan)
        text = f"{mean:.{digits}f}" + ("" if math.isnan(std) else f" ± {std:.{digits}f}")
        rows.append([*key, len(v), mean, std, text])
    return pd.DataFrame(rows, columns=[*by, "n", "mean", "std", "mean ± std"])


#: the order range-setting tables list their ranges in (others follow, as first seen)
RANGE_ORDER = ("absmax", "minmax", "p99.9", "mse", "mse asym")


def range_labels(table) -> list[str]:
    """The range setting of each run as a range-setting study names it: the ``range`` token, with ``" asym"`` added
    for an asymmetric run of a symmetric-named range (``"mse asym"``; ``minmax`` is asymmetric by name: in qlab the
    token picks the method and ``symmetric`` the shape, and symmetric min-max is absmax); ``"float"`` for float runs.

    Example:
        >>> t = pd.DataFrame({"method": ["float", "ptq_rtn", "ptq_rtn", "ptq_rtn"], "range": [None, "mse", "mse", "minmax"],
        ...                   "symmetric": [None, True, False, False]})
        >>> range_labels(t)
        ['float', 'mse', 'mse asym', 'minmax']
    """
    sym = table["symmetric"] if "symmetric" in table else [True] * len(table)
    out = []
    for m, r, s in zip(table["method"], table["range"], sym):
        if m == "float" or not isinstance(r, str):
            out.append("float" if m == "float" else str(r))
        elif s is False or str(s).lower() in ("false", "0", "0.0"):
            out.append(r if r == "minmax" else f"{r} asym")
        else:
            out.append(r)
    return out


def range_table(table, metrics=("bits_per_weight", "perplexity", "ppl_ratio", "ppl_ratio_se", "kl", "top1")
                ) -> pd.DataFrame:
    """A range-setting study's runs, one row each: ``granularity``, ``bits``, ``range`` (:func:`range_labels`), the
    ``metrics`` present and ``collapsed``; float first, then per tensor before per channel before groups, bits from
    high to low, ranges in :data:`RANGE_ORDER`. Runs differing only in seed stay separate rows
    (:func:`seed_stats` folds them).

    Example:
        >>> t = pd.DataFrame({"method": ["ptq_rtn", "ptq_rtn", "float"], "granularity": ["ch", "tensor", None],
        ...                   "bits": [4, 4, None], "range": ["mse", "absmax", None], "symmetric": [True, True, None],
        ...                   "ppl_ratio": [1.2, 3.0, 1.0], "collapsed": [False, False, False]})
        >>> range_table(t, metrics=("ppl_ratio",))[["granularity", "range", "ppl_ratio"]].values.tolist()
        [['-', 'float', 1.0], ['tensor', 'absmax', 3.0], ['ch', 'mse', 1.2]]
    """
    t = table.assign(range=range_labels(table))
    t["granularity"] = [("-" if m == "float" else g) for m, g in zip(t["method"], t["granularity"])]
    seen = list(dict.fromkeys(t["range"]))
    r_key = {r: i for i, r in enumerate(["float", *RANGE_ORDER, *[r for r in seen if r not in RANGE_ORDER]])}

    def g_key(g):
        if g == "-":
            return (0, 0)
        if g == "tensor":
            return (1, 0)
        if g == "ch":
            return (2, 0)
        return (3, int(g[1:]) if str(g).startswith("g") and str(g)[1:].isdigit() else 0)

    bits = t["bits"].fillna(99).astype(float).tolist()
    keys = [(g_key(g), -b, r_key[r]) for g, b, r in zip(t["granularity"], bits, t["range"])]
    order = sorted(range(len(t)), key=keys.__getitem__)
    cols = ["granularity", "bits", "range", *[m for m in metrics if m in t], *(["collapsed"] if "collapsed" in t else [])]
    out = t.iloc[order][cols].reset_index(drop=True)
    out["bits"] = out["bits"].astype("Int64") if out["bits"].notna().any() else out["bits"]
    return out


def markdown_table(table, *, index: bool = False, floatfmt: str = ".4g") -> str:
    """``table`` as a GitHub markdown table (for results READMEs), missing values left blank.

    Example:
        >>> print(markdown_table(pd.DataFrame({"a": [1.5, None]})))
        |   a |
        |----:|
        | 1.5 |
        |     |
    """
    return table.astype(object).where(table.notna(), None).to_markdown(index=index, floatfmt=floatfmt, missingval="")


def spearman(x, y) -> float:
    """Spearman rank correlation of two equal-length sequences (ties share their mean rank; pairs with a NaN are
    dropped; NaN with fewer than 3 pairs or a constant side).

    Example:
        >>> round(spearman([1, 2, 3, 4], [10, 20, 15, 40]), 6)
        0.8
    """
    a = pd.DataFrame({"x": list(x), "y": list(y)}, dtype=float).dropna()
    if len(a) < 3 or a["x"].nunique() < 2 or a["y"].nunique() < 2:
        return math.nan
    rx, ry = a["x"].rank(), a["y"].rank()
    return float(rx.corr(ry))


def predictor_table(table) -> pd.DataFrame:
    """Check the search's predictor: for each method and sensitivity of a study's searched runs (rows with a
    ``predicted_damage``), the Spearman rank correlation between the predicted damage of the chosen allocation
    and the damage measured on the quantized model (``accuracy_drop`` or ``perplexity_increase``).

    Example:
        >>> t = pd.DataFrame({"method": ["ptq_rtn"] * 3, "rules": ["searched(sqnr)"] * 3,
        ...                   "predicted_damage": [3.0, 2.0, 1.0], "accuracy_drop": [0.3, 0.1, 0.2]})
        >>> predictor_table(t).values.tolist()
        [['ptq_rtn', 'sqnr', 3, 0.5]]
    """
    cols = ["method", "sensitivity", "runs", "spearman"]
    if "predicted_damage" not in table:
        return pd.DataFrame(columns=cols)
    measured = "accuracy_drop" if "accuracy_drop" in table else "perplexity_increase"
    t = table[table["predicted_damage"].notna()].copy()
    t["method"] = method_labels(t)
    t["sensitivity"] = t["rules"].str.extract(r"searched\((\w+)\)", expand=False)
    rows = [(m, s, len(g), spearman(g["predicted_damage"], g[measured]))
            for (m, s), g in t.groupby(["method", "sensitivity"], sort=False)]
    return pd.DataFrame(rows, columns=cols)


def sensitivity_from_layers(layers, config_hash: str) -> pd.DataFrame:
    """The sensitivity table a searched run used (``layer, candidate, score``, layer order), rebuilt from its
    rows of ``layers.csv`` (the ``score <candidate>`` columns).

    Example:
        >>> l = pd.DataFrame({"config_hash": ["h", "h"], "layer": ["a", "b"], "order": [0, 1],
        ...                   "score int2/ch": [2.0, 1.0], "score int8/ch": [0.1, 0.0]})
        >>> sensitivity_from_layers(l, "h").values.tolist()
        [['a', 'int2/ch', 2.0], ['a', 'int8/ch', 0.1], ['b', 'int2/ch', 1.0], ['b', 'int8/ch', 0.0]]
    """
    rows = layers[layers["config_hash"] == config_hash]
    cols = [c for c in rows.columns if c.startswith("score ") and rows[c].notna().any()]
    if rows.empty or not cols:
        raise ValueError(f"sensitivity_from_layers: run {config_hash!r} has no per-candidate scores "
                         "(only searched runs record them)")
    rows = rows[rows[cols].notna().any(axis=1)]
    if "order" in rows:
        rows = rows.sort_values("order")
    out = rows[["layer", *cols]].melt(id_vars=["layer"], value_vars=cols, var_name="candidate", value_name="score")
    out["candidate"] = out["candidate"].str[len("score "):]
    rank = {lay: i for i, lay in enumerate(rows["layer"])}
    out = out.assign(_r=out["layer"].map(rank)).sort_values(["_r"], kind="stable").drop(columns="_r")
    return out.reset_index(drop=True)


def study_times(folders) -> pd.DataFrame:
    """How long each study took: per study folder (its ``runs.csv``), the runs, the summed wall time of the runs in
    minutes (calibration captures shared by the runs are in the first run that needs them; loading the model, once
    per process, is not) and the seconds per run (median and max), with a last ``total`` row.

    Example:
        >>> import tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp()) / "a"
        >>> d.mkdir()
        >>> pd.DataFrame({"config_hash": ["x", "y"], "wall_s": [60.0, 180.0]}).to_csv(d / "runs.csv", index=False)
        >>> study_times([d]).values.tolist()
        [['a', 2, 4.0, 120.0, 180.0], ['total', 2, 4.0, 120.0, 180.0]]
    """
    rows = []
    for f in map(pathlib.Path, folders):
        w = pd.read_csv(f / "runs.csv")["wall_s"].dropna()
        rows.append(dict(study=f.name, runs=len(w), minutes=w.sum() / 60, median_s=w.median(), max_s=w.max()))
    t = pd.DataFrame(rows)
    every = pd.concat([pd.read_csv(pathlib.Path(f) / "runs.csv")["wall_s"].dropna() for f in folders])
    total = dict(study="total", runs=int(t.runs.sum()), minutes=t.minutes.sum(), median_s=every.median(),
                 max_s=every.max())
    return pd.concat([t, pd.DataFrame([total])], ignore_index=True).round(1)
