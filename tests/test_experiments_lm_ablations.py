"""The language-model ablation methods (ptq_smoothquant, rtn_salient, zero_outliers) and ptq_rtn's activation keys,
on a tiny random Gemma 3 and a tiny text."""

import pathlib

import numpy as np
import pytest

from qlab.experiments import ConfigError, expand, load_study
from qlab.experiments import lm_ablations as la
from qlab.experiments.runner import plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
LM = {"model": "gemma3_tiny", "data": "tiny_text", "eval_tokens": 64}
CAL = {"calibration": "tiny_text", "calibration_seqs": 4, "calibration_len": 16}


def _run(**keys):
    run = expand({"base": {**LM, **keys}})[0]
    return run.method.run(run)


def test_lm_activation_specs_are_applied():
    """An lm run with act quantizes the projections' inputs: int2 activations cost more than int8 ones, and both
    differ from the weight-only run (they used to be silently ignored)."""
    w = _run(weight="int8/ch")[0]["ppl_ratio"]
    a8 = _run(weight="int8/ch", act="int8")[0]["ppl_ratio"]
    a2 = _run(weight="int8/ch", act="int2")[0]["ppl_ratio"]
    assert a8 != w and abs(np.log(a2)) > abs(np.log(a8))


def test_outlier_threshold_keeps_large_input_columns_float():
    """LLM.int8's decomposition: with a threshold below most inputs' magnitude nearly every column stays float, so
    int3 per-token activations lose less than without it."""
    plain = _run(weight="int8/ch", act="int3/ch")[0]["ppl_ratio"]
    decomposed = _run(weight="int8/ch", act="int3/ch", outlier_threshold=0.05)[0]["ppl_ratio"]
    assert abs(np.log(decomposed)) < abs(np.log(plain))


