"""Searched mixed precision in studies: budget keys, per-layer choices in the rows, shared sensitivity, bad input,
and the predictor check."""

import pathlib

import pandas as pd
import pytest

from qlab import analysis
from qlab import nn as qnn
from qlab.experiments import ConfigError, expand, image, load_results, sweep
from qlab.experiments import search as xsearch
from qlab.experiments.results import predictor_table, read_runs, spearman

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {"hidden": [16], "train_size": 256, "steps": 15, "qat_steps": 5, "batch_size": 32}
PTQ = {k: v for k, v in TINY.items() if k != "qat_steps"}
CANDS = ["int2/ch", "int4/ch", "int8/ch"]


@pytest.fixture(autouse=True)
def _fresh_search_cache():
    xsearch.clear_search_cache()
    yield
    xsearch.clear_search_cache()


@pytest.fixture(scope="module")
def searched_study(tmp_path_factory):
    out = tmp_path_factory.mktemp("search")
    study = {"name": "s", "base": {**TINY, "candidates": CANDS},
             "sweep": [{"method": ["ptq_rtn", "qat"], "bits": [2, 4]},
                       {"method": ["ptq_rtn", "qat"], "budget_bpw": ["int2/ch", "int4/ch"],
                        "sensitivity": ["sqnr", "measured"]}]}
    xsearch.clear_search_cache()
    table = sweep(study, out=out, progress=False)
    return out, table, load_results(out, layers=True)[1]


def test_unsearched_runs_keep_their_hashes_and_searched_runs_are_labelled():
    plain = expand({"base": {"bits": 4}})[0]
    assert "budget_bpw" not in plain.config and "candidates" not in plain.config
    run = expand({"base": {"hidden": [8], "budget_bpw": 3, "sensitivity": "fisher"}})[0]
    assert run.search.sensitivity == "fisher" and run.rules == ()
    cols = run.columns()
    assert cols["rules"] == "searched(fisher)" and cols["weight"] == "searched(fisher, 3 bpw)"
    assert cols["bits"] is None and cols["format"] is None
    assert run.config["budget_bpw"] == 3.0  # int and float budgets are one run
    assert run.config_hash == expand({"base": {"hidden": [8], "budget_bpw": 3.0, "sensitivity": "fisher"}})[0].config_hash


def test_searched_rows_hold_their_choices_and_real_bytes(searched_study):
    out, table, layers = searched_study
    s = table[table["predicted_damage"].notna()]
    assert len(s) == 8 and set(s["rules"]) == {"searched(sqnr)", "searched(measured)"}
    for _, row in s.iterrows():
        assert row["searched_bytes"] <= row["budget_bytes"]
        lay = layers[layers["config_hash"] == row["config_hash"]]
        assert len(lay) == 2 and lay["candidate"].isin(CANDS).all()
        # the spec that ran is the one chosen (qlab resolves ch -> ch1 on a Linear kernel)
        assert all(w.startswith(c) for w, c in zip(lay["weight_spec"], lay["candidate"]))
        assert int(lay["packed_bytes"].sum()) == row["searched_bytes"]
        # the whole sensitivity table rides along: the chosen score is that candidate's column
        assert all(lay[f"score {c}"].notna().all() for c in CANDS)
        assert [r[f"score {r['candidate']}"] for _, r in lay.iterrows()] == lay["score"].tolist()
        # model_bytes is the packed model: the chosen weights plus the float biases (16 + 10 f32)
        assert row["model_bytes"] == row["searched_bytes"] + 4 * 26
    uni = table[table["predicted_damage"].isna()].set_index(["method", "weight"])
    for spec in ("int2/ch", "int4/ch"):  # a budget named by a spec is exactly that uniform run's bytes
        b = s[s["weight"].str.endswith(f"bytes of {spec})")]
        assert (b["budget_bytes"] == uni.loc[("ptq_rtn", spec), "model_bytes"] - 4 * 26).all()
        assert (b["model_bytes"] <= uni.loc[("ptq_rtn", spec), "model_bytes"]).all()


