"""Figures from result tables (pandas DataFrames); this module knows no models.

Every function returns a :class:`matplotlib.figure.Figure` (shown inline when it is a notebook cell's
value; not registered with pyplot, so nothing leaks or shows twice). ``save(fig, path)`` writes a PNG.

Example:
    >>> import pandas as pd
    >>> t = pd.DataFrame({"method": ["float", "ptq_rtn", "ptq_rtn"], "model_mib": [1.0, 0.25, 0.13],
    ...                   "accuracy": [0.97, 0.96, 0.80], "weight": [None, "int8/ch", "int4/ch"],
    ...                   "bits_per_weight": [32.0, 8.25, 4.25]})
    >>> fig = pareto(t, label="weight")
    >>> fig.axes[0].get_xlabel()
    'model size (MiB)'
    >>> pareto_front(t)
    [2, 1, 0]
"""

from __future__ import annotations

import dataclasses
import io
import math
import pathlib

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from qlab.numerics import Fixed, PerTensor, fake_quant, parse_spec, sqnr_db

__all__ = ["figure", "QFigure", "quant_grid", "pareto", "pareto_front", "metric_vs_bits", "metric_vs_bits_panels",
           "layer_bars", "weight_histogram", "save", "channel_maxima", "LABELS", "series_labels", "study_figures",
           "save_study_figures"]

#: Axis labels (with units) for the usual result columns.
LABELS = {
    "model_mib": "model size (MiB)",
    "model_bytes": "model size (bytes)",
    "float_mib": "float model size (MiB)",
    "bits_per_weight": "bits / weight",
    "accuracy": "test accuracy",
    "float_accuracy": "float test accuracy",
    "accuracy_drop": "accuracy drop vs float",
    "weight_sqnr_db": "weight SQNR (dB)",
    "weight_rel_error": "relative weight error ||Wq-W||²/||W||²",
    "sensitivity_drop": "accuracy drop (only this layer quantized)",
    "packed_bytes": "packed size (bytes)",
    "wall_s": "wall time (s)",
    "params": "parameters",
    "perplexity": "perplexity",
    "ppl_ratio": "perplexity / float perplexity",
}


def _label(col: str) -> str:
    return LABELS.get(col, col.replace("_", " "))


class QFigure(Figure):
    """A matplotlib Figure that shows itself as PNG in Jupyter (``_repr_png_``), whatever the backend."""

    def _repr_png_(self):
        buf = io.BytesIO()
        self.savefig(buf, format="png", dpi=100)
        return buf.getvalue()


def figure(figsize=(6.4, 4.4), **kw) -> Figure:
    """A new (constrained-layout) figure, not registered with pyplot, shown inline in notebooks.

    Example:
        >>> ax = figure().add_subplot()
    """
    kw.setdefault("layout", "constrained")
    return QFigure(figsize=figsize, **kw)


def _fig(ax=None, figsize=(6.4, 4.4)):
    if ax is not None:
        return ax.figure, ax
    fig = figure(figsize=figsize)
    return fig, fig.add_subplot()


def save(fig: Figure, path, dpi: int = 120) -> pathlib.Path:
    """Write ``fig`` as PNG (or the path's suffix format); returns the path.

    Example:
        >>> import tempfile, pathlib
        >>> p = save(Figure(), pathlib.Path(tempfile.mkdtemp()) / "f.png"); p.suffix
        '.png'
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp" + path.suffix)
    fig.savefig(tmp, dpi=dpi)
    tmp.replace(path)
    return path


def _wide(values, ratio: float) -> bool:
    """True when the positive values span more than ``ratio`` (and all are positive)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return len(v) > 1 and bool((v > 0).all()) and v.max() / v.min() > ratio


def _split_collapsed(t, collapsed: str | None):
    """``(kept rows, collapsed rows)`` by the boolean column ``collapsed`` (none collapsed without it)."""
    if not collapsed or collapsed not in t:
        return t, t.iloc[:0]
    gone = t[collapsed].fillna(False).astype(bool)
    return t[~gone], t[gone]


