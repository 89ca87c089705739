"""Studies of language models: a tiny random Gemma 3 (model = "gemma3_tiny") on a tiny text."""

import pathlib

import numpy as np
import pytest

from qlab.experiments import ConfigError, expand, lm, load_study, sweep
from qlab.experiments.runner import plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
LM = {"model": "gemma3_tiny", "data": "tiny_text", "eval_tokens": 64}
#: calibration keys: only GPTQ / AWQ read them (a study that sets a key no run reads is an error)
CAL = {"calibration": "tiny_text", "calibration_seqs": 4, "calibration_len": 16}


def test_lm_float_and_rtn_rows(tmp_path):
    study = {"name": "lm", "base": {**LM, "bits": 4, "granularity": "g16"}, "sweep": {"method": ["float", "ptq_rtn"]}}
    tab = sweep(study, out=tmp_path, progress=False)
    assert list(tab["method"]) == ["float", "ptq_rtn"]
    fl, q = tab.iloc[0], tab.iloc[1]
    assert np.isfinite(tab["perplexity"]).all() and (tab["perplexity"] > 1).all()
    assert fl["float_perplexity"] == q["float_perplexity"] == fl["perplexity"]
    assert q["perplexity"] != fl["perplexity"]
    # 6 layers x 7 projections quantized, the tied embedding float
    model, _ = lm.lm_model("gemma3_tiny")
    proj = sum(L.kernel[...].size for L in lm.lm_linears(model).values())
    params = int(fl["params"])
    assert int(q["quantized_params"]) == proj and int(fl["quantized_params"]) == 0
    assert q["bits_per_weight"] == pytest.approx(4 + 16 / 16)  # int4 + one 16-bit scale per 16 weights
    assert int(q["model_bytes"]) == proj * 5 // 8 + (params - proj) * 4
    assert int(fl["model_bytes"]) == params * 4
    assert q["model_mib"] == pytest.approx(q["model_bytes"] / 2**20)
    # paired figures against the float model on the same tokens
    assert (fl["ppl_ratio"], fl["kl"], fl["top1"]) == (1.0, 0.0, 1.0)
    assert q["ppl_ratio"] == pytest.approx(q["perplexity"] / q["float_perplexity"], rel=1e-5)
    assert 0 < q["ppl_ratio_se"] < q["perplexity_se"] / q["perplexity"]
    assert q["kl"] > 0 and 0 < q["kl_se"] < q["kl"] and 0 < q["top1"] <= 1
    vocab = model.config.vocab_size  # a random toy model sits near chance, so either side is possible
    assert [bool(v) for v in tab["collapsed"]] == [p > vocab for p in tab["perplexity"]]
    # the shared float model is left unchanged
    assert sweep(study, out=tmp_path, progress=False, force=True, only="method=float")[
        "perplexity"].iloc[0] == pytest.approx(fl["perplexity"], rel=1e-6)


def test_lm_keys_normalized_and_image_hashes_unchanged():
    runs = expand({"base": {**LM, **CAL}, "sweep": {"method": ["float", "ptq_rtn", "ptq_gptq"]}})
    f, r, g = runs
    assert f["calibration"] is None and r["calibration"] is None and g["calibration"] == "tiny_text"
    assert r["act_order"] is None and g["act_order"] is False and f["steps"] is None
    img = expand({"sweep": {"bits": [8]}})[0]
    assert "eval_tokens" not in img and "act_order" not in img


@pytest.mark.parametrize("cfg,words", [
    ({**LM, "data": "digits"}, "data = 'digits' cannot feed model 'gemma3_tiny' (a dataset of the image family: models mlp, cnn); allowed: austen, tiny_text"),
    ({"model": "mlp", "data": "austen"}, "data = 'austen' cannot feed model 'mlp' (a dataset of the lm family"),
    ({**LM, "method": "qat_lsq"}, "method = 'qat_lsq' is not available for model 'gemma3_tiny' (a method of the image family, not of 'lm' models); allowed: float"),
    ({**LM, **CAL, "method": "qat", "qat_init": "awq"}, "qat_init = 'awq' is unknown; allowed: gptq, rtn"),
    ({**LM, **CAL, "method": "qat", "qat_seq_len": 0}, "qat_seq_len = 0 must be a positive integer"),
    ({**LM, **CAL, "method": "ptq_gptq", "calibration": "ulysses"}, "calibration = 'ulysses' is unknown; allowed: emma"),
    ({**LM, **CAL, "method": "ptq_gptq", "act_order": "yes"}, "act_order = 'yes' must be true or false"),
    ({**LM, **CAL, "method": "ptq_gptq", "sequential": 1}, "sequential = 1 must be true or false"),
    ({**LM, "eval_tokens": 0}, "eval_tokens = 0 must be a positive integer"),
    ({**LM, "eval_tokens": 1500}, "eval_tokens = 1500: above 1024 it must be a multiple of 1024 (rows of BOS + 1023 "
                                  "text tokens), e.g. 1024 or 2048"),
    ({**LM, "method": "float", "eval_tokens": 3000}, "eval_tokens = 3000: above 1024 it must be a multiple of 1024"),
    ({**LM, "model": "gemma4"}, "model = 'gemma4' is unknown; allowed: mlp, cnn, gemma3, gemma3_tiny"),
    ({**LM, "evaltokens": 5}, "unknown key 'evaltokens'"),
])
def test_lm_validation_errors(cfg, words):
    with pytest.raises(ConfigError) as e:
        load_study({"name": "x", "base": cfg}, check=False)
    assert words in str(e.value)


