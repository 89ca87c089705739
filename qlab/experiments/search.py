"""Searched mixed precision in a study: a run with a ``budget_bpw`` or ``budget_mib`` gets its per-layer rules
from :mod:`qlab.analysis` (sensitivity of the float model to each of ``candidates``, then the least predicted
damage within the budget) instead of from a rule set; everything else about the run (PTQ method, QAT) is
unchanged.

* ``budget_bpw = 3.0``: bits per weight over the searched layers' weights (scales included), i.e.
  ``floor(3.0 * params / 8)`` bytes; ``budget_bpw = "int3/ch"``: exactly the bytes of that spec on every
  searched layer (a uniform model's size, so the two compare at equal packed bytes);
* ``budget_mib = 0.2``: the whole packed model in MiB (biases, norms and float layers included).

The sensitivity table is computed once per (float model, sensitivity method, candidates, calibration data)
in a process and shared by the runs that need it (:func:`sensitivity_table`).

Example:
    >>> s = search_of({"budget_bpw": "int4/ch", "budget_mib": None, "candidates": ["int2/ch", "int8/ch"],
    ...                "sensitivity": "sqnr", "allocation": "dp"})
    >>> s.label, s.budget_label
    ('searched(sqnr)', 'bytes of int4/ch')
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable

import pandas as pd

from qlab import analysis
from qlab import nn as qnn

from .methods import MiB

__all__ = ["Search", "search_of", "budget_bytes", "check_search", "sensitivity_table", "searched_rules",
           "chosen_columns", "clear_search_cache"]


@dataclasses.dataclass(frozen=True)
class Search:
    """What a searched run asks for: a budget (``bpw``: a number or a spec string; ``mib``: a number), the
    candidate specs, the sensitivity method and the allocation method."""

    budget: float | str
    unit: str
    candidates: tuple[str, ...]
    sensitivity: str
    allocation: str

    @property
    def label(self) -> str:
        """The run's rule-set label: ``"searched(<sensitivity>)"`` (one plot series per sensitivity method)."""
        return f"searched({self.sensitivity})"

    @property
    def budget_label(self) -> str:
        """``"bytes of int3/ch"``, ``"3 bpw"`` or ``"0.2 MiB"``."""
        if isinstance(self.budget, str):
            return f"bytes of {self.budget}"
        return f"{self.budget:g} {'bpw' if self.unit == 'bpw' else 'MiB'}"


def search_of(config) -> Search | None:
    """The :class:`Search` a run's config asks for (None without a budget); ValueError naming the key and the
    allowed values for a bad one.

    Example:
        >>> search_of({"budget_bpw": None, "budget_mib": None}) is None
        True
        >>> search_of({"budget_bpw": 3, "budget_mib": 1.0})
        Traceback (most recent call last):
        ...
        ValueError: budget_bpw and budget_mib: set one budget, not both
    """
    bpw, mib = config.get("budget_bpw"), config.get("budget_mib")
    if bpw is None and mib is None:
        return None
    if bpw is not None and mib is not None:
        raise ValueError("budget_bpw and budget_mib: set one budget, not both")
    if isinstance(bpw, str):
        if bpw == analysis.KEEP:
            raise ValueError("budget_bpw = 'keep': give a quantized spec string (e.g. \"int3/ch\") or a number")
        try:
            analysis.parse_candidate(bpw)
        except ValueError as e:
            raise ValueError(f"budget_bpw = {bpw!r}: {e}") from None
    elif bpw is not None and not (isinstance(bpw, (int, float)) and not isinstance(bpw, bool) and bpw > 0):
        raise ValueError(f"budget_bpw = {bpw!r} must be a positive number of bits per weight or a spec string")
    if mib is not None and not (isinstance(mib, (int, float)) and not isinstance(mib, bool) and mib > 0):
        raise ValueError(f"budget_mib = {mib!r} must be a positive number of MiB")
    cands = config.get("candidates")
    if not isinstance(cands, (list, tuple)) or not cands or not all(isinstance(c, str) for c in cands):
        raise ValueError(f"candidates = {cands!r} must be a non-empty list of spec strings (or \"keep\")")
    if len(set(cands)) != len(cands):
        raise ValueError(f"candidates = {cands!r} repeats a spec")
    for c in cands:
        try:
            analysis.parse_candidate(c)
        except ValueError as e:
            raise ValueError(f"candidates: {e}") from None
    sens, alloc = config.get("sensitivity"), config.get("allocation")
    if sens not in analysis.SENSITIVITY_METHODS:
        raise ValueError(f"sensitivity = {sens!r} is unknown; allowed: {', '.join(analysis.SENSITIVITY_METHODS)}")
    if alloc not in analysis.ALLOCATION_METHODS:
        raise ValueError(f"allocation = {alloc!r} is unknown; allowed: {', '.join(analysis.ALLOCATION_METHODS)}")
    unit = "bpw" if bpw is not None else "mib"
    budget = bpw if bpw is not None else mib
    if not isinstance(budget, str):
        budget = float(budget)
    return Search(budget, unit, tuple(cands), sens, alloc)