def test_smoothquant_without_smoothing_is_rtn():
    """smooth = "none" with dynamic activations is exactly ptq_rtn at the same specs; smoothing changes it."""
    rtn = _run(weight="int8/ch", act="int4")[0]
    none = _run(method="ptq_smoothquant", **CAL, weight="int8/ch", act="int4", smooth="none")[0]
    assert none["perplexity"] == rtn["perplexity"]
    m, layers = _run(method="ptq_smoothquant", **CAL, weight="int8/ch", act="int4", alpha=0.8)
    assert m["perplexity"] != rtn["perplexity"]
    smoothed = layers.dropna(subset=["act_ratio"])
    assert len(smoothed) and all(p.endswith(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
                                 for p in smoothed["layer"])
    assert (smoothed["act_ratio_smoothed"] <= smoothed["act_ratio"] + 1e-9).all()  # alpha 0.8 flattens inputs


def test_smoothquant_static_scales_are_calibrated_ranges():
    m, _ = _run(method="ptq_smoothquant", **CAL, weight="int8/ch", act="int8", smooth="none", act_scales="static")
    dyn, _ = _run(method="ptq_smoothquant", **CAL, weight="int8/ch", act="int8", smooth="none")
    assert m["static_range_max"] > 0 and "static_range_max" not in dyn and m["perplexity"] != dyn["perplexity"]


def test_rtn_salient_scale_one_is_rtn_and_keeping_everything_is_float():
    spec = "int3/g16/asym"
    rtn = _run(weight=spec)[0]
    s1 = _run(method="rtn_salient", **CAL, weight=spec, salient_scale=1.0)[0]
    assert s1["perplexity"] == pytest.approx(rtn["perplexity"], rel=1e-6) and s1["float_weight_share"] == 0
    keep = _run(method="rtn_salient", **CAL, weight=spec, salient_fraction=0.999)[0]
    assert keep["float_weight_share"] == 1.0 and keep["ppl_ratio"] == pytest.approx(1.0, abs=1e-4)
    some = _run(method="rtn_salient", **CAL, weight=spec, salient_fraction=0.1, saliency="weight")[0]
    assert 0 < some["float_weight_share"] < 0.2


def test_random_salient_channels_follow_the_seed():
    a = _run(method="rtn_salient", **CAL, weight="int3/g16/asym", saliency="random", seed=0)[0]
    b = _run(method="rtn_salient", **CAL, weight="int3/g16/asym", saliency="random", seed=1)[0]
    c = _run(method="rtn_salient", **CAL, weight="int3/g16/asym", saliency="random", seed=0)[0]
    assert a["perplexity"] == c["perplexity"] != b["perplexity"]


def test_zero_outliers_reports_what_it_zeroed():
    m, _ = _run(method="zero_outliers")
    # a random tiny model has no systematic outlier features: nothing is zeroed, and the row says so
    assert m["zeroed_features"] == len(m["systematic_dims"].split()) == 0 and m["ppl_ratio"] == 1.0


def test_systematic_hidden_dims_reads_the_normed_inputs():
    x = np.zeros((50, 6), np.float32)
    x[:5, 4] = 9.0  # >= 6 at 10% of the positions
    inputs = {f"layers/{i}/{p}": (x if p in ("attn/q_proj", "mlp/gate_proj") else np.zeros_like(x))
              for i in range(3) for p in ("attn/q_proj", "attn/o_proj", "mlp/gate_proj", "mlp/down_proj")}
    assert la.systematic_hidden_dims(inputs).tolist() == [4]
    z = la.zero_features(list(inputs), 6, [4], seed=0)
    assert set(z) == {p for p in inputs if p.endswith(("q_proj", "gate_proj"))}
    assert all(4 not in d for d in z.values())


@pytest.mark.parametrize("cfg, words", [
    ({**LM, "weight": "int8/ch", "outlier_threshold": 6.0}, "outlier_threshold = 6.0 decomposes the quantized inputs"),
    ({**LM, **CAL, "method": "ptq_smoothquant", "weight": "int8/ch", "act": "int8/ch", "act_scales": "static"},
     "needs a symmetric per-tensor act spec"),
    ({**LM, **CAL, "method": "ptq_smoothquant", "weight": "int8/ch", "act_scales": "static"}, "set act"),
    ({**LM, **CAL, "method": "ptq_smoothquant", "weight": "int8/ch", "alpha": 1.5}, "alpha = 1.5 must be a number in"),
    ({**LM, **CAL, "method": "ptq_smoothquant", "weight": "int8/ch", "smooth": "mlp"},
     "smooth = 'mlp' is unknown; allowed: all, none, norm_inputs"),
    ({**LM, **CAL, "method": "rtn_salient", "weight": "int3/g16", "salient_fraction": 1.0}, "must be in (0, 1)"),
    ({**LM, **CAL, "method": "rtn_salient", "weight": "int3/g16", "saliency": "hessian"},
     "saliency = 'hessian' is unknown"),
    ({**LM, "method": "zero_outliers", "zero_dims": "all"}, "zero_dims = 'all' is unknown"),
])
def test_ablation_key_errors(cfg, words):
    with pytest.raises(ConfigError) as e:
        load_study({"name": "x", "base": cfg}, check=False)
    assert words in str(e.value)


def test_an_ablation_key_the_method_does_not_read_is_an_error():
    with pytest.raises(ConfigError, match="method 'ptq_rtn' does not read alpha"):
        load_study({"name": "x", "include": [{**LM, "weight": "int8/ch", "alpha": 0.5}]}, check=False)


@pytest.mark.parametrize("name, n", [("smoothquant_gemma3", 25), ("llm_int8", 12), ("awq_saliency", 22)])
def test_ablation_study_files_validate(name, n):
    st = load_study(ROOT / f"experiments/ablation_{name}.toml", check=False)
    assert st.name == name and len(st.runs) == n
    _, _, todo = plan(st, out=f"/nonexistent/{name}")
    assert len(todo) == n