def test_lm_long_evaluation_runs_in_rows_of_1024(tmp_path):
    """eval_tokens > 1024: rows of BOS + 1,023 text tokens, 4 per compiled call (5 rows: one call of 4, one padded),
    the per-token figures pooled."""
    from qlab.evaluate import bos_rows, perplexity_from_nll, token_nll

    study = {"name": "long", "base": {**LM, "data": "austen", "eval_tokens": 5 * 1024, "weight": "int4/g16"},
             "sweep": {"method": ["float", "ptq_rtn"]}}
    tab = sweep(study, out=tmp_path, progress=False)
    model, tok = lm.lm_model("gemma3_tiny")
    ids = lm.eval_ids("gemma3_tiny", "austen", 5 * 1024)
    enc = tok.encode(lm._text("austen")).ids
    assert np.asarray(ids).tolist() == bos_rows(enc, 1024, 5).tolist()
    assert np.asarray(ids[0]).tolist() == enc[:1024]  # row 0: the 1,024-token evaluation
    ppl, se = perplexity_from_nll(token_nll(model, ids))  # one call over all rows
    fl, q = tab.iloc[0], tab.iloc[1]
    assert fl["perplexity"] == pytest.approx(ppl, rel=1e-5) and fl["perplexity_se"] == pytest.approx(se, rel=1e-4)
    assert q["float_perplexity"] == fl["perplexity"] and q["perplexity"] != fl["perplexity"]
    assert q["ppl_ratio"] == pytest.approx(q["perplexity"] / q["float_perplexity"], rel=1e-5)


def test_lm_evaluation_longer_than_the_text_is_an_error(tmp_path):
    with pytest.raises(Exception, match=r"eval_tokens = 1024 is more than the data text 'tiny_text' holds: it has "
                                        r"566 tokens \(BOS \+ 565\), room for eval_tokens <= 566"):
        r = expand({"base": {**LM, "method": "float", "eval_tokens": 1024}})[0]
        r.method.run(r)
    with pytest.raises(Exception, match=r"eval_tokens = 1048576 is more than the data text 'austen' holds: it has "
                                        r"\d+ tokens .*room for eval_tokens <= \d+ \(\d+ rows of BOS \+ 1023\)"):
        r = expand({"base": {**LM, "data": "austen", "method": "float", "eval_tokens": 1024 * 1024}})[0]
        r.method.run(r)


def test_lm_group_size_checked_before_running(tmp_path):
    with pytest.raises(ConfigError, match=r"'int4/g128' does not fit layer 'layers/0/attn/q_proj' \(kernel 32x64\)"):
        plan({"name": "x", "base": {**LM, "weight": "int4/g128"}}, out=tmp_path)
    with pytest.raises(ConfigError, match="ptq_hqq.*asymmetric"):
        plan({"name": "x", "base": {**LM, "method": "ptq_hqq", "weight": "int4/g16"}}, out=tmp_path)


def test_gemma3_study_file_validates():
    st = load_study(ROOT / "experiments/gemma3_ptq.toml", check=False)
    assert len(st.runs) == 1 + 5 * 5
    _, _, todo = plan(st, out="/nonexistent/gemma3_ptq")
    assert {r["method"] for r in todo} == {"float", "ptq_rtn", "ptq_gptq", "ptq_awq", "ptq_hqq"}
    assert sum(r["method"] == "ptq_gptq" and r["act_order"] for r in todo) == 5


