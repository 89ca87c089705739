"""qlab.ptq.calibrate_activations: static per-tensor activation ranges (SmoothQuant O3) from calibration data,
the same from batches and from float-model statistics, frozen, and clear errors for what cannot be static."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlab import nn as qnn
from qlab import ptq
from qlab.models import MLP
from qlab.nn import Rule

X = [jax.random.normal(jax.random.key(i), (16, 32)) * jnp.linspace(0.1, 8.0, 32) for i in range(2)]


def _model():
    return MLP(32, hidden=(16,), out=4, rngs=nnx.Rngs(0))


def test_static_equals_dynamic_on_the_calibration_batch():
    # int_matmul=False: the dynamic layer would otherwise multiply integer codes (equal within float rounding)
    qm = ptq.rtn(nnx.Linear(32, 8, rngs=nnx.Rngs(0)), [Rule(".*", weight="int8/ch", act="int8", int_matmul=False)])
    sm = ptq.calibrate_activations(qm, X[:1])
    assert float(sm.act_quant.hi[...]) == pytest.approx(float(jnp.max(jnp.abs(X[0]))))
    assert bool((sm(X[0]) == qm(X[0])).all())  # one batch: the static range is that batch's own
    assert not bool((sm(X[1]) == qm(X[1])).all())  # another batch: its own range differs
    assert qm.act_quant.range == "dynamic"  # the input model is not changed


def test_range_over_all_batches_and_after_smoothing():
    rules = [Rule("layers/.*", weight="int8/ch", act="int8")]
    fwd = lambda m, b: m(b)  # noqa: E731
    sq = ptq.smoothquant(_model(), rules, X, forward=fwd, alpha=0.5)
    sm = ptq.calibrate_activations(sq, X, forward=fwd)
    s = np.asarray(sq.layers[0].input_scale[...])
    want = max(float(np.max(np.abs(np.asarray(x)) / s)) for x in X)
    assert float(sm.layers[0].act_quant.hi[...]) == pytest.approx(want, rel=1e-6)
    # the same from statistics of the float model (before smoothing): the input scale is divided out
    st = qnn.capture(qnn.quantize_model(_model(), rules), X, forward=fwd, stats=("absmax",))
    sm2 = ptq.calibrate_activations(sq, calibration_stats=st)
    assert float(sm2.layers[0].act_quant.hi[...]) == pytest.approx(want, rel=1e-6)
    y = sm(X[1])
    assert bool((sm(X[1]) == y).all())  # frozen: calling it does not move the range
    assert float(sm.layers[0].act_quant.hi[...]) == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("act, match", [("int8/ch", "per-token"), ("int8/tensor/asym", "symmetric per-tensor")])
def test_dynamic_by_nature_is_an_error(act, match):
    qm = ptq.rtn(_model(), [Rule("layers/.*", weight="int8/ch", act=act)])
    with pytest.raises(ValueError, match=match):
        ptq.calibrate_activations(qm, X)


def test_no_act_spec_or_no_data_is_an_error():
    with pytest.raises(ValueError, match="no layer quantizes its input"):
        ptq.calibrate_activations(ptq.rtn(_model(), [Rule("layers/.*", weight="int8/ch")]), X)
    with pytest.raises(ValueError, match="calibration_batches or calibration_stats"):
        ptq.calibrate_activations(ptq.rtn(_model(), [Rule("layers/.*", weight="int8/ch", act="int8")]))


def test_smoothquant_smooth_selects_layers():
    rules = [Rule("layers/.*", weight="int8/ch", act="int8")]
    fwd = lambda m, b: m(b)  # noqa: E731
    sq = ptq.smoothquant(_model(), rules + [Rule("head", weight="int8/ch", act="int8")], X, forward=fwd,
                         smooth="layers/.*")
    assert sq.layers[0].input_scale is not None and sq.head.input_scale is None
    rtn = ptq.rtn(_model(), rules + [Rule("head", weight="int8/ch", act="int8")])
    assert bool((sq.head.weight_value() == rtn.head.weight_value()).all())  # the unsmoothed layer is plain RTN
    with pytest.raises(ValueError, match="not a valid regex"):
        ptq.smoothquant(_model(), rules, X, forward=fwd, smooth="(")
