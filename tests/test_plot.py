"""qlab.plot: figures from plain DataFrames (no models), labelled axes, PNG output."""

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from qlab import plot


def _table():
    rows = [{"method": "float", "weight": None, "bits_per_weight": 32.0, "model_mib": 1.0, "accuracy": 0.97,
             "granularity": None}]
    for m, drop in (("ptq_rtn", 0.05), ("qat", 0.01)):
        for b in (8, 4, 2):
            for g in ("ch", "g32"):
                bpw = b + (0.5 if g == "g32" else 0.1)
                rows.append({"method": m, "weight": f"int{b}/{g}", "bits_per_weight": bpw, "model_mib": bpw / 32,
                             "accuracy": 0.97 - drop * (8 / b) ** 1.2, "granularity": g})
    return pd.DataFrame(rows)


def test_pareto_front_is_monotone():
    t = _table()
    front = plot.pareto_front(t)
    f = t.loc[front]
    assert f["model_mib"].is_monotonic_increasing and f["accuracy"].is_monotonic_increasing
    for i in t.index.difference(front):  # everything else is dominated
        assert ((t.loc[front, "model_mib"] <= t.at[i, "model_mib"]) & (t.loc[front, "accuracy"] >= t.at[i, "accuracy"])).any()


def test_pareto_figure(tmp_path):
    fig = plot.pareto(_table(), x="model_mib", y="accuracy", hue="method", label="weight")
    assert isinstance(fig, Figure)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "model size (MiB)" and ax.get_ylabel() == "test accuracy"
    assert any("int2/ch" == t.get_text() for t in ax.texts)
    assert "Pareto frontier" in [t.get_text() for t in ax.get_legend().get_texts()]
    p = plot.save(fig, tmp_path / "p.png")
    assert p.read_bytes()[:4] == b"\x89PNG"


def test_metric_vs_bits_and_layer_bars(tmp_path):
    fig = plot.metric_vs_bits(_table(), y="accuracy", hue="method", by="granularity")
    assert fig.axes[0].get_xlabel() == "bits / weight"
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(l.startswith("float") for l in labels) and "qat / g32" in labels
    layers = pd.DataFrame({"layer": ["layers/0", "head"] * 2, "order": [0, 1] * 2,
                           "weight_sqnr_db": [20.0, 25.0, 8.0, 9.0], "weight": ["int4/ch"] * 2 + ["int2/ch"] * 2})
    fig = plot.layer_bars(layers, y="weight_sqnr_db", hue="weight")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["layers/0", "head"]
    assert fig.axes[0].get_ylabel() == "weight SQNR (dB)"
    plot.save(fig, tmp_path / "l.png")


def test_weight_histogram_grid():
    w = np.random.default_rng(0).normal(size=(64, 32)).astype(np.float32)
    grid = plot.quant_grid(w, "int3")
    assert len(grid) <= 8 and np.isclose(np.abs(grid).max(), np.abs(w).max(), rtol=1e-3)
    assert len(plot.quant_grid(w, "nf4")) <= 16
    fig = plot.weight_histogram(w, "int3/ch")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "weight value" and "SQNR" in ax.get_title()
    assert len(ax.lines) >= len(grid)  # grid lines drawn
    assert isinstance(plot.weight_histogram(w), Figure)


def test_log_axes_when_the_metric_spans_orders_of_magnitude():

    from qlab import plot

    t = pd.DataFrame({"model_mib": [600.0, 650.0, 700.0, 1000.0], "perplexity": [1e9, 60.0, 21.0, 17.0],
                      "method": ["rtn", "gptq", "gptq", "float"], "bits_per_weight": [2.0, 3.0, 4.0, 32.0]})
    assert plot.pareto(t, y="perplexity", maximize=False).axes[0].get_yscale() == "log"
    assert plot.metric_vs_bits(t, y="perplexity", by=None).axes[0].get_yscale() == "log"
    near = t.assign(perplexity=[25.0, 22.0, 21.0, 17.0])
    assert plot.pareto(near, y="perplexity", maximize=False).axes[0].get_yscale() == "linear"
    assert plot.pareto(t, y="perplexity", maximize=False, logy=False).axes[0].get_yscale() == "linear"


def test_collapsed_runs_are_crosses_on_the_top_edge_not_points_on_the_axis():
    t = pd.DataFrame({"method": ["float", "ptq_rtn", "ptq_rtn", "ptq_rtn"], "model_mib": [4.0, 1.0, 0.6, 0.3],
                      "perplexity": [17.0, 18.0, 40.0, 1.8e11], "weight": [None, "int8/ch", "int4/ch", "int2/ch"],
                      "bits_per_weight": [32.0, 8.0, 4.0, 2.0], "collapsed": [False, False, False, True]})
    figs = plot.study_figures(t)
    for key in ("pareto", "perplexity_vs_bits"):
        ax = figs[key].axes[0]
        assert ax.get_yscale() == "linear" and ax.get_ylim()[1] < 100  # 1.8e11 does not stretch the axis
        labels = ax.get_legend_handles_labels()[1]
        assert "collapsed (1)" in labels
    # without the column, the same rows stretch the axis onto a log scale
    assert plot.study_figures(t.drop(columns="collapsed"))["pareto"].axes[0].get_yscale() == "log"


def test_metric_vs_bits_error_bars_are_the_seed_std():
    t = pd.DataFrame({"method": ["q"] * 6, "bits": [2, 2, 2, 4, 4, 4], "seed": [0, 1, 2] * 2,
                      "accuracy": [0.6, 0.7, 0.8, 0.85, 0.85, 0.85]})
    ax = plot.metric_vs_bits(t, y="accuracy", x="bits", by=None).axes[0]
    line = ax.get_lines()[0]
    np.testing.assert_allclose(np.asarray(line.get_ydata(), float), [0.7, 0.85])
    bars = [c for c in ax.collections if len(c.get_segments()) == 2][0]  # the vertical error bars
    spans = [seg[1][1] - seg[0][1] for seg in bars.get_segments()]
    np.testing.assert_allclose(spans, [2 * 0.1, 0.0], atol=1e-9)
    assert plot.metric_vs_bits(t.assign(lr=t["bits"] * 1e-3), x="lr", by=None, logx=True).axes[0].get_xscale() == "log"


def test_panels_keep_a_hue_colour_and_name_the_collapsed_runs():
    t = pd.DataFrame({"method": ["float"] + ["ptq_rtn"] * 6, "granularity": [None] + ["tensor"] * 3 + ["ch"] * 3,
                      "range": ["float", "absmax", "mse", "mse", "absmax", "mse", "mse"],
                      "bits": [None, 4, 4, 8, 4, 4, 8], "ppl_ratio": [1.0, 3e9, 20.0, 1.1, 3.0, 4.0, 1.0],
                      "collapsed": [False, True, False, False, False, False, False]})
    fig = plot.metric_vs_bits_panels(t, "granularity", y="ppl_ratio", x="bits", hue="range", collapsed="collapsed")
    tensor, ch = fig.axes
    colour = {ax: {c.get_label(): c.lines[0].get_color() for c in ax.containers} for ax in (tensor, ch)}
    assert colour[tensor]["mse"] == colour[ch]["mse"] != "C3"  # absmax drew no line per tensor: mse keeps its colour
    assert [a.get_text() for a in tensor.texts] == ["absmax"] and not ch.texts  # the collapsed run, by its range
    assert tensor.get_yscale() == ch.get_yscale() == "log" and tensor.get_ylim()[1] < 1e3
