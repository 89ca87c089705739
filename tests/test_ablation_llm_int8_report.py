"""experiments/ablation_llm_int8.py as the report of the sweep study experiments/ablation_llm_int8.toml: the study
run end to end on the tiny Gemma, then the report written from its stored runs."""

from __future__ import annotations

import dataclasses
import pathlib
import tomllib

import numpy as np
import pandas as pd

import qlab.experiments as qx
from test_results_layout import layout_problems, load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]




def _synthetic_outliers(m, blocks: int, positions: int) -> pd.DataFrame:
    """An outliers.csv with two systematic hidden dimensions (3 and 5; 3 also at attn_out) and a first block whose
    normed input is large everywhere (the tiny model has no activation above 6)."""
    rng = np.random.default_rng(0)
    inputs = {}
    for i in range(blocks):
        for site, layer in m.SITE_LAYER.items():
            x = rng.normal(0, 0.5, (positions, 16)).astype(np.float32)
            x[: positions // 4, [3, 5]] = 9.0
            if i == 0 and site == "attn_in":
                x[:] = 7.0
            inputs[f"layers/{i}/{layer}"] = x
    return m.outlier_table(inputs, {(i, s): np.ones(16) for i in range(blocks) for s in ("attn_in", "mlp_in")})


def test_llm_int8_study_and_report_on_the_tiny_gemma(tmp_path):
    m = load_script("ablation_llm_int8")
    cfg = tomllib.loads((ROOT / m.STUDY).read_text())
    cfg["base"].update(model="gemma3_tiny", data="tiny_text", eval_tokens=64)
    study = dataclasses.replace(qx.load_study(cfg), source=m.STUDY)
    assert len(study.runs) == 12
    out = tmp_path / "llm_int8"
    runs = qx.sweep(study, out=out, progress=False)
    assert len(runs) == 12 and set(runs.method) == {"float", "ptq_rtn", "zero_outliers"}

    # every run maps to its row: 8 in the W8A8 table (float first), 2 in the zeroing table
    table = m.scheme_table(runs)
    assert table.scheme.tolist() == ["float", *(label for label, _, _ in m.SCHEMES.values())]
    assert (table.ratio[1:] != 1.0).all()
    zt = m.zero_table(runs)
    assert zt.zeroed.tolist() == ["systematic outlier features", "random dimensions (3 seeds)"]

    # the one float capture for outliers.csv when it is missing (the tiny model: no outliers, nothing systematic)
    m.write(out, study)
    outl = pd.read_csv(out / "outliers.csv")
    assert len(outl) == 4 * 6 and (outl.positions == 64).all() and outl.outliers.sum() == 0
    assert layout_problems(out) == []

    # a given outliers.csv is reused: the decomposition's float columns are counted from it
    synth = _synthetic_outliers(m, 6, 64)
    synth.to_csv(out / "outliers.csv", index=False)
    m.write(out, study)
    assert layout_problems(out) == []
    text = (out / "README.md").read_text()
    assert "qlab sweep experiments/ablation_llm_int8.toml --out results/ablations/llm_int8" in text
    assert "python experiments/ablation_llm_int8.py --readme" in text
    assert f"{len(runs)} runs, {runs.wall_s.sum() / 60:.0f} min summed" in text
    assert "Systematic hidden dimensions** (an outlier in >= 25% of the 12 normed inputs): 2" in text
    assert "In blocks 0 *every* one of the 16 dimensions" in text
    assert "the `zero_outliers` run counted 0 systematic dimensions" in text  # the synthetic table is not the run's
    t = m.scheme_table(runs, synth).set_index("scheme")
    # threshold 6: attn_in block 0 (all 16) + 2 dims at every other site and block, each site x its projections
    per_block = 3 * 2 + 1 * 2 + 2 * 2 + 1 * 2
    expect = 100 * (per_block * 6 + 3 * 14) / (7 * 16 * 6)
    assert np.isclose(t.loc[m.SCHEMES["llm_int8_t6"][0], "float cols %"], expect)
    assert t.loc[m.SCHEMES["vector_wise"][0], "float cols %"] == 0.0
    assert (out / "outliers.png").stat().st_size > 0

    # a table counted on other tokens is refused
    synth.assign(positions=50).to_csv(out / "outliers.csv", index=False)
    try:
        m.write(out, study)
    except ValueError as e:
        assert "50 positions" in str(e)
    else:
        raise AssertionError("write accepted an outliers.csv of 50 positions for 64 tokens")