def test_lm_gptq_sequential_and_one_pass(tmp_path):
    study = {"name": "seq", "base": {**LM, **CAL, "method": "ptq_gptq", "weight": "int3/g16"},
             "sweep": {"sequential": [True, False]}}
    tab = sweep(study, out=tmp_path, progress=False)
    assert list(tab["sequential"]) == [True, False]
    seq, one = tab["perplexity"]
    assert np.isfinite([seq, one]).all() and seq != one  # block-by-block statistics differ from one float pass
    assert expand({"base": {**LM, "method": "ptq_hqq", "symmetric": False}})[0]["sequential"] is None


def test_lm_effective_kernels_reproduce_the_quantized_forward():
    """run_lm evaluates through the float graph with kernels dequantize(q) / s: the same logits as the
    quantized model's own forward (AWQ included, whose layers divide their input by s)."""
    import jax.numpy as jnp

    from qlab import nn as qnn
    from qlab import ptq

    model, _ = lm.lm_model("gemma3_tiny")
    linears = lm.lm_linears(model)
    rules = (qnn.Rule("embed"), qnn.Rule("|".join(linears), weight="int4/g16"))
    calib = [jnp.asarray(lm._calibration("gemma3_tiny", "tiny_text", 4, 16))]
    toks = calib[0][:2]
    qm = ptq.awq(model, rules, calib, forward=lambda m, b: m.features(b), sequential=True)
    kernels = lm._effective_kernels(qm)
    assert set(kernels) == set(linears)
    orig = {p: L.kernel[...] for p, L in linears.items()}
    try:
        for p, w in kernels.items():
            linears[p].kernel.value = w
        folded = np.asarray(model(toks))
    finally:
        for p, w in orig.items():
            linears[p].kernel.value = w
    want = np.asarray(qm(toks))
    assert np.abs(folded - want).max() <= 1e-4 * np.abs(want).max()
    assert np.abs(np.asarray(model(toks)) - want).max() > 1e-3 * np.abs(want).max()  # quantization did something


def test_lm_rules_keep_attention_call_sites_float(tmp_path):
    """The study's rules (pattern '.*') quantize the projections only: with sequential calibration the
    blocks run quantized, and the attention einsums must not be fake-quantized with the weight spec."""
    from qlab.nn import call_sites

    call_sites.SEEN_CALL_SITES.clear()
    study = {"name": "sites", "base": {**LM, **CAL, "method": "ptq_gptq", "weight": "int4/g16", "sequential": True}}
    tab = sweep(study, out=tmp_path, progress=False)
    assert np.isfinite(tab["perplexity"]).all()
    quantized_sites = [p for sites in call_sites.SEEN_CALL_SITES.values() for p in sites]
    assert quantized_sites == []


def test_lm_rows_carry_a_perplexity_standard_error(tmp_path):
    study = {"name": "se", "base": {**LM, "weight": "int4/g16"}, "sweep": {"method": ["float", "ptq_rtn"]}}
    t = sweep(study, out=tmp_path, progress=False)
    assert (t["perplexity_se"] > 0).all() and (t["perplexity_se"] < t["perplexity"]).all()
    assert t["float_perplexity_se"].nunique() == 1


#: lm QAT on the tiny model: trained on tiny_text, which is also its evaluation text (tests only)
QAT = {**LM, **CAL, "weight": "int3/g16", "qat_steps": 20, "batch_size": 4, "qat_seq_len": 16,
       "qat_learning_rate": 3e-3}


def test_lm_qat_from_rtn_and_gptq(tmp_path):
    study = {"name": "qat", "base": QAT, "include": [
        {"method": "float"}, {"method": "ptq_rtn"}, {"method": "qat", "qat_init": "rtn"},
        {"method": "ptq_gptq"}, {"method": "qat", "qat_init": "gptq"}]}
    tab = sweep(study, out=tmp_path, progress=False)
    assert list(tab["method"]) == ["float", "ptq_rtn", "qat", "ptq_gptq", "qat"]
    rtn, q_rtn, gptq, q_gptq = (tab.iloc[i] for i in (1, 2, 3, 4))
    assert [q_rtn["qat_init"], q_gptq["qat_init"]] == ["rtn", "gptq"]
    # step 0 of QAT from RTN is RTN: STE fake quant of the float kernels
    assert q_rtn["init_perplexity"] == pytest.approx(rtn["perplexity"], rel=1e-6)
    # from GPTQ: the baseline's GPTQ kernels are reused, re-quantized by the STE quantizer's own absmax scales
    assert q_gptq["gptq_reused"] == 1 and gptq["gptq_reused"] == 0
    assert q_gptq["init_perplexity"] != q_rtn["init_perplexity"]
    for q in (q_rtn, q_gptq):
        assert q["qat_final_loss"] < q["qat_first_loss"]
        assert q["perplexity"] < q["init_perplexity"]  # trained on the evaluation text here
        assert q["qat_tokens"] == 20 * 4 * 16 and q["bits_per_weight"] == rtn["bits_per_weight"]
    # the shared float model is left as loaded; a run is deterministic
    again = sweep(study, out=tmp_path, progress=False, force=True, only="method=float|qat,qat_init=rtn")
    assert again.iloc[0]["perplexity"] == pytest.approx(tab.iloc[0]["perplexity"], rel=1e-6)
    assert again.iloc[2]["perplexity"] == pytest.approx(q_rtn["perplexity"], rel=1e-5)


