"""Result storage: one JSON file per finished run, written atomically; CSV tables rebuilt from them.

Layout of ``results/<study>/``::

    runs/<config_hash>.json   one finished run: {"row": {...config, metrics, meta}, "layers": [...] | null}
    runs.csv                  one row per run of the current study (rebuilt from runs/*.json)
    layers.csv                per-layer rows (config_hash, method, weight, ... + layer columns)
    study.json                the expanded study (names, runs)
    *.png                     plots

A run's JSON is written to a temporary file in the same folder, flushed, fsync'ed and then
``os.replace``'d into place, so a process killed at any instant leaves either the complete file or
none (stray ``*.tmp`` files are ignored and cleaned up). Tables are rebuilt the same way.

Example:
    >>> import tempfile
    >>> d = tempfile.mkdtemp()
    >>> write_run(d, {"config_hash": "abc", "accuracy": 0.5})
    >>> [r["row"]["accuracy"] for r in read_runs(d)]
    [0.5]
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import tempfile
from typing import Any, Iterable, Mapping

__all__ = ["write_run", "read_runs", "atomic_write_text", "rebuild_tables", "load_results", "runs_dir", "setting_label",
           "method_labels", "method_table"]


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name + ".", suffix=".tmp")
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


def read_runs(out, hashes: Iterable[str] | None = None) -> list[dict]:
    """Every complete run JSON under ``out/runs`` (only ``hashes`` if given), sorted by file name.
    Stale temp files are removed."""
    d = runs_dir(out)
    if not d.is_dir():
        return []
    for tmp in d.glob(".*.tmp"):
        try:
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
    import pandas as pd

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
    """Read a study's ``runs.csv`` (and ``layers.csv`` with ``layers=True``) as DataFrames.

    ``out`` is a folder or a study name under ``results/``.
    """
    import pandas as pd

    p = pathlib.Path(out)
    if not p.is_dir() and (pathlib.Path("results") / str(out)).is_dir():
        p = pathlib.Path("results") / str(out)
    runs = pd.read_csv(p / "runs.csv")
    if not layers:
        return runs
    lp = p / "layers.csv"
    return runs, (pd.read_csv(lp) if lp.is_file() else pd.DataFrame())


def setting_label(weight) -> str:
    """A short label for a weight spec: bits (or format) and granularity, e.g. ``"W4 g128"``, ``"W8 ch"``,
    ``"float"``; symmetry, range and zero-point options are dropped (so HQQ's asymmetric spec shares its row).

    Example:
        >>> setting_label("int4/g128/asym/zp=float"), setting_label("int8/ch"), setting_label(None)
        ('W4 g128', 'W8 ch', 'float')
    """
    from qlab.numerics import parse_spec

    if weight is None or (isinstance(weight, float) and math.isnan(weight)) or weight in ("", "none", "float"):
        return "float"
    parts = str(parse_spec(str(weight))).split("/")
    head = "W" + parts[0][3:] if parts[0].startswith("int") else parts[0]
    return f"{head} {parts[1]}" if len(parts) > 1 else head


def method_labels(table) -> list[str]:
    """The ``method`` column with GPTQ's act-order runs named apart (``"ptq_gptq act-order"``), for
    tables and plot series.

    Example:
        >>> import pandas as pd
        >>> method_labels(pd.DataFrame({"method": ["ptq_gptq", "ptq_gptq", "qat"], "act_order": [False, True, None]}))
        ['ptq_gptq', 'ptq_gptq act-order', 'qat']
    """
    act = table["act_order"] if "act_order" in table else [None] * len(table)
    return [f"{m} act-order" if m == "ptq_gptq" and str(a).lower() in ("true", "1", "1.0") else m
            for m, a in zip(table["method"], act)]


def method_table(table, metric: str = "perplexity", digits: int = 4):
    """Pivot a study's runs into ``setting x method``: one row per weight setting (:func:`setting_label`),
    one column per method (``ptq_gptq`` with ``act_order`` true becomes ``ptq_gptq act-order``), cells the
    ``metric`` rounded to ``digits`` significant digits; the float run, if any, is its own row.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"method": ["float", "ptq_rtn", "ptq_gptq", "ptq_gptq"], "weight": [None] + ["int4/ch"] * 3,
        ...                   "act_order": [None, None, False, True], "perplexity": [17.26, 64.6, 25.8, 23.6]})
        >>> method_table(t).loc["W4 ch", ["ptq_rtn", "ptq_gptq", "ptq_gptq act-order"]].tolist()
        [64.6, 25.8, 23.6]
        >>> method_table(t).loc["float", "float"]
        np.float64(17.26)
    """
    t = table.copy()
    t["setting"] = [setting_label(w) for w in t.get("weight", [None] * len(t))]
    t["method"] = method_labels(t)
    t[metric] = [float(f"{v:.{digits}g}") for v in t[metric]]
    piv = t.pivot_table(index="setting", columns="method", values=metric, aggfunc="first", sort=False)
    cols = [c for c in ["float", "ptq_rtn", "ptq_gptq", "ptq_gptq act-order", "ptq_awq", "ptq_hqq", "ptq_smoothquant"]
            if c in piv.columns]
    piv = piv[cols + [c for c in piv.columns if c not in cols]]
    piv.columns.name = None
    return piv