def _mark_collapsed(ax, rows, x: str, label: str | None = None) -> None:
    """Crosses for collapsed rows along the top edge of ``ax`` (x in data units, y in axes units)."""
    if not len(rows):
        return
    top = ax.get_xaxis_transform()
    ax.scatter(rows[x], [0.97] * len(rows), marker="x", color="C3", transform=top, zorder=5, clip_on=False,
               label=f"collapsed ({len(rows)})")
    if label is not None:  # one annotation per x: the labels of the runs that collapsed there, one a line
        for at, names in rows.groupby(x, sort=False)[label].agg(lambda v: "\n".join(dict.fromkeys(map(str, v)))).items():
            ax.annotate(names, (at, 0.97), xycoords=top, xytext=(3, -4), textcoords="offset points", va="top",
                        fontsize=6, color="C3")


def pareto_front(table, x: str = "model_mib", y: str = "accuracy", maximize: bool = True) -> list:
    """Index labels of the Pareto-optimal rows (smallest ``x`` for the best ``y``), sorted by ``x``.

    A row is on the front if no other row has ``x`` <= and ``y`` better-or-equal with one strictly.

    Example:
        >>> import pandas as pd
        >>> pareto_front(pd.DataFrame({"model_mib": [1, 2, 3], "accuracy": [0.5, 0.4, 0.9]}))
        [0, 2]
    """
    t = table[[x, y]].dropna()
    sign = 1.0 if maximize else -1.0
    order = sorted(t.index, key=lambda i: (t.at[i, x], -sign * t.at[i, y]))
    front, best = [], -math.inf
    for i in order:
        v = sign * t.at[i, y]
        if v > best:
            front.append(i)
            best = v
    return front


def pareto(table, x: str = "model_mib", y: str = "accuracy", hue: str | None = "method", label: str | None = None,
           *, maximize: bool = True, logx: bool | None = None, logy: bool | None = None, ax=None,
           title: str | None = None, label_all: bool | None = None, collapsed: str | None = None) -> Figure:
    """Scatter ``y`` against ``x`` coloured by ``hue``, the Pareto frontier drawn as a step line and
    its points ringed; ``label`` (a column) annotates the points: all of them when ``label_all``
    (default: when there are at most 40), else the frontier's. ``logx`` / ``logy``: log axes
    (default: when the positive values span more than 8x / 100x). ``collapsed``: a boolean column; its true
    rows (e.g. perplexity above the vocabulary size) are drawn as crosses along the top edge, labelled
    "collapsed", and kept off the y axis and the frontier.

    Example:
        >>> import pandas as pd
        >>> fig = pareto(pd.DataFrame({"model_mib": [1, 2], "accuracy": [0.5, 0.7], "method": ["a", "b"]}))
        >>> len(fig.axes)
        1
    """
    fig, ax = _fig(ax)
    t, gone = _split_collapsed(table.dropna(subset=[x, y]), collapsed)
    groups = [(None, t)] if not hue or hue not in t else list(t.groupby(hue, sort=False, dropna=False))
    for name, g in groups:
        ax.scatter(g[x], g[y], s=36, alpha=0.85, label=None if name is None else str(name), zorder=3)
    front = pareto_front(t, x, y, maximize)
    if front:
        fx, fy = t.loc[front, x].to_numpy(), t.loc[front, y].to_numpy()
        ax.step(fx, fy, where="post", color="0.3", lw=1.2, ls="--", zorder=2, label="Pareto frontier")
        ax.scatter(fx, fy, s=110, facecolors="none", edgecolors="k", lw=1.2, zorder=4)
    if label and label in t:
        if label_all is None:
            label_all = len(t) <= 40
        for i, row in t.iterrows():
            if not label_all and i not in front:
                continue
            txt = row[label]
            if txt is None or (isinstance(txt, float) and math.isnan(txt)):
                txt = str(row[hue]) if hue and hue in t else ""
            elif not label_all and hue and hue in t:
                txt = f"{row[hue]} {txt}"
            ax.annotate(str(txt), (row[x], row[y]), xytext=(4, 3), textcoords="offset points",
                        fontsize=7, alpha=0.9 if i in front else 0.6)
    _mark_collapsed(ax, gone, x, label if label and label in gone else None)
    if _wide(np.concatenate([t[x].to_numpy(float), gone[x].to_numpy(float)]), 8) if logx is None else logx:
        ax.set_xscale("log")
    if _wide(t[y], 100) if logy is None else logy:
        ax.set_yscale("log")
    ax.set_xlabel(_label(x))
    ax.set_ylabel(_label(y))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    if title:
        ax.set_title(title)
    return fig


