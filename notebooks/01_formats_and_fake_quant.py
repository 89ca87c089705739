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
# # 01 · Number formats and fake quantization
#
# What each format can represent, how the error falls with bits, how the straight-through estimator
# (STE) lets gradients through `round`, and what a real layer's weights look like on a quantization grid.
# Public API only: `qlab`, `qlab.plot`, `qlab.data`, `qlab.models`, `qlab.train`.
#
# `SMALL = True` (the default) runs in seconds; set `SMALL = False` for larger tensors and a longer training run.

# %%
SMALL = True

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

import qlab
from qlab import plot

# %% [markdown]
# ## Each format's grid
# The values a format can represent when one scale maps the range [-1, 1] onto it (absmax scaling):
# integers are uniform, minifloats are dense near zero, NF4 follows a normal distribution's quantiles.

# %%
formats = ["int2", "int3", "int4", "fp4_e2m1", "nf4", "fp6_e3m2", "int8"]
x = np.linspace(-1, 1, 9)
fig = plot.figure(figsize=(7, 3.2), layout="constrained")
ax = fig.add_subplot()
for i, f in enumerate(formats):
    grid = plot.quant_grid(x, f)
    ax.plot(grid, np.full_like(grid, i), "|", ms=12, mew=1.2)
    ax.text(1.05, i, f"{len(grid)} values", va="center", fontsize=8)
ax.set_yticks(range(len(formats)), formats)
ax.set_xlim(-1.1, 1.35)
ax.set_xlabel("representable value (scale: absmax = 1)")
ax.set_title("quantization grids")
fig

# %% [markdown]
# ## Error against bits
# Signal-to-quantization-noise ratio of Gaussian weights for integer formats, per channel and in
# groups of 32, against the *stored* bits per weight (scales included: a group of 32 with a 16-bit
# scale costs 0.5 bit per weight). Each extra bit buys about 6 dB.

# %%
shape = (256, 256) if SMALL else (2048, 2048)
w = jax.random.normal(jax.random.key(0), shape)
rows = []
for bits in range(2, 9):
    for gran in ("tensor", "ch", "g32"):
        spec = qlab.parse_spec(f"int{bits}/{gran}")
        rows.append({"granularity": gran, "bits": bits, "bits_per_weight": qlab.bits_per_weight(spec, shape),
                     "sqnr_db": float(qlab.sqnr_db(w, qlab.fake_quant(w, spec)))})
for f in ("nf4/g32", "fp4_e2m1/g32", "mxfp4", "fp8_e4m3/ch"):
    rows.append({"granularity": f, "bits": qlab.parse_spec(f).bits, "bits_per_weight": qlab.bits_per_weight(f, shape),
                 "sqnr_db": float(qlab.sqnr_db(w, qlab.fake_quant(w, f)))})
errors = pd.DataFrame(rows)
plot.LABELS["sqnr_db"] = "SQNR (dB)"
plot.metric_vs_bits(errors, y="sqnr_db", hue="granularity", by=None, reference=None,
                    title="Gaussian weights: SQNR vs stored bits/weight")

# %%
errors[errors["bits"] == 4].round(2)

# %% [markdown]
# ## The straight-through estimator
# `fake_quant` rounds in the forward pass; its gradient is 1 inside the clipping range and 0 outside
# (the "clipped" STE), so training can move weights across rounding boundaries.

# %%
spec = "int3/tensor/fixed(-1,1)"
xs = jnp.linspace(-1.6, 1.6, 801)
ys = qlab.fake_quant(xs, spec)
grads = jax.grad(lambda v: qlab.fake_quant(v, spec).sum())(xs)
fig = plot.figure(figsize=(7, 3.2), layout="constrained")
a1, a2 = fig.subplots(1, 2)
a1.plot(xs, xs, ":", color="0.5", label="identity")
a1.plot(xs, ys, label=f"fake_quant ({spec})")
a1.set_xlabel("x"); a1.set_ylabel("forward"); a1.legend(fontsize=7)
a2.plot(xs, grads, color="C3")
a2.set_xlabel("x"); a2.set_ylabel("d fake_quant / dx (STE)")
fig

# %% [markdown]
# ## A real layer's weights on the grid
# Train a small MLP on scikit-learn digits, then look at its first layer's weights with a spec's grid
# overlaid (the grid drawn is the one for a single scale over the whole tensor; per-channel and
# per-group specs have one such grid per scale group).

# %%
from flax import nnx

from qlab.data import digits_dataset
from qlab.models import MLP
from qlab.train import train

ds = digits_dataset(seed=0)
model = MLP(64, hidden=(128, 128) if SMALL else (256, 256), out=10, rngs=nnx.Rngs(0))
train(model, ds, steps=150 if SMALL else 1500, batch_size=64, learning_rate=3e-3, progress=False)
kernel = np.asarray(model.layers[0].kernel[...])
kernel.shape

# %%
specs = ["int8/ch", "int4/ch", "int3/g16", "nf4/g16"]
fig = plot.figure(figsize=(9, 5.5), layout="constrained")
for ax, s in zip(fig.subplots(2, 2).ravel(), specs):
    plot.weight_histogram(kernel, s, ax=ax, bins=80)
fig

# %% [markdown]
# ### Interactive
# With a widget frontend (JupyterLab), pick the format, bits and group size and watch the grid and the
# error move. Without one (e.g. when this notebook is executed headless) the static figures above stand in.

# %%
try:
    import ipywidgets as widgets
    from IPython.display import display
except ImportError:  # no widgets: the static figures above are the whole story
    widgets = None

if widgets is not None:
    def show(fmt="int", bits=4, granularity="ch", symmetric=True):
        head = f"int{bits}" if fmt == "int" else fmt
        spec = f"{head}/{granularity}/{'sym' if symmetric else 'asym'}"
        if fmt != "int" and not symmetric:
            spec = f"{head}/{granularity}"
        display(plot.weight_histogram(kernel, spec, bins=80))

    widgets.interact(show, fmt=["int", "nf4", "fp4_e2m1", "fp8_e4m3"], bits=(2, 8),
                     granularity=["tensor", "ch", "g8", "g16", "g32", "g64"], symmetric=True)
