"""qlab.nn QAT: gradients, learned quantizers, EMA, outliers, input scales, training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import qlab
from qlab import nn as qnn
from qlab.models import MLP


def _x(shape=(8, 16), seed=1):
    return jax.random.normal(jax.random.key(seed), shape)


def test_forward_matches_manual_fake_quant():
    lin = nnx.Linear(16, 8, rngs=nnx.Rngs(0))
    qm = qnn.quantize_model(lin, [qnn.Rule(".*", weight="int4/g4", act="int8/ch")])
    x = _x()
    ref = qlab.fake_quant(x, qlab.parse_spec("int8/ch").resolve(0, 1)) @ qlab.fake_quant(
        lin.kernel[...], qlab.parse_spec("int4/g4").resolve(1, 0)) + lin.bias[...]
    np.testing.assert_allclose(qm(x), ref, rtol=1e-6, atol=1e-6)


def test_gradients_reach_weights_and_quantizer_params():
    m = MLP(16, hidden=(32,), out=4, rngs=nnx.Rngs(0))
    qm = qnn.quantize_model(m, [
        qnn.Rule("layers/0", weight="int3/ch", weight_quantizer="lsq", act="int8", act_quantizer="lsq"),
        qnn.Rule("head", weight="int4/ch", act="uint8", act_quantizer="pact"),
    ])
    x = _x()

    def loss(model):
        return jnp.mean(model(x) ** 2)

    grads = nnx.grad(loss)(qm)  # default wrt=nnx.Param includes QuantParam
    g = nnx.to_flat_state(grads)
    flat = {"/".join(map(str, p)): v[...] for p, v in g}
    assert float(jnp.abs(flat["layers/0/layer/kernel"]).sum()) > 0
    assert float(jnp.abs(flat["head/layer/kernel"]).sum()) > 0
    assert float(jnp.abs(flat["layers/0/weight_quant/step"]).sum()) > 0  # LSQ weight steps
    assert float(jnp.abs(flat["layers/0/act_quant/step"])) > 0  # LSQ activation step
    assert float(jnp.abs(flat["head/act_quant/alpha"])) > 0  # PACT alpha (relu output clips)
    qp = nnx.state(qm, qnn.QuantParam)
    assert len(nnx.to_flat_state(qp)) == 3


def test_ste_gradient_at_clamp_boundary():
    # EMA (static) range: x == hi passes its gradient, x beyond the range gets zero
    lin = nnx.Linear(4, 1, use_bias=False, rngs=nnx.Rngs(0))
    lin.kernel[...] = jnp.ones((4, 1))
    qm = qnn.quantize_model(lin, [qnn.Rule(".*", act="int8", act_range="ema")])
    qm.act_quant.count[...] = jnp.ones((), jnp.int32)
    qm.act_quant.lo[...] = jnp.array(-1.0)
    qm.act_quant.hi[...] = jnp.array(1.0)
    qm.eval()  # frozen range
    x = jnp.array([[0.3, 1.0, 1.5, -2.0]])
    g = jax.grad(lambda v: qm(v).sum())(x)
    np.testing.assert_array_equal(g, [[1.0, 1.0, 0.0, 0.0]])
    # dynamic absmax range: the max-magnitude element sits on the boundary and gets gradient 1
    qd = qnn.quantize_model(lin, [qnn.Rule(".*", act="int4")])
    gd = jax.grad(lambda v: qd(v).sum())(x)
    np.testing.assert_array_equal(gd, [[1.0, 1.0, 1.0, 1.0]])
    # weight STE with a fixed clip: weights outside get no gradient
    lin.kernel[...] = jnp.array([[0.5], [1.0], [2.0], [-3.0]])
    qw = qnn.quantize_model(lin, [qnn.Rule(".*", weight="int8/fixed(-1,1)")])
    gw = nnx.grad(lambda mm: mm(jnp.ones((1, 4))).sum())(qw)
    np.testing.assert_array_equal(gw.layer.kernel[...], [[1.0], [1.0], [0.0], [0.0]])


def test_ema_updates_in_training_and_freezes_in_eval():
    lin = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    qm = qnn.quantize_model(lin, [qnn.Rule(".*", act="int8", act_range="ema", ema_decay=0.5)])
    qm(jnp.full((2, 4), 2.0))
    assert float(qm.act_quant.hi[...]) == 2.0 and int(qm.act_quant.count[...]) == 1
    qm(jnp.full((2, 4), 4.0))
    assert float(qm.act_quant.hi[...]) == 3.0
    qm.eval()
    qm(jnp.full((2, 4), 100.0))
    assert float(qm.act_quant.hi[...]) == 3.0
    qm.train()
    step = nnx.jit(lambda m, x: m(x))
    step(qm, jnp.full((2, 4), 5.0))
    assert float(qm.act_quant.hi[...]) == 4.0  # updated under nnx.jit


def test_qat_training_loss_decreases_with_learned_quantizers():
    from qlab.data import digits_dataset
    from qlab.train import train

    ds = digits_dataset(seed=0)
    m = MLP(64, hidden=(64,), out=10, rngs=nnx.Rngs(0))
    qm = qnn.quantize_model(m, [
        qnn.Rule("layers/.*", weight="int3/ch", weight_quantizer="lsq", act="int8", act_range="ema"),
        qnn.Rule("head", weight="int4/ch", act="uint8", act_quantizer="pact"),
    ])
    step0 = np.asarray(qm.layers[0].weight_quant.step[...]).copy()
    hist = train(qm, ds, steps=60, batch_size=64, learning_rate=3e-3, progress=False)
    assert np.mean(hist.loss[-10:]) < 0.6 * np.mean(hist.loss[:5])
    assert not np.allclose(np.asarray(qm.layers[0].weight_quant.step[...]), step0)  # LSQ steps trained
    assert int(qm.layers[0].act_quant.count[...]) == 60  # EMA stats carried through the jitted step
    assert float(qm.layers[0].act_quant.hi[...]) > 0
    assert float(qm.head.act_quant.alpha[...]) != 1.0  # PACT alpha trained
    from qlab.evaluate import accuracy

    qm.eval()
    assert accuracy(qm, *ds.test) > 0.7


def test_optax_with_nnx_optimizer_and_quantparam_filter():
    m = MLP(16, hidden=(32,), out=4, rngs=nnx.Rngs(0))
    qm = qnn.quantize_model(m, [qnn.Rule(".*", weight="int4/ch", weight_quantizer="lsq")])
    opt = nnx.Optimizer(qm, optax.sgd(0.1), wrt=qnn.QuantParam)  # train only quantizer params
    x, k0 = _x(), np.asarray(qm.head.kernel[...]).copy()
    s0 = np.asarray(qm.head.weight_quant.step[...]).copy()

    @nnx.jit
    def step(model, opt):
        grads = nnx.grad(lambda mm: jnp.mean(mm(x) ** 2), argnums=nnx.DiffState(0, qnn.QuantParam))(model)
        opt.update(model, grads)

    step(qm, opt)
    np.testing.assert_array_equal(np.asarray(qm.head.kernel[...]), k0)
    assert not np.allclose(np.asarray(qm.head.weight_quant.step[...]), s0)


def test_outlier_decomposition():
    lin = nnx.Linear(6, 3, rngs=nnx.Rngs(0))
    x = _x((5, 6)) * 0.5
    x = x.at[2, 4].set(40.0)  # feature 4 is an outlier
    qm = qnn.quantize_model(lin, [qnn.Rule(".*", weight="int4/ch", act="int8", outlier_threshold=6.0)])
    W, b = lin.kernel[...], lin.bias[...]
    keep = jnp.array([1, 1, 1, 1, 0, 1], jnp.float32)
    xq = qlab.fake_quant(x * keep, "int8")
    wq = qlab.fake_quant(W * keep[:, None], "int4/ch1")
    ref = xq @ wq + (x * (1 - keep)) @ (W * (1 - keep)[:, None]) + b
    np.testing.assert_allclose(qm(x), ref, rtol=1e-5, atol=1e-5)
    # without the decomposition the outlier wrecks the int8 range of the rest
    plain = qnn.quantize_model(lin, [qnn.Rule(".*", weight="int4/ch", act="int8")])
    fl = x @ W + b
    assert float(jnp.abs(qm(x) - fl).max()) < float(jnp.abs(plain(x) - fl).max())


def test_input_scale_and_set_input_scale():
    lin = nnx.Linear(4, 2, rngs=nnx.Rngs(0))
    qm = qnn.quantize_model(lin, [qnn.Rule(".*", weight="int8/ch", act="int8")])
    s = jnp.array([1.0, 2.0, 4.0, 0.5])
    qm.kernel[...] = lin.kernel[...] * s[:, None]  # what smoothing PTQ stores
    qnn.set_input_scale(qm, "", s)
    x = _x((3, 4))
    ref = qlab.fake_quant(x / s, "int8") @ qlab.fake_quant(lin.kernel[...] * s[:, None], "int8/ch1") + lin.bias[...]
    np.testing.assert_allclose(qm(x), ref, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        qnn.set_input_scale(qm, "", jnp.ones(3))
    with pytest.raises(ValueError, match="no quantized layer"):
        qnn.set_input_scale(qm, "nope", s)


def test_w8a8_linear_multiplies_integer_codes():
    """A W8A8 Linear runs qlab.numerics.quantized_matmul (NNX, converted NNX and Linen alike);
    Rule(int_matmul=False) keeps the float32 fake-quant product; both train with the same gradients."""
    from qlab.models import MLP, linen_mlp_from_nnx
    from qlab.numerics.matmul import quantized_matmul

    m = MLP(512, hidden=(256,), out=8, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (32, 512))
    rule = dict(weight="int8/ch", act="int8")
    qm = qnn.quantize_model(m, [qnn.Rule(".*", **rule)])
    qf = qnn.quantize_model(m, [qnn.Rule(".*", **rule, int_matmul=False)])
    L = qm.layers[0]
    want = quantized_matmul(x, L.weight[...], "int8", "int8/ch1") + L.bias[...]
    np.testing.assert_array_equal(np.asarray(L(x)), np.asarray(want))
    int_dot = "preferred_element_type=int32"  # the integer product's dot_general
    assert int_dot in str(jax.make_jaxpr(lambda x: qm(x))(x))
    assert int_dot not in str(jax.make_jaxpr(lambda x: qf(x))(x))
    np.testing.assert_allclose(np.asarray(qm.layers[0](x)), np.asarray(qf.layers[0](x)), rtol=1e-5, atol=1e-5)
    # the converted model multiplies the stored codes: the same numbers as the QAT model
    np.testing.assert_array_equal(np.asarray(qnn.convert(qm)(x)), np.asarray(qm(x)))
    module, variables = linen_mlp_from_nnx(m)
    np.testing.assert_array_equal(np.asarray(qnn.quantize_linen(module, [qnn.Rule(".*", **rule)]).apply(variables, x)),
                                  np.asarray(qm(x)))
    gi = nnx.grad(lambda mm: jnp.sum(mm.layers[0](x) ** 2))(qm)
    gf = nnx.grad(lambda mm: jnp.sum(mm.layers[0](x) ** 2))(qf)
    np.testing.assert_allclose(np.asarray(gi.layers[0].layer.kernel[...]), np.asarray(gf.layers[0].layer.kernel[...]),
                               rtol=1e-4, atol=1e-4)


def test_lsq_grad_scale_off_multiplies_the_step_gradient_by_one_over_g():
    lin = nnx.Linear(16, 4, rngs=nnx.Rngs(0))
    x = _x()
    grads = []
    for on in (True, False):
        qm = qnn.quantize_model(lin, [qnn.Rule(".*", weight="int3/ch", weight_quantizer="lsq", lsq_grad_scale=on)])
        g = nnx.grad(lambda m: jnp.mean(m(x) ** 2))(qm)
        grads.append(np.asarray(g.weight_quant.step[...]))
    g_lsq = 1 / np.sqrt(16 * 3)  # N = 16 inputs share each output channel's step, Qp = 3
    np.testing.assert_allclose(grads[1] * g_lsq, grads[0], rtol=1e-5)
    assert "lsq_grad_scale=False" in repr(qnn.Rule(".*", weight="int3", weight_quantizer="lsq", lsq_grad_scale=False))
