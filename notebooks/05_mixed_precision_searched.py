# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 05 · Mixed precision under a memory budget
#
# Give a budget, get the per-layer bit widths with the least predicted damage, and compare with every uniform
# precision **at the same packed bytes**. A study run with `budget_bpw = "int3/ch"` is allowed exactly the bytes of
# uniform int3/ch; `qlab.analysis` scores each layer at each candidate (`sensitivity`), then allocates the bytes
# exactly (a multiple-choice knapsack).
#
# `SMALL = True`: a digits MLP study computed here (seconds). `SMALL = False`: the Fashion-MNIST CNN study
# `results/mixed` (computed by `qlab sweep experiments/mixed.toml`), loaded; the slider retrains its float model once.

# %%
SMALL = True

import os
import pathlib

import ipywidgets as widgets
from IPython.display import display

import qlab.experiments as qx
from qlab import analysis, plot
from qlab.experiments import image
from qlab.experiments.results import predictor_table, sensitivity_from_layers

CANDIDATES = ["int2/ch", "int3/ch", "int4/ch", "int5/ch", "int6/ch", "int8/ch"]
if SMALL:
    OUT = pathlib.Path(os.environ.get("QLAB_RESULTS", "results")) / "nb05_mixed_small"
    study = {
        "name": "nb05_mixed",
        "base": {"hidden": [64, 64], "steps": 300, "candidates": CANDIDATES},
        "sweep": [
            {"method": ["ptq_rtn"], "bits": [2, 3, 4, 5]},
            {"method": ["ptq_rtn"], "rules": ["first_last_8bit"], "bits": [2]},
            {"method": ["ptq_rtn"], "budget_bpw": ["int2/ch", "int3/ch", "int4/ch", "int5/ch"],
             "sensitivity": ["sqnr", "measured"]},
        ],
    }
    table = qx.sweep(study, out=OUT, progress=False)
else:
    OUT = pathlib.Path("results/mixed")
    study = "experiments/mixed.toml"
    table = qx.load_results(OUT)
_, layers = qx.load_results(OUT, layers=True)
runs = {r.config_hash: r for r in qx.load_study(study, check=False).runs}
table[["method", "rules", "weight", "model_bytes", "bits_per_weight", "accuracy"]].round(4)

# %% [markdown]
# ## Sensitivity: layer x candidate
# The measured score is the increase of the held-out loss with only that layer quantized at that candidate
# (validation split); the search minimises the sum of the chosen scores.

# %%
searched = table[table["rules"] == "searched(measured)"]
row = searched.iloc[0]
scores = sensitivity_from_layers(layers, row["config_hash"])
plot.sensitivity_heatmap(scores, title="measured sensitivity (validation-loss increase)")

# %% [markdown]
# ## What the search chose, budget by budget

# %%
chosen = layers[layers["config_hash"].isin(searched["config_hash"]) & layers["candidate"].notna()]
chosen = chosen.merge(searched[["config_hash", "weight"]].rename(columns={"weight": "budget"}), on="config_hash")
chosen = chosen.assign(bits_per_layer=8 * chosen["packed_bytes"] / chosen["params"])
plot.layer_bars(chosen, y="bits_per_layer", hue="budget", title="bits per layer chosen by the measured search")

# %% [markdown]
# ## At equal bytes
# Every searched run has the bytes of a uniform run of the same study. The Pareto plot puts them side by side;
# the table pairs them. The predictor check ranks predicted against measured damage (Spearman) per sensitivity.

# %%
plot.pareto(table[table["method"] == "ptq_rtn"], x="model_mib", y="accuracy", hue="rules", label_all=False,
            title="searched vs uniform vs 8-bit first/last layers (RTN)")

# %%
uni = table[table["rules"] == "all"].set_index(["method", "weight"])
pairs = searched.assign(uniform=searched["weight"].str.extract(r"bytes of ([^)]+)\)", expand=False))
keys = list(zip(pairs["method"], pairs["uniform"]))
pairs = pairs.assign(uniform_acc=uni["accuracy"].reindex(keys).to_numpy(),
                     uniform_bytes=uni["model_bytes"].reindex(keys).to_numpy())
pairs[["method", "uniform", "model_bytes", "uniform_bytes", "accuracy", "uniform_acc"]].round(4)

# %%
predictor_table(table).round(3)

# %% [markdown]
# ## Move the budget
# The slider re-runs the allocation on the measured sensitivity table, quantizes the float model with the chosen
# rules (RTN), and puts the result on the Pareto plot (the star).

# %%
run = runs[row["config_hash"]]
costs, _, _ = image.search_costs(run)
scored = costs.merge(scores, on=["layer", "candidate"])
params = int(costs.drop_duplicates("layer")["params"].sum())
lo = int(scored.groupby("layer")["bytes"].min().sum())
hi = int(scored.groupby("layer")["bytes"].max().sum())


def show(budget_bpw: float):
    budget = max(lo, min(hi, int(budget_bpw * params / 8)))
    alloc = analysis.allocate(scored, budget_bytes=budget)
    m = image.evaluate_rules(run, alloc.rules())
    return plot.budget_figure(scores, alloc.choices, table[table["method"] == "ptq_rtn"],
                              (m["model_mib"], m["accuracy"]),
                              title=f"budget {8 * budget / params:.2f} bits/weight: {alloc.total_bytes} bytes, "
                                    f"accuracy {m['accuracy']:.4f}")


slider = widgets.FloatSlider(value=3.0, min=round(8 * lo / params + 0.01, 2), max=round(8 * hi / params, 2),
                             step=0.25, description="bits/weight", continuous_update=False)
widgets.interact(show, budget_bpw=slider)
show(3.0)