def metric_vs_bits(table, y: str = "accuracy", x: str = "bits_per_weight", hue: str = "method",
                   by: str | None = "granularity", *, ax=None, title: str | None = None,
                   reference: str | None = "float", logy: bool | None = None, logx: bool = False,
                   collapsed: str | None = None, collapsed_label: str | None = None,
                   colors: dict | None = None) -> Figure:
    """``y`` against bits/weight (or any numeric ``x``, e.g. ``bits`` or a learning rate with ``logx``), one line
    per ``hue`` (and per ``by`` value, as line styles); runs at one ``x`` of a line (seeds) are averaged, error
    bars: their standard deviation (:func:`qlab.experiments.results.seed_stats` gives the same numbers as a
    table). Rows whose ``hue`` equals ``reference`` (float) are drawn as a horizontal line (their mean).
    ``logy``: a log y axis (default: when positive ``y`` spans > 100x).
    ``collapsed``: a boolean column whose true rows are drawn as crosses on the top edge (see :func:`pareto`),
    annotated with their ``collapsed_label`` column if given. ``colors``: a colour per ``hue`` value (default: the
    colour cycle in order of appearance).

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"method": ["q", "q"], "bits_per_weight": [4.0, 8.0], "accuracy": [0.8, 0.9]})
        >>> metric_vs_bits(t, by=None).axes[0].get_xlabel()
        'bits / weight'
    """
    fig, ax = _fig(ax)
    t, gone = _split_collapsed(table.dropna(subset=[y]), collapsed)
    if reference is not None and hue in t:
        ref = t[t[hue] == reference]
        if len(ref):
            ax.axhline(ref[y].mean(), color="0.4", ls=":", lw=1.2, label=f"{reference} ({ref[y].mean():.3g})")
        t = t[t[hue] != reference]
    keys = [k for k in (hue, by) if k and k in t and t[k].nunique(dropna=False) > 0]
    styles = ["-", "--", ":", "-."]
    by_vals = list(dict.fromkeys(t[by])) if by and by in t else [None]
    for name, g in (t.groupby(keys, sort=False, dropna=False) if keys else [((), t)]):
        name = name if isinstance(name, tuple) else (name,)
        agg = g.groupby(x)[y].agg(["mean", "std"]).reset_index().sort_values(x)
        ls = styles[by_vals.index(name[-1]) % len(styles)] if by and by in t and len(name) == len(keys) else "-"
        color = (colors or {}).get(name[0]) if keys and keys[0] == hue else None
        ax.errorbar(agg[x], agg["mean"], yerr=agg["std"].fillna(0), marker="o", ms=4, ls=ls, capsize=2,
                    label=" / ".join(str(n) for n in name), color=color)
    _mark_collapsed(ax, gone, x, collapsed_label if collapsed_label and collapsed_label in gone else None)
    if (_wide(t[y].dropna(), 100) if logy is None else logy) and (t[y] > 0).any():  # nothing drawn: stay linear
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(_label(x))
    ax.set_ylabel(_label(y))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2 if len(ax.get_lines()) > 6 else 1)
    if title:
        ax.set_title(title)
    return fig


