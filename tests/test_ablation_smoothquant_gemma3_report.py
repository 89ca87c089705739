"""experiments/ablation_smoothquant_gemma3.py reports the sweep study: the study file run on the tiny Gemma 3 (fewer
alphas, a short text) end to end, then the report's channels.csv, plots and README in the study layout."""

import dataclasses
import pathlib
import tomllib

import numpy as np
import pandas as pd

import qlab.experiments as qx
from test_results_layout import layout_problems, load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "ablation_smoothquant_gemma3.py"




def test_report_of_the_tiny_study(tmp_path):
    m = load_script("ablation_smoothquant_gemma3")
    cfg = tomllib.loads((ROOT / m.STUDY).read_text())
    cfg["base"].update(model="gemma3_tiny", data="tiny_text", eval_tokens=64, calibration="tiny_text",
                       calibration_seqs=4, calibration_len=16)
    for s in cfg["sweep"]:
        if "alpha" in s:
            s["alpha"] = [0.0, 0.5, 1.0]
    study = dataclasses.replace(qx.load_study(cfg), source=m.STUDY)  # the tiny variant of the study file
    out = tmp_path / "smoothquant_gemma3"
    runs = qx.sweep(study, out=out, progress=False)
    assert len(runs) == 9

    c = m.curves(runs)
    assert sorted(c) == ["per_token", "static"]
    assert all(rtn is not None and sq.alpha.tolist() == [0.0, 0.5, 1.0] for sq, rtn in c.values())
    assert (runs[m.series(runs) == "static"].static_range_max > 0).all()

    m.write(out, study)  # no channels.csv yet: computed from the study's calibration capture
    ch = pd.read_csv(out / "channels.csv")
    assert list(ch.columns) == ["channel", "absmax", "weight_absmax", "smoothed_0.5", "smoothed_0.8"]
    assert len(ch) == 32  # the tiny model's d_model: the inputs of layers/0/attn/q_proj
    assert m._ratio(ch["smoothed_0.8"]) < m._ratio(ch["absmax"])  # smoothing flattens the channel maxima
    assert layout_problems(out) == []
    assert all((out / f).is_file() for f in ("alpha_sweep.png", "layer_ranges.png", "channels.png", "layers.csv"))
    text = (out / "README.md").read_text()
    assert "| RTN (no smoothing) |" in text and "| 0.5 |" in text
    assert "qlab sweep experiments/ablation_smoothquant_gemma3.toml --out results/ablations/smoothquant_gemma3" in text
    assert "python experiments/ablation_smoothquant_gemma3.py --readme" in text
    assert "`layers/0/attn/q_proj`" in text and "## What it shows" in text
    sm = m.smoothing(runs, qx.load_results(out, layers=True)[1])
    assert sorted(set(sm.proj)) == ["gate_proj", "k_proj", "q_proj", "up_proj", "v_proj"]
    assert len(sm) == 6 * 5 * 3  # blocks x smoothed projections x alphas (both series smooth alike)

    # a stored channels.csv is reused, not recomputed
    a = np.array([1.0, 2.0, 30.0, 1.5])
    pd.DataFrame({"channel": np.arange(4), "absmax": a, "weight_absmax": np.ones(4), "smoothed_0.5": np.sqrt(a),
                  "smoothed_0.8": a ** 0.2}).to_csv(out / "channels.csv", index=False)
    m.write(out, study)
    assert len(pd.read_csv(out / "channels.csv")) == 4
    assert "largest on dimension 2" in (out / "README.md").read_text()
    assert layout_problems(out) == []
