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
# # 03 · Mixed precision by hand
#
# First and last layers are often the most sensitive. Is it better to keep them at 8 bits and squeeze
# the middle, or to quantize everything uniformly, **at the same memory**? (Compare at equal packed bytes: the
# last section does, against uniform precisions and a searched allocation of exactly the same bytes.)
#
# 1. by hand with `qlab.nn` rules on one trained model;
# 2. as a small study with `qlab.sweep` (named rule sets), compared on a size/accuracy Pareto plot.
#
# `SMALL = True`: scikit-learn digits (seconds). `SMALL = False`: Fashion-MNIST, longer training.

# %%
SMALL = True

import os
import pathlib

import pandas as pd
from flax import nnx

import qlab.experiments as qx
from qlab import evaluate, plot
from qlab import nn as qnn
from qlab.data import digits_dataset, fashion_mnist_dataset
from qlab.models import MLP
from qlab.train import train

ds = digits_dataset(seed=0) if SMALL else fashion_mnist_dataset(seed=0)
in_features = 64 if SMALL else 784
model = MLP(in_features, hidden=(128, 128) if SMALL else (512, 512), out=10, rngs=nnx.Rngs(0))
train(model, ds, steps=400 if SMALL else 3000, batch_size=64, learning_rate=3e-3, progress=False)
print("float accuracy", evaluate.accuracy(model, *ds.test))

# %% [markdown]
# ## By hand
# Rules are ordered regexes over layer paths (`layers/0`, `layers/1`, `head`); the first match wins.

# %%
candidates = {
    "uniform int4/ch": [qnn.Rule(".*", weight="int4/ch")],
    "uniform int3/ch": [qnn.Rule(".*", weight="int3/ch")],
    "first+last int8, middle int2": [qnn.Rule("layers/0|head", weight="int8/ch"), qnn.Rule(".*", weight="int2/ch")],
    "first+last int8, middle int3": [qnn.Rule("layers/0|head", weight="int8/ch"), qnn.Rule(".*", weight="int3/ch")],
}
rows = []
for name, rules in candidates.items():
    qm = qnn.quantize_model(model, rules)
    size = qnn.model_size(qm)
    rows.append({"config": name, "model_mib": size["packed_mib"], "accuracy": evaluate.accuracy(qm, *ds.test)})
by_hand = pd.DataFrame(rows)
by_hand.round(5)

# %%
qnn.layer_report(qnn.quantize_model(model, candidates["first+last int8, middle int2"]))[
    ["layer", "weight_spec", "params", "bits_per_weight", "packed_bytes", "sqnr_db"]]

# %% [markdown]
# ## As a study
# The same comparison over several middle precisions and seeds, with PTQ and a short QAT. The rule set
# `first_last_8bit` is built in (`@first`/`@last` are the first and last layers in call order); the
# by-hand version of it is spelled out as `mine` to show the syntax.

# %%
OUT = pathlib.Path(os.environ.get("QLAB_RESULTS", "results")) / ("nb03_mixed" + ("_small" if SMALL else ""))
study = {
    "name": "nb03_mixed",
    "base": {"data": "digits" if SMALL else "fashion_mnist", "hidden": [128, 128] if SMALL else [512, 512],
             "steps": 400 if SMALL else 3000, **({} if SMALL else {"qat_steps": 1000})},
    "rule_sets": {"mine": [{"pattern": "layers/0|head", "weight": "int8/ch"}, {"pattern": ".*", "weight": "$weight"}]},
    "sweep": {"method": ["ptq_rtn"] if SMALL else ["ptq_rtn", "qat"], "rules": ["all", "mine"],
              "bits": [2, 3, 4] if SMALL else [2, 3, 4, 5], "seed": [0] if SMALL else [0, 1, 2]},
}
table = qx.sweep(study, out=OUT, progress=False)
table[["method", "rules", "weight", "seed", "bits_per_weight", "model_mib", "accuracy"]].round(4)

# %%
plot.pareto(table, x="model_mib", y="accuracy", hue="rules", label="weight",
            title="uniform vs 8-bit first/last layers")

# %% [markdown]
# Why the ends: per-layer sensitivity of the uniform PTQ runs (accuracy drop when only that layer is
# quantized, from `layers.csv`).

# %%
_, layers = qx.load_results(OUT, layers=True)
uni = layers[(layers["rules"] == "all") & (layers["method"] == "ptq_rtn")]
plot.layer_bars(uni, y="sensitivity_drop", hue="weight", title="uniform PTQ: per-layer sensitivity")

# %% [markdown]
# ## At equal memory
# "8-bit first and last layers" is not a free lunch: the first layer holds most of this MLP's weights, so the rule
# stores far more bytes than uniform at the same middle bits (compare `bits_per_weight` above). A fair comparison
# holds the bytes fixed. For each hand-mixed RTN run: the best uniform run that is **no larger**, and a searched
# allocation (notebook 05) given **exactly** its bytes (`budget_mib` = its packed size; candidates int2..int8 per
# channel, measured sensitivity; run directly through the method registry, nothing written).

# %%
mixed = table[(table["rules"] == "mine") & (table["method"] == "ptq_rtn")]
uniform = table[(table["rules"] == "all") & (table["method"] == "ptq_rtn")]
pairs = []
for _, m in mixed.iterrows():
    fits = uniform[(uniform["seed"] == m["seed"]) & (uniform["model_bytes"] <= m["model_bytes"])]
    u = fits.loc[fits["accuracy"].idxmax()]
    run = qx.expand({"base": {**study["base"], "seed": int(m["seed"]), "method": "ptq_rtn",
                              "budget_mib": m["model_bytes"] / 2**20, "sensitivity": "measured",
                              "candidates": ["int2/ch", "int3/ch", "int4/ch", "int5/ch", "int6/ch", "int8/ch"]}})[0]
    s, _ = run.method.run(run)
    pairs.append({"seed": m["seed"], "mixed": m["weight"], "bytes": m["model_bytes"], "mixed_acc": m["accuracy"],
                  "searched_bytes": s["model_bytes"], "searched_acc": s["accuracy"],
                  "best_uniform_no_larger": u["weight"], "uniform_bytes": u["model_bytes"], "uniform_acc": u["accuracy"]})
pd.DataFrame(pairs).round(4)