def metric_vs_bits_panels(table, panel: str = "granularity", *, y: str = "accuracy", x: str = "bits_per_weight",
                          hue: str = "method", reference: str | None = "float", logy: bool | None = None,
                          title: str | None = None, **kw) -> Figure:
    """:func:`metric_vs_bits` once per value of ``panel`` (side by side, one shared y axis, in order of first
    appearance), the ``reference`` rows (float, whose ``panel`` is empty) drawn in every panel; ``kw`` go to
    :func:`metric_vs_bits` (``collapsed``, ``logx``). ``logy``: default when positive ``y`` spans > 100x overall.
    A ``hue`` value keeps one colour in every panel (the cycle without C3, the colour of collapsed runs' crosses,
    which are annotated with their ``hue``).

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"method": ["float", "q", "q", "q"], "granularity": [None, "tensor", "ch", "ch"],
        ...                   "bits": [None, 4, 4, 8], "ppl_ratio": [1.0, 3.0, 1.5, 1.0]})
        >>> [ax.get_title() for ax in metric_vs_bits_panels(t, y="ppl_ratio", x="bits").axes]
        ['granularity = tensor', 'granularity = ch']
    """
    import pandas as pd  # noqa: PLC0415 -- keeps `import qlab.plot` light

    is_ref = (table[hue] == reference) if reference is not None and hue in table else pd.Series(False, index=table.index)
    ref, rest = table[is_ref], table[~is_ref]
    values = list(dict.fromkeys(rest[panel]))
    if logy is None:
        logy = _wide(table[y].dropna(), 100)
    fig = figure(figsize=(1.0 + 4.4 * max(len(values), 1), 4.4))
    axes = fig.subplots(1, max(len(values), 1), sharey=True, squeeze=False)[0]
    cycle = [f"C{i}" for i in range(10) if i != 3]
    colors = {h: cycle[i % len(cycle)] for i, h in enumerate(dict.fromkeys(rest[hue]))} if hue in rest else None
    kw.setdefault("collapsed_label", hue)
    for ax, v in zip(axes, values):
        metric_vs_bits(pd.concat([ref, rest[rest[panel] == v]]), y=y, x=x, hue=hue, by=None, reference=reference,
                       logy=logy, ax=ax, title=f"{panel} = {v}", colors=colors, **kw)
    for ax in axes[1:]:
        ax.set_ylabel("")
    if title:
        fig.suptitle(title)
    return fig


def layer_bars(layers, y: str = "weight_sqnr_db", layer: str = "layer", hue: str | None = None,
               *, order: str | None = "order", ax=None, title: str | None = None) -> Figure:
    """Grouped bars of a per-layer quantity (error, SQNR, sensitivity): one group per layer (in
    ``order``), one bar per ``hue`` value (averaged over duplicates).

    Example:
        >>> import pandas as pd
        >>> d = pd.DataFrame({"layer": ["a", "b"], "weight_sqnr_db": [20.0, 25.0]})
        >>> [t.get_text() for t in layer_bars(d).axes[0].get_xticklabels()]
        ['a', 'b']
    """
    t = layers.dropna(subset=[y])
    t = t[np.isfinite(t[y].astype(float))]
    if order and order in t:
        names = list(t.sort_values(order)[layer].drop_duplicates())
    else:
        names = list(dict.fromkeys(t[layer]))
    hues = list(dict.fromkeys(t[hue])) if hue and hue in t else [None]
    fig, ax = _fig(ax, figsize=(max(6.4, 0.5 * len(names) * max(1, len(hues)) ** 0.5 + 3), 4.4))
    width = 0.8 / len(hues)
    xs = np.arange(len(names))
    cmap = matplotlib.colormaps["tab20" if len(hues) > 10 else "tab10"]
    for j, h in enumerate(hues):
        g = t if h is None else t[t[hue] == h]
        vals = g.groupby(layer)[y].mean().reindex(names)
        ax.bar(xs + (j - (len(hues) - 1) / 2) * width, vals.to_numpy(dtype=float), width,
               label=None if h is None else str(h), color=cmap(j % cmap.N))
    ax.set_xticks(xs, names, rotation=30 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center")
    ax.set_xlabel("layer")
    ax.set_ylabel(_label(y))
    ax.grid(True, axis="y", alpha=0.3)
    if hues != [None]:
        if len(hues) > 6:
            ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0), title=hue)
        else:
            ax.legend(fontsize=7, title=hue)
    if title:
        ax.set_title(title)
    return fig