def test_lm_qat_trains_only_the_projection_kernels():
    from flax import nnx

    from qlab import nn as qnn

    model, _ = lm.lm_model("gemma3_tiny")
    qm = qnn.quantize_model(qnn.copy_model(model), (qnn.Rule("embed"), qnn.Rule(".*", weight="int4/g16")))
    trained = nnx.to_flat_state(nnx.state(qm, lm.QAT_TRAINS))
    assert len(trained) == len(lm.lm_linears(model)) == 42
    assert all(path[-1] == "kernel" and "embed" not in path for path, _ in trained)


def test_lm_qat_keys_stay_out_of_other_runs():
    runs = expand({"base": {**LM, **CAL}, "sweep": {"method": ["ptq_rtn", "ptq_gptq", "qat"]}})
    assert [("qat_init" in r, "qat_seq_len" in r) for r in runs] == [(False, False)] * 2 + [(True, True)]
    assert runs[2]["qat_init"] == "rtn" and runs[2]["batch_size"] == 64 and runs[0]["batch_size"] is None
    assert "qat_init" not in expand({"base": {"method": "qat"}})[0]
    with pytest.raises(ValueError, match="calibration text 'tiny_text' has 565 tokens: too short for qat_seq_len = 600"):
        r = expand({"base": {**QAT, "method": "qat", "qat_seq_len": 600}})[0]
        r.method.run(r)


def test_qat_gemma3_study_file_validates():
    st = load_study(ROOT / "experiments/qat_gemma3.toml", check=False)
    _, _, todo = plan(st, out="/nonexistent/qat_gemma3")
    qat = [r for r in todo if r["method"] == "qat"]
    assert sorted((r["qat_init"], str(r.weight)) for r in qat) == [
        ("gptq", "int3/g128"), ("gptq", "int4/g128"), ("rtn", "int3/g128"), ("rtn", "int4/g128")]
    assert {r["calibration"] for r in qat} == {"emma"} and {r["data"] for r in todo} == {"austen"}


_MESH_SCRIPT = r"""
import json, sys, tempfile
import jax
assert jax.device_count() == 4
from qlab.experiments import sweep
study = json.loads(sys.argv[2])
out = {tag: sweep(study, out=tempfile.mkdtemp(), progress=False, mesh=mesh)[["config_hash", "perplexity",
       "init_perplexity", "qat_final_loss"]].to_dict("list") for tag, mesh in [("one", None), ("mesh", "data=2,fsdp=2")]}
json.dump(out, open(sys.argv[1], "w"))
"""


def test_lm_qat_study_runs_over_a_mesh_unchanged(tmp_path):
    """The same study on one device and data-parallel + FSDP over 4 forced host devices: same runs, same result
    up to float reduction order (Adam and the STE rounding can amplify it a little)."""
    import json
    import os
    import subprocess
    import sys

    study = {"name": "qat_mesh", "base": {**QAT, "method": "qat", "weight": "int4/g16", "qat_steps": 5}}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    r = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(tmp_path / "out.json"), json.dumps(study)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "out.json").read_text())
    one, mesh = got["one"], got["mesh"]
    assert one["config_hash"] == mesh["config_hash"]
    assert one["init_perplexity"] == pytest.approx(mesh["init_perplexity"], rel=1e-6)  # before training: no mesh
    np.testing.assert_allclose(mesh["qat_final_loss"], one["qat_final_loss"], rtol=1e-3)
    np.testing.assert_allclose(mesh["perplexity"], one["perplexity"], rtol=1e-2)
    assert one["perplexity"] != one["init_perplexity"]