def budget_bytes(search: Search, table: pd.DataFrame, other_bytes: int) -> int:
    """The byte budget of the searched layers' weights: ``table`` is their candidate table (one row per layer
    and candidate, :func:`qlab.analysis.candidate_table`, ``keep`` rows not needed), ``other_bytes`` the packed
    bytes of everything else in the model (for ``budget_mib``).

    Example:
        >>> t = pd.DataFrame(dict(layer=["a", "a"], candidate=["int2/ch", "int8/ch"], params=[64, 64],
        ...                       bytes=[20, 68], usable=[True, True]))
        >>> budget_bytes(Search(4.0, "bpw", ("int2/ch",), "sqnr", "dp"), t, 0)
        32
    """
    if search.unit == "mib":
        return math.floor(search.budget * MiB) - int(other_bytes)
    if isinstance(search.budget, str):
        raise ValueError("budget_bytes: a spec budget needs the spec's own table; use check_search")
    params = int(table.drop_duplicates("layer")["params"].sum())
    return math.floor(search.budget * params / 8)


def _resolve_budget(search: Search, table: pd.DataFrame, spec_table: pd.DataFrame | None, other_bytes: int) -> int:
    if search.unit == "bpw" and isinstance(search.budget, str):
        try:
            return analysis.uniform_bytes(spec_table, search.budget)
        except ValueError as e:
            raise ValueError(f"budget_bpw = {search.budget!r}: {e}") from None
    return budget_bytes(search, table, other_bytes)


def check_search(search: Search, table: pd.DataFrame, other_bytes: int, spec_table: pd.DataFrame | None = None) -> int:
    """Check a searched run before anything runs and return its byte budget: every layer has a usable candidate
    (ValueError naming the layers that have none) and the budget reaches the smallest model the candidates
    allow (ValueError naming that minimum). ``spec_table``: the candidate table of a spec-string budget.

    Example:
        >>> t = pd.DataFrame(dict(layer=["a", "a"], candidate=["int2/ch", "int8/ch"], params=[64, 64],
        ...                       bytes=[20, 68], usable=[True, True]))
        >>> check_search(Search(1.0, "bpw", ("int2/ch", "int8/ch"), "sqnr", "dp"), t, 0)
        Traceback (most recent call last):
        ...
        ValueError: budget_bpw = 1 (8 bytes) is below the smallest size the candidates reach: 20 bytes (2.5 bits per weight)
    """
    usable = table[table["usable"].astype(bool)]
    empty = [lay for lay in dict.fromkeys(table["layer"]) if lay not in set(usable["layer"])]
    if empty:
        reasons = table[table["layer"] == empty[0]]["reason"].tolist() if "reason" in table else []
        raise ValueError(f"candidates {list(search.candidates)}: no usable candidate for layer(s) {empty}"
                         + (f" ({reasons[0]})" if reasons and reasons[0] else ""))
    budget = _resolve_budget(search, table, spec_table, other_bytes)
    floor = int(usable.groupby("layer", sort=False)["bytes"].min().sum())
    if budget < floor:
        params = int(table.drop_duplicates("layer")["params"].sum())
        key = "budget_mib" if search.unit == "mib" else "budget_bpw"
        shown = f"{search.budget!r}" if isinstance(search.budget, str) else f"{search.budget:g}"
        if search.unit == "mib":
            least = f"{floor} bytes of searched weights, {(floor + other_bytes) / MiB:.6g} MiB in all"
        else:
            least = f"{floor} bytes ({8 * floor / params:.4g} bits per weight)"
        raise ValueError(f"{key} = {shown} ({budget} bytes) is below the smallest size the candidates reach: {least}")
    return budget