def quant_grid(w, spec) -> np.ndarray:
    """The representable values of ``spec`` over ``w``'s full range (one per-tensor scale), sorted.

    Example:
        >>> import numpy as np
        >>> quant_grid(np.linspace(-1, 1, 11), "int2").tolist()
        [-1.0, 0.0, 1.0]
    """
    spec = parse_spec(spec)
    w = np.asarray(w, np.float32)
    lo, hi = float(np.nanmin(w)), float(np.nanmax(w))
    rng = spec.range if isinstance(spec.range, Fixed) else Fixed(min(lo, 0.0), max(hi, 0.0))
    tensor = dataclasses.replace(spec, granularity=PerTensor(), range=rng, rounding="nearest")
    xs = np.linspace(rng.lo, rng.hi, 65537, dtype=np.float32)
    return np.unique(np.asarray(fake_quant(xs, tensor))) + 0.0  # no -0.0


def weight_histogram(w, spec=None, *, bins: int = 120, ax=None, title: str | None = None,
                     show_quantized: bool = True) -> Figure:
    """Histogram of weights ``w`` with ``spec``'s quantization grid overlaid (vertical lines at the
    representable values for one scale spanning the tensor's range; per-channel/group specs have
    one such grid per scale group, so their actual grids are finer). With ``show_quantized``,
    the histogram of ``fake_quant(w, spec)`` is drawn too.

    Example:
        >>> import numpy as np
        >>> fig = weight_histogram(np.random.default_rng(0).normal(size=(64, 32)), "int3")
        >>> "int3" in fig.axes[0].get_title()
        True
    """
    fig, ax = _fig(ax)
    w = np.asarray(w, np.float32)
    flat = w.ravel()
    ax.hist(flat, bins=bins, color="C0", alpha=0.6, label=f"weights ({flat.size:,})")
    head = "weights"
    if spec is not None:
        spec = parse_spec(spec)
        grid = quant_grid(w, spec)
        for k, g in enumerate(grid if len(grid) <= 256 else grid[:: math.ceil(len(grid) / 256)]):
            ax.axvline(g, color="C3", lw=0.8, alpha=0.7, label=f"grid ({len(grid)} values)" if k == 0 else None)
        if show_quantized and w.ndim >= 1:
            wq = np.asarray(fake_quant(w if w.ndim >= 2 else w[None], spec)).reshape(w.shape)
            ax.hist(wq.ravel(), bins=bins, histtype="step", color="C1", lw=1.2, label="fake-quantized")
            head = f"{spec}: SQNR {float(sqnr_db(w, wq)):.1f} dB"
        else:
            head = str(spec)
    ax.set_xlabel("weight value")
    ax.set_ylabel("count")
    ax.legend(fontsize=7)
    ax.set_title(title or head)
    return fig


def channel_maxima(channels, layer: str = "", *, log: bool = False) -> Figure:
    """Per-input-channel activation maxima of one layer before smoothing and after (SmoothQuant's picture):
    ``channels`` is a table (or dict of arrays) with a column ``absmax`` (``max |x|`` per input channel over the
    calibration tokens) and one ``smoothed_<alpha>`` column per alpha (``absmax / s``); one panel each, titled with
    the max / median channel ratio. ``log``: a log y axis (for maxima that span decades).

    Example:
        >>> import numpy as np
        >>> a = np.array([1.0, 2.0, 40.0, 1.5])
        >>> fig = channel_maxima({"absmax": a, "smoothed_0.5": np.sqrt(a)}, "layers/0/mlp/up_proj")
        >>> len(fig.axes), fig.axes[1].get_title()
        (2, 'after, alpha 0.5 (max/median 4.8)')
    """
    absmax = np.asarray(channels["absmax"], np.float64)
    after = {c.split("_", 1)[1]: np.asarray(channels[c], np.float64) for c in channels if c.startswith("smoothed_")}
    fig = figure(figsize=(4 * (1 + len(after)), 3.4))
    axes = fig.subplots(1, 1 + len(after), sharey=True, squeeze=False)[0]
    axes[0].bar(np.arange(len(absmax)), absmax, width=1.0, color="C3")
    axes[0].set_title(f"{layer + ': ' if layer else ''}before (max/median {absmax.max() / np.median(absmax):.1f})",
                      fontsize=8)
    for ax, (alpha, v) in zip(axes[1:], after.items()):
        ax.bar(np.arange(len(v)), v, width=1.0, color="C0")
        ax.set_title(f"after, alpha {alpha} (max/median {v.max() / np.median(v):.1f})", fontsize=8)
    for ax in axes:
        ax.set_xlabel("input channel")
        if log:
            ax.set_yscale("log")
    axes[0].set_ylabel("max |x| over calibration tokens")
    return fig