def test_searched_rtn_row_matches_quantizing_with_the_chosen_rules(searched_study):
    out, table, layers = searched_study
    row = table[(table["method"] == "ptq_rtn") & (table["rules"] == "searched(measured)")].iloc[0]
    lay = layers[layers["config_hash"] == row["config_hash"]]
    rules = [qnn.Rule(p, weight=c) for p, c in zip(lay["layer"], lay["candidate"])]
    run = expand({"base": PTQ})[0]
    ds = image.dataset(run)
    model, _ = image.float_model(run)
    from qlab import evaluate

    acc = evaluate.accuracy(qnn.quantize_model(model, rules), *ds.test)
    assert acc == pytest.approx(row["accuracy"], abs=1e-9)


def test_sensitivity_is_computed_once_per_float_model_and_method(monkeypatch, tmp_path):
    calls = []
    real = analysis.sensitivity

    def counting(model, table, method, **kw):
        calls.append(method)
        return real(model, table, method, **kw)

    monkeypatch.setattr(analysis, "sensitivity", counting)
    sweep({"name": "c", "base": {**PTQ, "candidates": CANDS},
           "sweep": {"method": ["ptq_rtn", "ptq_gptq"], "budget_bpw": [3.0, 5.0], "sensitivity": ["sqnr", "fisher"]}},
          out=tmp_path, progress=False)
    assert sorted(calls) == ["fisher", "sqnr"]


@pytest.mark.parametrize("base, match", [
    ({"budget_bpw": 1.0}, r"budget_bpw = 1 \(\d+ bytes\) is below the smallest size the candidates reach: \d+ bytes "
                          r"\(2\.\d+ bits per weight\)"),
    ({"budget_mib": 1e-4}, r"budget_mib = 0.0001 .* below the smallest size .* MiB in all"),
    ({"budget_bpw": 4.0, "candidates": ["int4/g32"]}, r"no usable candidate for layer\(s\) \['head'\]"),
    ({"budget_bpw": 4.0, "candidates": ["int4/ch", "int9x/ch"]}, r"unknown candidate 'int9x/ch'.*allowed: 'keep'"),
    ({"budget_bpw": 4.0, "sensitivity": "hessian"}, r"sensitivity = 'hessian' is unknown; allowed: sqnr, measured"),
    ({"budget_bpw": 4.0, "allocation": "ilp"}, r"allocation = 'ilp' is unknown; allowed: dp, greedy, milp"),
    ({"budget_bpw": 4.0, "budget_mib": 1.0}, r"set one budget, not both"),
    ({"budget_bpw": 4.0, "rules": "first_last_8bit"}, r"rules = 'first_last_8bit' with a budget"),
    ({"budget_bpw": "keep"}, r"budget_bpw = 'keep'"),
    ({"budget_bpw": "int4/g32"}, r"budget_bpw = 'int4/g32': uniform_bytes: layers \['head'\] cannot take"),
    ({"budget_bpw": -2.0}, r"budget_bpw = -2.0 must be a positive number or a spec string"),
    ({"budget_bpw": 4.0, "candidates": []}, r"candidates = \[\] must be a non-empty list of strings"),
])
def test_bad_search_input_is_an_error_before_anything_runs(base, match):
    with pytest.raises(ConfigError, match=match):
        expand({"base": {"hidden": [16], **base}})


def test_a_method_that_cannot_search_does_not_read_the_budget():
    with pytest.raises(ConfigError, match="none of its runs reads: budget_bpw"):
        expand({"base": {"hidden": [16], "method": "ptq_awq", "budget_bpw": 4.0}})


def test_a_search_that_fails_writes_no_row(monkeypatch, tmp_path):
    def no_data(*a, **k):
        raise ValueError("sensitivity 'measured' needs data=(loss_fn, batches): it saw no data")

    monkeypatch.setattr(analysis, "sensitivity", no_data)
    study = {"name": "f", "base": {**PTQ, "candidates": CANDS, "sensitivity": "measured"},
             "sweep": {"method": ["ptq_rtn"], "budget_bpw": [3.0]}, "include": [{"method": "float"}]}
    table = sweep(study, out=tmp_path, progress=False, raise_on_error=False)
    assert table["method"].tolist() == ["float"]
    assert [r["row"]["method"] for r in read_runs(tmp_path)] == ["float"]


