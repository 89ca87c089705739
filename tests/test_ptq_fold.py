"""AWQ with shared scales (share_scales=True) and folding its input scales into the preceding norms:
the float function is unchanged by the Linear-into-Linear folds, GQA heads sharing a value head get tied
scales, the folded model computes the AWQ model's outputs with its quantized weights untouched, and
unfoldable models are clear errors naming the option."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import qlab
from qlab import ptq
from qlab.models.gemma3 import Gemma3, Gemma3Config
from qlab.nn import Rule
from qlab.ptq.fold import ScaleGroup, fold_input_scales, module_at

CFG = Gemma3Config.tiny(n_layers=2)  # GQA 4 query heads : 2 value heads, head_dim 16
RULES = [Rule(r".*mlp/(gate|up)_proj", weight="q4_0"), Rule(r".*mlp/down_proj", weight="q5_1"),
         Rule(r".*attn/[qk]_proj", weight="q8_0"), Rule(r".*attn/[vo]_proj", weight="q4_1")]
BATCHES = [np.random.default_rng(i).integers(0, 320, (2, 16)) for i in range(2)]
IDS = np.arange(24)[None] % 320


def _fwd(m, b):
    return m(b)


def _model(seed=0):
    """A tiny Gemma whose pre-norms have spread-out weights (salient channels, so AWQ picks alpha > 0)."""
    m = Gemma3(CFG, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    for blk in m.layers:
        for norm in (blk.pre_attn_norm, blk.pre_ffn_norm):
            norm.weight[...] = jnp.asarray(rng.lognormal(0.0, 1.0, CFG.d_model), jnp.float32)
    return m


@pytest.fixture(scope="module")
def shared():
    model = _model()
    return model, ptq.awq(model, RULES, BATCHES, forward=_fwd, share_scales=True)


def _kernels(m):
    """{path: float kernel} of every projection (wrapped or not)."""
    out = {}
    for i in range(CFG.n_layers):
        for name in ("attn/q_proj", "attn/k_proj", "attn/v_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj",
                     "mlp/down_proj"):
            p = f"layers/{i}/{name}"
            L = module_at(m, p)
            out[p] = np.asarray((L.weight if isinstance(L, qlab.nn.QuantizedLayer) else L.kernel)[...])
    return out


def test_input_scales_shared_per_norm_and_none_after_linears(shared):
    _, qm = shared
    layers = qlab.nn.quantized_layers(qm)
    for i in range(CFG.n_layers):
        b = f"layers/{i}/"
        qkv = [np.asarray(layers[b + f"attn/{n}_proj"].input_scale[...]) for n in "qkv"]
        gu = [np.asarray(layers[b + f"mlp/{n}_proj"].input_scale[...]) for n in ("gate", "up")]
        assert all(np.array_equal(qkv[0], s) for s in qkv) and np.array_equal(gu[0], gu[1])
        assert not np.allclose(qkv[0], 1.0)  # a real scale was searched
        assert layers[b + "attn/o_proj"].input_scale is None and layers[b + "mlp/down_proj"].input_scale is None
    info = ptq.ptq_info(qm).set_index("layer")
    assert info.loc["layers/0/attn/o_proj", "scale_into"] == "layers/0/attn/v_proj"


def test_linear_folds_keep_the_float_function_and_tie_gqa_heads(shared):
    model, qm = shared
    before, after = _kernels(model), _kernels(qm)
    g, hd = CFG.n_heads // CFG.n_kv_heads, CFG.head_dim
    for i in range(CFG.n_layers):
        b = f"layers/{i}/"
        s_o = after[b + "attn/o_proj"][:, 0] / before[b + "attn/o_proj"][:, 0]  # rows of W_o scaled by s
        np.testing.assert_allclose(after[b + "attn/o_proj"], before[b + "attn/o_proj"] * s_o[:, None], rtol=1e-5)
        heads = s_o.reshape(CFG.n_kv_heads, g, hd)
        np.testing.assert_allclose(heads, np.broadcast_to(heads[:, :1], heads.shape), rtol=1e-5)  # tied per KV head
        np.testing.assert_allclose(after[b + "attn/v_proj"] * heads[:, 0].reshape(-1), before[b + "attn/v_proj"],
                                   rtol=1e-5, atol=1e-7)
        s_d = after[b + "mlp/down_proj"][:, 0] / before[b + "mlp/down_proj"][:, 0]
        np.testing.assert_allclose(after[b + "mlp/up_proj"] * s_d, before[b + "mlp/up_proj"], rtol=1e-5, atol=1e-7)
    # a float Gemma holding the AWQ model's float kernels computes the original function
    f = qlab.nn.copy_model(model)
    for p, w in after.items():
        module_at(f, p).kernel[...] = jnp.asarray(w)
    np.testing.assert_allclose(np.asarray(f(IDS)), np.asarray(model(IDS)), rtol=0, atol=2e-4)


def test_fold_equals_awq_model_and_keeps_quantized_weights(shared):
    model, qm = shared
    fm = fold_input_scales(qm)
    lq, lf = qlab.nn.quantized_layers(qm), qlab.nn.quantized_layers(fm)
    assert all(L.input_scale is None for L in lf.values())
    for p in lq:  # codes and scales untouched
        a, b = lq[p].qtensor(), lf[p].qtensor()
        np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
        np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    s = np.asarray(lq["layers/1/mlp/up_proj"].input_scale[...])
    np.testing.assert_allclose(np.asarray(fm.layers[1].pre_ffn_norm.weight[...]) * s,
                               np.asarray(qm.layers[1].pre_ffn_norm.weight[...]), rtol=1e-6)
    y, yf = np.asarray(qm(IDS)), np.asarray(fm(IDS))
    np.testing.assert_allclose(yf, y, rtol=0, atol=1e-4 * np.abs(y).max())
    assert qm.layers[0].attn.q_proj.input_scale is not None  # the AWQ model itself is not changed


def test_sequential_shared_scales_fold():
    model = _model(1)
    qm = ptq.awq(model, [Rule(r".*_proj", weight="q4_0")], BATCHES, forward=_fwd, share_scales=True, sequential=True)
    y, yf = np.asarray(qm(IDS)), np.asarray(fold_input_scales(qm)(IDS))
    np.testing.assert_allclose(yf, y, rtol=0, atol=1e-4 * np.abs(y).max())


def test_shared_search_minimises_the_summed_loss():
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.standard_normal((256, 64)) * np.linspace(0.1, 5, 64), jnp.float32)
    W1, W2 = (jnp.asarray(rng.standard_normal((64, n)), jnp.float32) for n in (8, 16))
    H, xm = X.T @ X, jnp.mean(jnp.abs(X), 0)
    _, _, l1 = ptq.awq_scale_search(W1, "int4/g32", H=H, x_mean_abs=xm)
    _, _, l2 = ptq.awq_scale_search(W2, "int8/g32", H=H, x_mean_abs=xm)
    s, a, ls = ptq.awq_shared_scale_search([W1, W2], ["int4/g32", "int8/g32"], H, xm)
    np.testing.assert_allclose(ls, l1 + l2, rtol=1e-5)
    assert a == pytest.approx(np.argmin(l1 + l2) / 20)
    np.testing.assert_allclose(s, ptq.awq_scales(xm, a), rtol=1e-6)


def test_unfoldable_models_are_clear_errors():
    model = _model()
    unshared = ptq.awq(model, [Rule(r".*attn/[qkv]_proj", weight="q4_0")], BATCHES[:1], forward=_fwd)
    with pytest.raises(ValueError, match=r"q_proj.*do not share one scale.*share_scales=True"):
        fold_input_scales(unshared)
    with pytest.raises(ValueError, match=r"only \['layers/0/attn/q_proj'\] are weight-quantized.*share_scales=False"):
        ptq.awq(model, [Rule(r"layers/0/attn/q_proj", weight="q4_0")], BATCHES[:1], forward=_fwd, share_scales=True)
    mlp = qlab.models.MLP(16, hidden=(8,), out=4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="share_scales=True knows .* Gemma 3.*ScaleGroup"):
        ptq.awq(mlp, [Rule("layers/0", weight="int4/g8")], [np.ones((4, 16), np.float32)], share_scales=True)
    # explicit groups work for any model: the head's scale folds into layers/0's outputs
    x = [np.asarray(np.random.default_rng(0).standard_normal((32, 16)), np.float32)]
    qm = ptq.awq(mlp, [Rule(".*", weight="int4/g8")], x, share_scales=[ScaleGroup(("head",), "layers/0")])
    assert qlab.nn.quantized_layers(qm)["head"].input_scale is None
    s = np.asarray(qm.head.weight[...])[:, 0] / np.asarray(mlp.head.kernel[...])[:, 0]
    np.testing.assert_allclose(np.asarray(qm.layers[0].layer.bias[...]) * s, np.asarray(mlp.layers[0].bias[...]),
                               rtol=1e-5, atol=1e-7)  # ReLU commutes with s > 0: the bias is divided too
    with pytest.raises(ValueError, match="layers/0.*belongs to no scale group"):
        fold_input_scales(qm, [ScaleGroup(("head",), "layers/0")])
