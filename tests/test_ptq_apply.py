"""Model-level PTQ drivers (qlab.ptq.rtn/gptq/awq/hqq/smoothquant) on a tiny NNX model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlab
from qlab import ptq
from qlab.nn import Rule, layer_report, model_size, quantized_layers


class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(64, 64, rngs=rngs)
        self.fc2 = nnx.Linear(64, 16, use_bias=False, rngs=rngs)
        self.emb = nnx.Embed(10, 64, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


@pytest.fixture(scope="module")
def setup():
    model = Tiny(nnx.Rngs(0))
    k = jax.random.split(jax.random.key(1), 3)
    A = jax.random.normal(k[0], (64, 64)) / 8.0
    ch = jnp.exp(jax.random.normal(k[1], (64,)))
    data = (jax.random.normal(k[2], (8, 64, 64)) @ A) * ch  # 8 batches of 64 correlated rows
    return model, list(data[:4]), data[4:].reshape(-1, 64)


RULES = [Rule("emb"), Rule("fc.", weight="int3/g32")]


def out_err(m, model, X):
    return float(jnp.mean((m(X) - model(X)) ** 2))


def test_gptq_driver_beats_rtn_and_is_converted(setup):
    model, calib, X = setup
    r = ptq.rtn(model, RULES)
    g = ptq.gptq(model, RULES, calib)
    ga = ptq.gptq(model, RULES, calib, act_order=True)
    e_rtn = out_err(r, model, X)
    assert out_err(g, model, X) < e_rtn and out_err(ga, model, X) < e_rtn
    rep = layer_report(g)
    assert rep.set_index("layer").loc[["fc1", "fc2"], "converted"].all()
    assert model_size(g)["packed_bytes"] == model_size(r)["packed_bytes"]
    info = ptq.ptq_info(g)
    assert info.layer.tolist() == ["fc1", "fc2"] and (info.rows == 4 * 64).all()
    # the layer really uses dequantize(qtensor)
    L = quantized_layers(g)["fc2"]
    np.testing.assert_array_equal(np.asarray(L.weight_value()), np.asarray(qlab.dequantize(L.qtensor())))


def test_awq_and_smoothquant_drivers_set_input_scales(setup):
    model, calib, X = setup
    a = ptq.awq(model, RULES, calib, n_grid=10)
    assert out_err(a, model, X) < out_err(ptq.rtn(model, RULES), model, X)
    L = quantized_layers(a)["fc1"]
    assert L.input_scale is not None and L.input_scale[...].shape == (64,)
    assert {"alpha", "outlier_features"} <= set(ptq.ptq_info(a).columns)
    w8a8 = [Rule("emb"), Rule("fc.", weight="int8/ch", act="int8")]
    sq = ptq.smoothquant(model, w8a8, calib, alpha=0.5)
    info = ptq.ptq_info(sq)
    assert (info.act_absmax_smoothed < info.act_absmax).all()
    assert out_err(sq, model, X) < 1e-2 * float(jnp.mean(model(X) ** 2))


def test_hqq_and_rtn_drivers(setup):
    model, _, X = setup
    h = ptq.hqq(model, [Rule("emb"), Rule("fc.", weight="int3/g32/asym/zp=float")])
    r = ptq.rtn(model, [Rule("emb"), Rule("fc.", weight="int3/g32/asym/zp=float")])
    wh = {p: L.weight_value() for p, L in quantized_layers(h).items()}
    wr = {p: L.weight_value() for p, L in quantized_layers(r).items()}
    for p in wh:
        w = quantized_layers(h)[p].weight[...]
        assert float(jnp.mean(jnp.abs(wh[p] - w))) < float(jnp.mean(jnp.abs(wr[p] - w)))
    # rtn quantizes any layer kind (here the embedding, rows = channels)
    re_ = ptq.rtn(model, [Rule("emb", weight="int8/ch"), Rule("fc.")])
    assert layer_report(re_).set_index("layer").loc["emb", "converted"]


def test_drivers_refuse_no_data_and_unmatched_rules(setup):
    model, calib, _ = setup
    with pytest.raises(ValueError, match="no data|saw no"):
        ptq.gptq(model, RULES, [])
    with pytest.raises(ValueError, match="calibration"):
        ptq.awq(model, RULES, None)
    with pytest.raises(ValueError, match="matched no layer"):
        ptq.gptq(model, [Rule("nothing", weight="int4/g32")], calib)
    with pytest.raises(ValueError, match="matched no layer"):
        ptq.rtn(model, [Rule("fc.", weight="int4/g32"), Rule("head", weight="int4")])
    # a layer the forward never calls: no silent fallback to RTN
    with pytest.raises(ValueError, match="no input"):
        ptq.gptq(model, [Rule("emb"), Rule("fc1", weight="int4/g32"), Rule("fc2", weight="int4/g16")], calib,
                 forward=lambda m, x: m.fc1(x))
    # an embedding is calibrated as its tied head, on the inputs of attend (tests/test_nn_embed.py)
    qe = ptq.gptq(model, [Rule("emb", weight="int8/ch"), Rule("fc.")], calib, forward=lambda m, x: m.emb.attend(x))
    assert ptq.ptq_info(qe)["calibration_input"].tolist() == ["tied head input (attend)"]


# --------------------------------------------------------------------------- sequential (block by block)

SEQ_RULES = [Rule("embed"), Rule("pos_embed"), Rule("(blocks/.*/(query|key|value|out|up|down))|head", weight="int3/g16")]


@pytest.fixture(scope="module")
def char_lm():
    from qlab.models import Transformer, TransformerConfig

    cfg = TransformerConfig(vocab_size=32, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=16)
    model = Transformer(cfg, rngs=nnx.Rngs(0))
    toks = [jax.random.randint(jax.random.key(i), (8, 16), 0, 32) for i in range(3)]
    return model, toks


def _codes(qm, path):
    return np.asarray(quantized_layers(qm)[path].qtensor().codes)


def test_sequential_gptq_calibrates_each_block_on_quantized_predecessors(char_lm):
    from qlab.nn import capture, load_quantized_weights, quantize_model
    from qlab.ptq.gptq import gptq as gptq_layer

    model, toks = char_lm
    seq = ptq.gptq(model, SEQ_RULES, toks, sequential=True)
    one = ptq.gptq(model, SEQ_RULES, toks)
    info = ptq.ptq_info(seq)
    assert set(info["calibration"]) == {"sequential over blocks"}
    assert set(ptq.ptq_info(one)["calibration"]) == {"one float pass"}
    paths = list(ptq.weight_layers(seq))
    assert sorted(info["layer"]) == sorted(paths) and "head" in paths

    def agree(a, b):
        return float(np.mean(a == b))

    # block 0 sees the float model's inputs: the same as one float pass
    for p in [p for p in paths if p.startswith("blocks/0/")]:
        assert agree(_codes(seq, p), _codes(one, p)) > 0.99, p
    # block 1's first layers see the output of the QUANTIZED block 0: reference = capture on a model with
    # block 0 loaded from the sequential result, layers running quantized
    ref = quantize_model(model, SEQ_RULES)
    load_quantized_weights(ref, {p: quantized_layers(seq)[p].qtensor() for p in paths if p.startswith("blocks/0/")})
    st = capture(ref, toks, stats=("hessian",), quantized=True)
    spec = quantized_layers(seq)["blocks/1/attn/query"].weight_quant.spec
    for p in ["blocks/1/attn/query", "blocks/1/attn/key", "blocks/1/attn/value"]:
        w = jnp.asarray(quantized_layers(seq)[p].weight[...])
        want = np.asarray(gptq_layer(w, st[p]["hessian"], spec).codes)
        assert agree(_codes(seq, p), want) > 0.99, p
    # ... which is not what the float pass gives
    assert np.mean([agree(_codes(seq, p), _codes(one, p)) for p in paths if p.startswith("blocks/1/")]) < 0.95
    # the head (outside the blocks) is calibrated with every block quantized
    load_quantized_weights(ref, {p: quantized_layers(seq)[p].qtensor() for p in paths if p.startswith("blocks/")})
    st = capture(ref, toks, stats=("hessian",), quantized=True)
    want = np.asarray(gptq_layer(jnp.asarray(quantized_layers(seq)["head"].weight[...]), st["head"]["hessian"],
                                 spec).codes)
    assert agree(_codes(seq, "head"), want) > 0.99
    # the quantized model runs on dequantized codes
    assert np.isfinite(np.asarray(seq(toks[0]))).all()


def test_sequential_awq_and_smoothquant_run_block_by_block(char_lm):
    model, toks = char_lm
    for algo in (ptq.awq, lambda m, r, b, **kw: ptq.smoothquant(m, [Rule("embed"), Rule("pos_embed"),
                                                                      Rule("blocks/.*/(query|key|value|out|up|down)",
                                                                           weight="int8/ch", act="int8")], b, **kw)):
        qm = algo(model, SEQ_RULES, toks, sequential="blocks")
        info = ptq.ptq_info(qm)
        assert set(info["calibration"]) == {"sequential over blocks"} and len(info) >= 12
        assert np.isfinite(np.asarray(qm(toks[0]))).all()


def test_sequential_errors(char_lm, setup):
    model, toks = char_lm
    with pytest.raises(ValueError, match="calibration_stats"):
        ptq.gptq(model, SEQ_RULES, None, calibration_stats={}, sequential=True)
    with pytest.raises(ValueError, match="no data"):
        ptq.gptq(model, SEQ_RULES, [], sequential=True)
    with pytest.raises(ValueError, match="not a non-empty list of blocks"):
        ptq.gptq(model, SEQ_RULES, toks, sequential="ln_f")
    # Tiny's layers are not in a list of blocks
    tiny, batches, _ = setup
    with pytest.raises(ValueError, match="no list of blocks"):
        ptq.gptq(tiny, RULES, batches, sequential=True)
    # an MLP's Linear layers form a list, but an activation runs between them: not a chain of blocks
    from qlab.models import MLP

    mlp = MLP(64, hidden=(32, 32), out=4, rngs=nnx.Rngs(0))
    x = [jax.random.normal(jax.random.key(0), (16, 64))]
    with pytest.raises(ValueError, match="use sequential=False"):
        ptq.gptq(mlp, [Rule("layers/.*", weight="int4/g16")], x, sequential="layers")
