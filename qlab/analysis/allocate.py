"""Bit allocation under a memory budget: pick one candidate per layer so that the summed damage
(a sensitivity score) is least while the summed bytes stay within the budget, a multiple-choice
knapsack.

Methods (``allocate(..., method=...)``):

* ``"dp"`` (default): dynamic programming over byte bins. Bytes are first made relative to each
  layer's cheapest candidate, so bins only span the *slack* ``budget - cheapest model``. When
  ``slack / gcd(all extra bytes, slack) <= max_bins`` a bin is that gcd and the result is exactly
  optimal (``Allocation.exact``); otherwise (more bins than ``max_bins``) the integer program of
  ``"milp"`` solves it exactly instead. Time is ``O(layers * candidates * bins)`` with numpy where the
  DP runs (1,000 x 10 in well under a second, ``benchmarks/allocation.py``).
* ``"milp"``: ``scipy.optimize.milp`` (HiGHS) on binary choice variables: exact whatever the byte
  granularity, time not bounded in advance (fine for thousands of layers in practice).
* ``"greedy"``: the baseline: start from each layer's cheapest choice and take upgrades along each
  layer's lower convex hull of (bytes, damage), best damage saved per byte first, while they fit.

Example:
    >>> import pandas as pd
    >>> t = pd.DataFrame(dict(layer=["a", "a", "b", "b"], candidate=["int4/ch", "int8/ch"] * 2,
    ...                       bytes=[10, 20, 10, 20], score=[5.0, 1.0, 1.0, 0.5]))
    >>> a = allocate(t, budget_bytes=30)
    >>> a.choices[["layer", "candidate"]].values.tolist(), a.total_bytes, a.damage
    ([['a', 'int8/ch'], ['b', 'int4/ch']], 30, 2.0)
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pandas as pd

from qlab.analysis.candidates import KEEP
from qlab.nn import Rule

__all__ = ["ALLOCATION_METHODS", "Allocation", "allocate"]

ALLOCATION_METHODS = ("dp", "greedy", "milp")
_CHOICE_COLUMNS = ["layer", "candidate", "params", "bytes", "score"]


@dataclasses.dataclass(frozen=True, eq=False)
class Allocation:
    """One candidate per layer.

    Attributes:
        choices: DataFrame ``layer, candidate, params, bytes, score`` (one row per layer, table order).
        total_bytes: summed bytes of the choices (<= budget_bytes).
        damage: summed score of the choices (the predicted damage).
        budget_bytes: the budget it was allocated under.
        method: ``"dp"``, ``"greedy"`` or ``"milp"``.
        exact: True when the result is provably optimal (dp with exact bins, milp).
    """

    choices: pd.DataFrame
    total_bytes: int
    damage: float
    budget_bytes: int
    method: str
    exact: bool

    def rules(self) -> tuple[Rule, ...]:
        """``qlab.nn.Rule``s quantizing each layer at its choice (exact-path patterns, regex-escaped;
        :data:`~qlab.analysis.candidates.KEEP` -> a float rule).

        Example:
            >>> import pandas as pd
            >>> t = pd.DataFrame(dict(layer=["layers/0", "head"], candidate=["int4/ch", "keep"],
            ...                       bytes=[10, 40], score=[1.0, 0.0]))
            >>> allocate(t, budget_bytes=50).rules()
            (Rule('layers/0', weight='int4/ch'), Rule('head'))
        """
        return tuple(Rule(re.escape(layer), weight=None if c == KEEP else c)
                     for layer, c in zip(self.choices["layer"], self.choices["candidate"]))

    def __repr__(self):
        return (f"Allocation({len(self.choices)} layers, {self.total_bytes}/{self.budget_bytes} bytes, "
                f"damage={self.damage:.4g}, method={self.method!r}, exact={self.exact})")


def _options(table: pd.DataFrame):
    """(layers in table order, [per layer: (row indices, bytes int64, scores float64)]) of the
    usable rows with a finite score; ValueError naming layers that have none."""
    need = {"layer", "candidate", "bytes", "score"} - set(table.columns)
    if need:
        raise ValueError(f"allocate: table lacks columns {sorted(need)}")
    ok = np.isfinite(table["score"].to_numpy(float))
    if "usable" in table:
        ok &= table["usable"].to_numpy(bool)
    layers = list(dict.fromkeys(table["layer"]))
    rows = {lay: [] for lay in layers}
    for i, (lay, good) in enumerate(zip(table["layer"], ok)):
        if good:
            rows[lay].append(i)
    empty = [lay for lay in layers if not rows[lay]]
    if empty:
        raise ValueError(f"allocate: layers with no usable candidate (or no finite score): {empty}")
    b = table["bytes"].to_numpy()
    if not np.issubdtype(b.dtype, np.integer) and not np.all(b == np.round(b)):
        raise ValueError("allocate: bytes must be whole numbers")
    b = b.astype(np.int64)
    s = table["score"].to_numpy(float)
    return layers, [(np.array(rows[lay]), b[rows[lay]], s[rows[lay]]) for lay in layers]


def _pareto(idx, b, s):
    """The options no other beats in both bytes and score, by increasing bytes (decreasing score)."""
    order = np.lexsort((s, b))
    keep, best = [], math.inf
    for k in order:
        if s[k] < best:
            keep.append(k)
            best = s[k]
    keep = np.array(keep)
    return idx[keep], b[keep], s[keep]


def _dp(opts, budget: int, max_bins: int):
    mins = np.array([b.min() for _, b, _ in opts])
    slack = budget - int(mins.sum())
    extras = [b - m for (_, b, _), m in zip(opts, mins)]
    g = int(np.gcd.reduce(np.concatenate(extras + [np.array([slack])])))
    if g == 0 or slack // max(g, 1) <= max_bins:
        unit, exact = max(g, 1), True
    else:
        unit, exact = -(-slack // max_bins), False
    nb = slack // unit
    dp = np.zeros(nb + 1)
    choice = np.zeros((len(opts), nb + 1), np.int16)
    weights = []
    for li, ((_, _, s), e) in enumerate(zip(opts, extras)):
        w = -(-e // unit)
        weights.append(w)
        new = np.full(nb + 1, np.inf)
        for k in range(len(w)):
            wk = int(w[k])
            if wk > nb:
                continue
            cand = dp[: nb + 1 - wk] + s[k]
            better = cand < new[wk:]
            new[wk:][better] = cand[better]
            choice[li, wk:][better] = k
        dp = new
    picks, b = [], nb
    for li in range(len(opts) - 1, -1, -1):
        k = int(choice[li, b])
        picks.append(k)
        b -= int(weights[li][k])
    return picks[::-1], exact


def _greedy(opts, budget: int):
    picks, hulls, incs = [], [], []
    for li, (_, b, s) in enumerate(opts):
        hull = []  # lower convex hull of the pareto points, by increasing bytes
        for k in range(len(b)):
            while len(hull) >= 2:
                i, j = hull[-2], hull[-1]
                # j is above the segment i -> k: not on the lower hull
                if (s[j] - s[i]) * (b[k] - b[i]) >= (s[k] - s[i]) * (b[j] - b[i]):
                    hull.pop()
                else:
                    break
            hull.append(k)
        hulls.append(hull)
        picks.append(hull[0])
        for h in range(1, len(hull)):
            i, j = hull[h - 1], hull[h]
            incs.append(((s[i] - s[j]) / (b[j] - b[i]), li, h))
    left = budget - sum(int(opts[li][1][k]) for li, k in enumerate(picks))
    step = [0] * len(opts)
    blocked = [False] * len(opts)
    for _, li, h in sorted(incs, key=lambda t: (-t[0], t[1], t[2])):
        if blocked[li] or step[li] != h - 1:
            continue
        _, b, _ = opts[li]
        cost = int(b[hulls[li][h]] - b[hulls[li][h - 1]])
        if cost <= left:
            left -= cost
            step[li] = h
            picks[li] = hulls[li][h]
        else:
            blocked[li] = True
    return picks


def _milp(opts, budget: int):
    from scipy.optimize import Bounds, LinearConstraint, milp  # deferred: scipy.optimize is a heavy import
    from scipy.sparse import coo_matrix  # deferred with scipy.optimize

    sizes = [len(b) for _, b, _ in opts]
    n = sum(sizes)
    cost = np.concatenate([s for _, _, s in opts])
    nbytes = np.concatenate([b for _, b, _ in opts]).astype(float)
    rows = np.repeat(np.arange(len(opts)), sizes)
    one = coo_matrix((np.ones(n), (rows, np.arange(n))), shape=(len(opts), n))
    cons = [LinearConstraint(one, 1, 1), LinearConstraint(nbytes[None, :], -np.inf, budget)]
    res = milp(cost, constraints=cons, integrality=np.ones(n), bounds=Bounds(0, 1))
    if res.x is None:
        raise ValueError(f"allocate(method='milp'): solver failed: {res.message}")
    x = np.round(res.x).astype(int)
    starts = np.cumsum([0] + sizes[:-1])
    return [int(np.argmax(x[a:a + k])) for a, k in zip(starts, sizes)]


def allocate(table: pd.DataFrame, budget_bytes: int | None = None, budget_bpw: float | None = None,
             method: str = "dp", *, max_bins: int = 1 << 14) -> Allocation:
    """Choose one candidate per layer of ``table`` (rows ``layer, candidate, bytes, score``, and
    ``usable`` / ``params`` when present, as :func:`~qlab.analysis.sensitivity` returns) minimising
    the summed score subject to summed bytes <= the budget, given as ``budget_bytes`` or as
    ``budget_bpw`` (bits per weight over the table's params: ``floor(bpw * params / 8)`` bytes).

    The budget is never exceeded. ValueError when the budget is below the cheapest reachable size
    (the message names it), or a layer has no usable candidate (the message names the layer).
    Rows with ``usable=False`` or a NaN score are never chosen. See the module docstring for the
    methods and when ``"dp"`` is exact.

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame(dict(layer=["a", "a"], candidate=["int4/ch", "keep"], bytes=[10, 40],
        ...                       score=[1.0, 0.0]))
        >>> allocate(t, budget_bytes=39).choices.candidate.tolist()
        ['int4/ch']
        >>> allocate(t, budget_bytes=9)
        Traceback (most recent call last):
        ...
        ValueError: allocate: budget 9 bytes is below the smallest reachable size, 10 bytes
    """
    if method not in ALLOCATION_METHODS:
        raise ValueError(f"allocate: unknown method {method!r}; allowed: {list(ALLOCATION_METHODS)}")
    if (budget_bytes is None) == (budget_bpw is None):
        raise ValueError("allocate: give exactly one of budget_bytes and budget_bpw")
    layers, opts = _options(table)
    if budget_bpw is not None:
        if "params" not in table:
            raise ValueError("allocate: budget_bpw needs a 'params' column")
        params = int(table.drop_duplicates("layer")["params"].sum())
        budget_bytes = math.floor(budget_bpw * params / 8)
    budget_bytes = int(budget_bytes)
    floor_bytes = sum(int(b.min()) for _, b, _ in opts)
    if budget_bytes < floor_bytes:
        raise ValueError(f"allocate: budget {budget_bytes} bytes is below the smallest reachable size, "
                         f"{floor_bytes} bytes")
    opts = [_pareto(*o) for o in opts]
    if method == "greedy":
        picks, exact = _greedy(opts, budget_bytes), False
    elif method == "milp":
        picks, exact = _milp(opts, budget_bytes), True
    else:
        picks, exact = _dp(opts, budget_bytes, max_bins)
        if not exact:  # too many byte bins for an exact DP: the integer program is exact at any size
            picks, exact = _milp(opts, budget_bytes), True
    rows = [int(o[0][k]) for o, k in zip(opts, picks)]
    chosen = table.iloc[rows]
    choices = pd.DataFrame({c: chosen[c].to_numpy() if c in chosen else np.nan for c in _CHOICE_COLUMNS})
    total = int(choices["bytes"].sum())
    if total > budget_bytes:  # every method guarantees this; a failure here is a bug in qlab
        raise RuntimeError(f"allocate({method!r}) exceeded the budget: {total} > {budget_bytes} bytes")
    return Allocation(choices, total, float(choices["score"].sum()), budget_bytes, method, exact)
