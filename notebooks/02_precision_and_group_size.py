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
# # 02 · Precision × group size on Fashion-MNIST
#
# A sweep of integer weight precision (bits) against scale granularity (per channel, groups of 16, or 64 with padding)
# for an MLP on Fashion-MNIST, with `qlab.sweep`: the study is a plain dict here (the same structure as
# `experiments/precision.toml`), the results a DataFrame, the plots read only that table.
#
# `SMALL = True` trains on 5,000 images for a few hundred steps with round-to-nearest PTQ only (about a
# minute on a laptop CPU); `SMALL = False` runs the whole training set, more bit widths and QAT.
# Results are kept in `$QLAB_RESULTS/nb02_precision/` (default `results/`): rerunning the notebook
# reuses finished runs.

# %%
SMALL = True

import os
import pathlib

import qlab.experiments as qx
from qlab import plot

OUT = pathlib.Path(os.environ.get("QLAB_RESULTS", "results")) / ("nb02_precision" + ("_small" if SMALL else ""))

study = {
    "name": "nb02_precision",
    "base": {
        "model": "mlp", "data": "fashion_mnist",
        "hidden": [128] if SMALL else [256, 256],
        "train_size": 5000 if SMALL else 0,
        "steps": 300 if SMALL else 3000, "batch_size": 128, "learning_rate": 2e-3,
        **({} if SMALL else {"qat_steps": 300, "qat_learning_rate": 5e-4}),
    },
    "sweep": {
        "method": ["float", "ptq_rtn"] if SMALL else ["float", "ptq_rtn", "qat"],
        "bits": [8, 4, 3, 2] if SMALL else [8, 6, 5, 4, 3, 2],
        "granularity": ["ch", "g16"] if SMALL else ["ch", "g16", "g64p"],  # 784 inputs: g16 divides, g64p pads
    },
}
print(len(qx.load_study(study).runs), "runs")

# %%
table = qx.sweep(study, out=OUT, progress=False)
table[["method", "weight", "bits_per_weight", "model_mib", "accuracy", "accuracy_drop"]].round(4)

# %% [markdown]
# Accuracy against model size: the Pareto frontier is the set of configurations no other one beats on
# both size and accuracy. Smaller groups cost bits (one 16-bit scale per group) but buy accuracy at low
# precision.

# %%
plot.pareto(table, x="model_mib", y="accuracy", hue="method", label="weight", title="Fashion-MNIST MLP")

# %%
plot.metric_vs_bits(table, y="accuracy", hue="method", by="granularity")

# %% [markdown]
# Per-layer weight error for the PTQ runs (`layers.csv`): which layer suffers most at each precision.

# %%
runs, layers = qx.load_results(OUT, layers=True)
ptq = layers[(layers["method"] == "ptq_rtn") & (layers["weight_spec"] != "float")]
plot.layer_bars(ptq, y="weight_sqnr_db", hue="weight")