def test_spearman_matches_scipy():
    from scipy.stats import spearmanr

    x, y = [3.0, 1.0, 2.0, 5.0, 4.0, 4.0], [0.1, 0.5, 0.2, 0.9, 0.3, 0.7]
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert spearman([1, 2], [2, 1]) != spearman([1, 2], [2, 1])  # NaN below 3 pairs


def test_predictor_table_ranks_each_sensitivity_of_the_study(searched_study):
    _, table, _ = searched_study
    p = predictor_table(table)
    assert set(map(tuple, p[["method", "sensitivity"]].values)) == {
        (m, s) for m in ("ptq_rtn", "qat") for s in ("sqnr", "measured")}
    assert (p["runs"] == 2).all()  # two budgets each: too few for a correlation
    assert p["spearman"].isna().all()


def test_lm_search_on_the_tiny_model(tmp_path):
    study = {"name": "lm", "base": {"model": "gemma3_tiny", "data": "tiny_text", "eval_tokens": 32,
                                    "calibration": "tiny_text", "calibration_seqs": 2, "calibration_len": 16,
                                    "candidates": ["int2/ch", "int8/ch"]},
             "sweep": {"method": ["ptq_rtn"], "budget_bpw": ["int4/ch"], "sensitivity": ["sqnr"]},
             "include": [{"method": "ptq_rtn", "weight": "int4/ch"}]}
    table = sweep(study, out=tmp_path, progress=False)
    s, u = table.iloc[0], table.iloc[1]
    assert s["rules"] == "searched(sqnr)" and s["model_bytes"] <= u["model_bytes"]
    _, layers = load_results(tmp_path, layers=True)
    chosen = layers[(layers["config_hash"] == s["config_hash"]) & layers["candidate"].notna()]
    assert len(chosen) == 42 and set(chosen["candidate"]) == {"int2/ch", "int8/ch"}
    assert int(chosen["packed_bytes"].sum()) == s["searched_bytes"] <= s["budget_bytes"]


def test_lm_search_can_spend_bytes_on_the_embedding(tmp_path):
    """search_embed: the tied embedding is one more searched layer, and the uniform run that quantizes it too
    (a rule set matching every layer) is the equal-bytes comparison."""
    study = {"name": "lm_embed", "base": {"model": "gemma3_tiny", "data": "tiny_text", "eval_tokens": 32,
                                          "candidates": ["int2/ch", "int8/ch"]},
             "rule_sets": {"everything": [{"pattern": ".*"}]},
             "sweep": {"method": ["ptq_rtn"], "budget_bpw": ["int4/ch"], "search_embed": [False, True]},
             "include": [{"method": "ptq_rtn", "weight": "int4/ch", "rules": "everything"}]}
    table = sweep(study, out=tmp_path, progress=False)
    without, with_embed = (table[(table["rules"] == "searched(sqnr)") & (table["search_embed"] == v)].iloc[0]
                           for v in (False, True))
    uniform = table[table["rules"] != "searched(sqnr)"].iloc[0]
    _, layers = load_results(tmp_path, layers=True)

    def chosen(row):
        return layers[(layers["config_hash"] == row["config_hash"]) & layers["candidate"].notna()]

    assert "embed" not in set(chosen(without)["layer"])
    c = chosen(with_embed)
    assert len(c) == 43 and c.set_index("layer").loc["embed", "candidate"] in ("int2/ch", "int8/ch")
    assert int(c["packed_bytes"].sum()) == with_embed["searched_bytes"] <= with_embed["budget_bytes"]
    assert with_embed["model_bytes"] <= uniform["model_bytes"] < without["model_bytes"]