# --------------------------------------------------------------------------- a study's standard figures


def _given(v) -> bool:
    return v is not None and not (isinstance(v, float) and math.isnan(v)) and v != ""


def series_labels(table) -> list[str]:
    """One plot series per method and scheme family: integer runs of one granularity form a line over bit
    widths (``"ptq_rtn int/g16"``), other formats are their own series (``"qat nf4/g16"``), mixed runs are
    grouped by rule set (``"ptq_rtn first_last_8bit"``); GPTQ with act-order is its own method. Runs of one series
    are averaged (seeds); so that nothing else is, a study key (other than ``seed``) that takes two values among
    runs of one series at one ``bits_per_weight`` is added (bits, weight, act and the budgets, which move a
    run along that axis, are not) to every label of that series (``"... range=mse"``;
    a key a run left at its default reads as the default).

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"method": ["float", "ptq_rtn", "ptq_rtn", "qat"], "format": [None, "int", "nf4", "int"],
        ...                   "granularity": [None, "g16", "g16", "ch"], "weight": [None, "int4/g16", "nf4/g16", None],
        ...                   "rules": [None, "all", "all", "first_last_8bit"]})
        >>> series_labels(t)
        ['float', 'ptq_rtn int/g16', 'ptq_rtn nf4/g16', 'qat first_last_8bit']
        >>> series_labels(pd.DataFrame({"method": ["ptq_rtn"] * 3, "format": ["int"] * 3, "granularity": ["ch"] * 3,
        ...                             "range": ["absmax", "mse", "mse"], "bits_per_weight": [4.1, 4.1, 3.1]}))
        ['ptq_rtn int/ch range=absmax', 'ptq_rtn int/ch range=mse', 'ptq_rtn int/ch range=mse']
    """
    from qlab.experiments.results import method_labels  # noqa: PLC0415 -- keeps `import qlab.plot` light

    cols = {c: table[c] if c in table else [None] * len(table) for c in ("format", "granularity", "weight", "rules")}
    out = []
    for m, f, g, w, r in zip(method_labels(table), *cols.values()):
        if _given(r) and r != "all":
            out.append(f"{m} {r}")
        elif f in ("int", "uint"):
            out.append(f"{m} {f}/{g}")
        elif _given(w):
            out.append(f"{m} {w}")
        else:
            out.append(m)
    return _split_varying(table, out)


def _split_varying(table, labels: list[str]) -> list[str]:
    """``labels`` with ``key=value`` added for the study keys that vary within a series at one bits/weight."""
    import pandas as pd  # noqa: PLC0415 -- keeps `import qlab.plot` light

    from qlab.experiments.study import KEYS  # noqa: PLC0415

    x = table["bits_per_weight"] if "bits_per_weight" in table else pd.Series([0.0] * len(table), index=table.index)
    # not split by: seeds (averaged), and what moves a run along the x axis (bits, the spec strings, a budget)
    keys = [k for k in KEYS if k in table and k not in ("seed", "method", "bits", "weight", "act", "budget_bpw", "budget_mib")]
    filled = {k: pd.Series([str(v) if _given(v) else str(KEYS[k].default) for v in table[k]], index=table.index)
              for k in keys}
    lab = pd.Series(labels, index=table.index)
    out = list(labels)
    for name, idx in lab.groupby(lab, sort=False).groups.items():
        split = [k for k in keys if (filled[k][idx].groupby(x[idx].to_numpy()).nunique() > 1).any()]
        if split:
            for i in idx:
                pos = table.index.get_loc(i)
                out[pos] = name + "".join(f" {k}={filled[k][i]}" for k in split)
    return out