_sensitivity_cache: dict[tuple, tuple[pd.DataFrame, float]] = {}


def sensitivity_table(key: tuple, compute: Callable[[], pd.DataFrame]) -> tuple[pd.DataFrame, float]:
    """``(table, seconds it took)``: ``compute()`` the first time ``key`` is seen in this process, the cached
    table after (keep ``key`` to what the table depends on: float model, method, candidates, data).

    Example:
        >>> t, s = sensitivity_table(("doc",), lambda: pd.DataFrame({"score": [1.0]}))
        >>> sensitivity_table(("doc",), lambda: 1 / 0)[0] is t
        True
        >>> clear_search_cache()
    """
    if key not in _sensitivity_cache:
        if len(_sensitivity_cache) > 16:
            _sensitivity_cache.clear()
        t0 = time.perf_counter()
        table = compute()
        _sensitivity_cache[key] = (table, time.perf_counter() - t0)
    return _sensitivity_cache[key]


def clear_search_cache() -> None:
    """Forget the sensitivity tables computed in this process.

    Example:
        >>> clear_search_cache()
    """
    _sensitivity_cache.clear()


def searched_rules(search: Search, scores: pd.DataFrame, budget: int, act=None,
                   rule_options: dict | None = None) -> tuple[tuple[qnn.Rule, ...], Any, dict]:
    """Allocate ``budget`` bytes over the scored layers: ``(rules, allocation, metrics)``. The rules quantize
    each searched layer at its choice (with the run's ``act`` spec and the method's ``rule_options``); metrics:
    ``predicted_damage`` (the allocation's summed score), ``budget_bytes``, ``searched_bytes``, ``allocation_s``.

    Example:
        >>> t = pd.DataFrame(dict(layer=["a", "a"], candidate=["int2/ch", "int8/ch"], params=[64, 64],
        ...                       bytes=[20, 68], usable=[True, True], score=[3.0, 0.1]))
        >>> rules, a, m = searched_rules(Search(8.5, "bpw", ("int2/ch", "int8/ch"), "sqnr", "dp"), t, 68)
        >>> rules, m["searched_bytes"]
        ((Rule('a', weight='int8/ch'),), 68)
    """
    t0 = time.perf_counter()
    alloc = analysis.allocate(scores, budget_bytes=budget, method=search.allocation)
    opts = rule_options or {}
    rules = tuple(
        qnn.Rule(re.escape(layer), weight=None if c == analysis.KEEP else c,
                 act=None if c == analysis.KEEP else act,
                 **({k: v for k, v in opts.items()} if c != analysis.KEEP else {}))
        for layer, c in zip(alloc.choices["layer"], alloc.choices["candidate"]))
    metrics = {"predicted_damage": alloc.damage, "budget_bytes": int(budget), "searched_bytes": alloc.total_bytes,
               "allocation_s": time.perf_counter() - t0}
    return rules, alloc, metrics


def chosen_columns(layers: pd.DataFrame, alloc, scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """``layers`` (a per-layer table with a ``layer`` column) with the search's ``candidate`` and predicted
    ``score`` of each layer added, and (given the sensitivity table ``scores``) every candidate's score as a
    column ``score <candidate>``, so a study's layers.csv holds the whole sensitivity table (heatmaps).

    Example:
        >>> t = pd.DataFrame(dict(layer=["a", "a"], candidate=["int4/ch", "int8/ch"], bytes=[4, 8], score=[0.5, 0.1]))
        >>> a = analysis.allocate(t, budget_bytes=4)
        >>> chosen_columns(pd.DataFrame({"layer": ["a"]}), a, t).values.tolist()
        [['a', 'int4/ch', 0.5, 0.5, 0.1]]
    """
    ch = alloc.choices.set_index("layer")
    out = layers.copy()
    out["candidate"] = out["layer"].map(ch["candidate"])
    out["score"] = out["layer"].map(ch["score"]).astype(float)
    if scores is not None:
        for cand, g in scores.groupby("candidate", sort=False):
            out[f"score {cand}"] = out["layer"].map(g.set_index("layer")["score"]).astype(float)
    return out
