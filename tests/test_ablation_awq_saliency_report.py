"""The AWQ-saliency ablation's report (experiments/ablation_awq_saliency.py) on its study, run end to end on the toy
Gemma 3 (fewer fractions, seeds and scales than the real study)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import re
import sys
import tomllib


ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_results_layout import layout_problems, load_script  # noqa: E402

import qlab.experiments as qx  # noqa: E402




def tiny_study(m) -> dict:
    """The study file on ``gemma3_tiny`` (its projections are 32 / 64 wide: groups of 16), cut to 2 fractions,
    2 random seeds and s = 1 / 2 / 4."""
    d = tomllib.loads((ROOT / m.STUDY).read_text())
    d["base"].update(model="gemma3_tiny", data="tiny_text", eval_tokens=64, calibration="tiny_text",
                     calibration_seqs=4, calibration_len=16, weight="int3/g16/asym")
    for s in d["sweep"]:
        s["salient_fraction"] = [f for f in s["salient_fraction"] if f != 0.001]
        if "seed" in s:
            s["seed"] = [0, 1]
        if "salient_scale" in s:
            s["salient_scale"] = [1.0, 2.0, 4.0]
    return d


def test_awq_saliency_report_on_the_tiny_study(tmp_path):
    m = load_script("ablation_awq_saliency")
    # the toy study stands for the study file: study.json records that file as its source
    study = dataclasses.replace(qx.load_study(tiny_study(m)), source=m.STUDY)
    out = tmp_path / "awq_saliency"
    runs = qx.sweep(study, out=out, progress=False)
    assert len(runs) == 2 + 2 * 2 + 2 * 2 + 3
    m.write(out, study)
    assert layout_problems(out) == []
    assert json.loads((out / "study.json").read_text())["source"] == m.STUDY
    assert (out / "saliency.png").is_file() and (out / "layers.csv").is_file()

    keep = m.keep_table(runs)
    assert list(keep.columns) == ["kept", "1%", "3%"]
    assert list(keep.kept) == ["float", "RTN (none kept)", "activation", "weight", "random"]
    assert "+-" in keep.set_index("kept").loc["random", "1%"]  # mean +- std over the 2 seeds
    sc = m.scale_table(runs)
    assert sc.s.tolist() == [1.0, 2.0, 4.0] and sc["paper (OPT-6.7B)"].tolist() == [23.54, 11.92, 12.36]
    assert m.rtn_check(runs)["same"]  # Q(1 W) / 1 = Q(W)
    shares = m.kept_runs(runs).groupby("salient_fraction").float_weight_share.mean()
    assert 0 < shares[0.01] <= shares[0.03] < 0.2
    assert (m.scaled_runs(runs).float_weight_share == 0).all()

    text = (out / "README.md").read_text()
    for part in ("qlab sweep experiments/ablation_awq_saliency.toml --out results/ablations/awq_saliency",
                 "python experiments/ablation_awq_saliency.py --readme", "| activation", "| random",
                 "it equals the plain RTN run", "## What it shows", "All runs of the study are stored.",
                 f"{runs.wall_s.sum() / 60:.0f} min summed over the runs' `wall_s`",
                 "random: mean +- std over 2 seeds"):
        assert part in text, part
    assert not re.search(r"\bnan\b", text, re.I)  # no missing figure printed as nan


def test_awq_saliency_report_lists_runs_not_stored(tmp_path):
    """``--readme`` on a partial folder: the report is written, the runs not stored are listed as not run."""
    m = load_script("ablation_awq_saliency")
    d = tiny_study(m)
    d["sweep"] = d["sweep"][:1]
    study = dataclasses.replace(qx.load_study(d), source=m.STUDY)
    out = tmp_path / "awq_saliency"
    only = dataclasses.replace(study, runs=study.runs[:3])
    qx.sweep(only, out=out, progress=False)
    m.write(out, study)
    text = (out / "README.md").read_text()
    assert f"**Not run** ({len(study.runs) - 3} of {len(study.runs)} runs" in text
    assert layout_problems(out) == []