def study_figures(table, layers=None, name: str = "") -> dict[str, Figure]:
    """A study's standard figures from its tables: ``pareto`` (metric against model size), ``<metric>_vs_bits``
    (one line per :func:`series_labels` series) and, when per-layer rows exist, ``layers`` (weight SQNR per
    layer, one bar per layer's OWN spec: a mixed run's 8-bit and 3-bit layers are never averaged).

    Example:
        >>> import pandas as pd
        >>> t = pd.DataFrame({"method": ["float", "ptq_rtn"], "model_mib": [1.0, 0.3], "accuracy": [0.9, 0.8],
        ...                   "weight": [None, "int8/ch"], "format": [None, "int"], "granularity": [None, "ch"],
        ...                   "bits_per_weight": [32.0, 8.1]})
        >>> sorted(study_figures(t))
        ['accuracy_vs_bits', 'pareto']
    """
    from qlab.experiments.results import method_labels  # noqa: PLC0415 -- keeps `import qlab.plot` light

    metric, maximize = ("accuracy", True) if "accuracy" in table else ("perplexity", False)
    t = table.assign(series=series_labels(table), method=method_labels(table))
    figs = {"pareto": pareto(t, x="model_mib", y=metric, hue="method", label="weight", maximize=maximize,
                             title=f"{name}: {metric} vs size", collapsed="collapsed")}
    if (t["method"] != "float").any() and "bits_per_weight" in t:
        figs[f"{metric}_vs_bits"] = metric_vs_bits(t, y=metric, hue="series", by=None, collapsed="collapsed",
                                                   title=f"{name}: {metric} vs bits/weight")
    if layers is not None and len(layers) and "weight_sqnr_db" in layers:
        q = layers[layers["weight_spec"] != "float"]
        if "method" in q and (q["method"] == "ptq_rtn").any():
            q = q[q["method"] == "ptq_rtn"]
        if len(q):
            figs["layers"] = layer_bars(q, y="weight_sqnr_db", hue="weight_spec", title=f"{name}: weight SQNR per layer")
    return figs


def save_study_figures(out, table, layers=None, name: str = "") -> list[pathlib.Path]:
    """Write :func:`study_figures` as ``<out>/<figure>.png``; returns the paths.

    Example:
        >>> import pandas as pd, tempfile
        >>> t = pd.DataFrame({"method": ["float"], "model_mib": [1.0], "accuracy": [0.9], "weight": [None]})
        >>> [p.name for p in save_study_figures(tempfile.mkdtemp(), t)]
        ['pareto.png']
    """
    return [save(fig, pathlib.Path(out) / f"{key}.png") for key, fig in study_figures(table, layers, name).items()]


def sensitivity_heatmap(scores, *, ax=None, title: str | None = None) -> Figure:
    """Per-layer sensitivity as a heatmap: one row per layer (table order), one column per candidate, the
    colour the ``score`` (symmetric-log scale: measured scores can be slightly negative); unusable cells blank.
    ``scores``: a sensitivity table (``layer, candidate, score``, as ``qlab.analysis.sensitivity`` returns).

    Example:
        >>> import pandas as pd
        >>> s = pd.DataFrame({"layer": ["a", "a", "b", "b"], "candidate": ["int2/ch", "int8/ch"] * 2,
        ...                   "score": [4.0, 0.01, 1.0, 0.001]})
        >>> [t.get_text() for t in sensitivity_heatmap(s).axes[0].get_yticklabels()]
        ['a', 'b']
    """
    layers = list(dict.fromkeys(scores["layer"]))
    cands = list(dict.fromkeys(scores["candidate"]))
    grid = scores.pivot_table(index="layer", columns="candidate", values="score", aggfunc="first", dropna=False)
    grid = grid.reindex(index=layers, columns=cands)
    fig, ax = _fig(ax, figsize=(1.2 * len(cands) + 3, 0.28 * len(layers) + 2))
    v = grid.to_numpy(dtype=float)
    finite = np.abs(v[np.isfinite(v) & (v != 0)])
    thresh = float(np.percentile(finite, 5)) if finite.size else 1.0
    norm = matplotlib.colors.SymLogNorm(linthresh=max(thresh, 1e-12), vmin=min(0.0, np.nanmin(v)),
                                        vmax=max(np.nanmax(v), thresh * 10))
    im = ax.imshow(np.ma.masked_invalid(v), aspect="auto", cmap="viridis", norm=norm)
    ax.set_xticks(range(len(cands)), cands, rotation=30, ha="right")
    ax.set_yticks(range(len(layers)), layers, fontsize=7 if len(layers) > 20 else 9)
    fig.colorbar(im, ax=ax, label="predicted damage (score)")
    ax.set_title(title or "sensitivity: layer x candidate")
    return fig


