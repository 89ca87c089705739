"""The language-model family accepts rules on the tied embedding (a study's own rule sets)."""

import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest

from qlab import nn as qnn
from qlab import ptq
from qlab.experiments import ConfigError, expand, lm, sweep

LM = {"model": "gemma3_tiny", "data": "tiny_text", "eval_tokens": 64}
CAL = {"calibration": "tiny_text", "calibration_seqs": 4, "calibration_len": 16}
EMB8 = [{"pattern": "embed", "weight": "int8/ch"}, {"pattern": ".*", "weight": "$weight"}]


def _study(method, **base):
    return {"name": "emb", "rule_sets": {"emb8": EMB8}, "base": {**LM, "rules": "emb8", "weight": "int4/g16", **base},
            "sweep": {"method": [method]}}


@pytest.mark.parametrize("method, cal", [("ptq_rtn", {}), ("ptq_gptq", {**CAL, "sequential": True}),
                                         ("ptq_gptq", {**CAL, "sequential": False})])
def test_rule_set_quantizes_the_embedding(tmp_path, method, cal):
    tab = sweep(_study(method, **cal), out=tmp_path, progress=False)
    model, _ = lm.lm_model("gemma3_tiny")
    v, d = model.embed.embedding[...].shape
    proj = sum(L.kernel[...].size for L in lm.lm_linears(model).values())
    params = int(tab["params"].iloc[0])
    want = proj * 5 // 8 + (v * d + 2 * v) + (params - proj - v * d) * 4  # int4/g16 projections, int8/ch rows
    assert int(tab["model_bytes"].iloc[0]) == want
    assert int(tab["quantized_params"].iloc[0]) == proj + v * d
    assert np.isfinite(tab["perplexity"]).all()
    layers = pd.read_csv(tmp_path / "layers.csv")
    assert layers.set_index("layer").loc["embed", "weight_spec"] == "int8/ch0"


def test_builtin_rule_sets_keep_the_embedding_float(tmp_path):
    tab = sweep({"name": "b", "base": {**LM, "method": "ptq_rtn", "weight": "int4/g16"}}, out=tmp_path, progress=False)
    model, _ = lm.lm_model("gemma3_tiny")
    proj = sum(L.kernel[...].size for L in lm.lm_linears(model).values())
    assert int(tab["quantized_params"].iloc[0]) == proj


def test_embedding_rule_is_checked_at_load():
    bad = {"name": "x", "rule_sets": {"e": [{"pattern": "embed", "weight": "int4/g48"}]},
           "base": {**LM, "method": "ptq_rtn", "rules": "e"}}
    with pytest.raises((ConfigError, ValueError), match="embed"):
        expand(bad)


def test_effective_embedding_reproduces_the_quantized_forward():
    model, _ = lm.lm_model("gemma3_tiny")
    calib = [jnp.asarray(lm._calibration("gemma3_tiny", "tiny_text", 4, 16))]
    qm = ptq.awq(model, (qnn.Rule("embed", weight="int4/g16"), qnn.Rule(".*")), calib)
    toks = calib[0][:2]
    w = lm._effective_kernels(qm)["embed"]
    orig = model.embed.embedding[...]
    try:
        model.embed.embedding.value = w
        folded = np.asarray(model(toks))
    finally:
        model.embed.embedding.value = orig
    want = np.asarray(qm(toks))
    assert np.abs(folded - want).max() <= 1e-4 * np.abs(want).max()
