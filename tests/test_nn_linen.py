"""Linen integration: same numbers as NNX for the same weights and rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from qlab import nn as qnn
from qlab.models import CNN, MLP, CNNConfig, linen_cnn_from_nnx, linen_mlp_from_nnx


@pytest.mark.parametrize("weight,act", [("int4/g8", "int8"), ("int3/ch", "int8/ch"), ("int8", None)])
def test_linen_mlp_matches_nnx(weight, act):
    m = MLP(16, hidden=(32,), out=4, rngs=nnx.Rngs(0))
    module, variables = linen_mlp_from_nnx(m)
    rules = [qnn.Rule(".*", weight=weight, act=act)]
    x = jax.random.normal(jax.random.key(1), (6, 16))
    y_nnx = qnn.quantize_model(m, rules)(x)
    y_linen = qnn.quantize_linen(module, rules).apply(variables, x)
    np.testing.assert_array_equal(np.asarray(y_nnx), np.asarray(y_linen))
    assert float(jnp.abs(y_nnx - m(x)).max()) > 0  # quantization did something


def test_linen_cnn_matches_nnx_and_paths():
    m = CNN(CNNConfig.digits(), rngs=nnx.Rngs(0))
    module, variables = linen_cnn_from_nnx(m)
    x = jax.random.uniform(jax.random.key(2), (3, 8, 8, 1))
    y_nnx = qnn.quantize_model(m, [qnn.Rule("head"), qnn.Rule(".*", weight="int4/ch", act="int8")])(x)
    ql = qnn.quantize_linen(module, [qnn.Rule("head"), qnn.Rule(".*", weight="int4/ch", act="int8")])
    y_linen = jax.jit(ql.apply)(variables, x)
    np.testing.assert_allclose(np.asarray(y_nnx), np.asarray(y_linen), rtol=1e-6, atol=1e-6)
    assert set(ql.matched) == {"Conv_0", "Conv_1", "Dense_0"}
    # gradients flow through the Linen path too (STE)
    g = jax.grad(lambda v: ql.apply(v, x).sum())(variables)
    assert float(jnp.abs(g["params"]["Conv_0"]["kernel"]).sum()) > 0


def test_linen_rejects_stateful_quantizers():
    m = MLP(4, hidden=(8,), out=2, rngs=nnx.Rngs(0))
    module, variables = linen_mlp_from_nnx(m)
    ql = qnn.quantize_linen(module, [qnn.Rule(".*", weight="int4/ch", weight_quantizer="lsq")])
    with pytest.raises(NotImplementedError, match="NNX"):
        ql.apply(variables, jnp.ones((1, 4)))