def allocation_bars(choices, *, ax=None, title: str | None = None) -> Figure:
    """The bits per weight each layer got (``8 * bytes / params``, scales included), one bar per layer in
    order, labelled with its candidate. ``choices``: ``Allocation.choices`` or a ``layers.csv`` slice with
    ``layer, candidate, params, bytes`` (``packed_bytes`` is used where ``bytes`` is missing).

    Example:
        >>> import pandas as pd
        >>> c = pd.DataFrame({"layer": ["a", "b"], "candidate": ["int2/ch", "int8/ch"], "params": [64, 64],
        ...                   "bytes": [20, 68]})
        >>> [float(p.get_height()) for p in allocation_bars(c).axes[0].patches]
        [2.5, 8.5]
    """
    nbytes = choices["bytes"] if "bytes" in choices else choices["packed_bytes"]
    bits = 8 * nbytes.to_numpy(dtype=float) / choices["params"].to_numpy(dtype=float)
    names = list(choices["layer"])
    fig, ax = _fig(ax, figsize=(max(6.4, 0.35 * len(names) + 2), 4.0))
    cands = list(dict.fromkeys(choices["candidate"]))
    cmap = matplotlib.colormaps["tab10"]
    colors = [cmap(cands.index(c) % cmap.N) for c in choices["candidate"]]
    ax.bar(range(len(names)), bits, color=colors)
    for c in cands:
        ax.bar([], [], color=cmap(cands.index(c) % cmap.N), label=str(c))
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 6 else 0,
                  ha="right" if len(names) > 6 else "center", fontsize=7 if len(names) > 20 else 9)
    ax.set_ylabel("bits / weight")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=7, title="candidate")
    ax.set_title(title or "chosen bits per layer")
    return fig


def budget_figure(scores, choices, table=None, point=None, *, x: str = "model_mib", y: str = "accuracy",
                  hue: str = "rules", maximize: bool = True, title: str | None = None) -> Figure:
    """One figure for a budget: the sensitivity heatmap, the chosen bits per layer and (with ``table``, a
    study's rows) the Pareto plot with ``point = (x, y)`` (the allocation's model) marked by a star.

    Example:
        >>> import pandas as pd
        >>> s = pd.DataFrame({"layer": ["a", "a"], "candidate": ["int2/ch", "int8/ch"], "score": [1.0, 0.1],
        ...                   "params": [64, 64], "bytes": [20, 68]})
        >>> t = pd.DataFrame({"model_mib": [1.0, 2.0], "accuracy": [0.5, 0.7], "rules": ["all", "all"]})
        >>> len(budget_figure(s, s.iloc[[1]], t, (1.5, 0.6)).axes)   # three panels and the colour bar
        4
    """
    panels = 3 if table is not None else 2
    fig = figure(figsize=(6 * panels, 4.6))
    axes = fig.subplots(1, panels)
    sensitivity_heatmap(scores, ax=axes[0])
    allocation_bars(choices, ax=axes[1])
    if table is not None:
        pareto(table, x=x, y=y, hue=hue, maximize=maximize, ax=axes[2], label_all=False)
        if point is not None:
            axes[2].scatter([point[0]], [point[1]], marker="*", s=320, color="crimson", edgecolors="k", zorder=6,
                            label="this budget")
            axes[2].legend(fontsize=7, loc="best")
    if title:
        fig.suptitle(title)
    return fig
