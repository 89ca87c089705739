"""qlab.numerics.quantized_matmul: the integer-code product equals the fake-quant product, same gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import qlab
from qlab.numerics import fake_quant
from qlab.numerics.matmul import int_matmul_supported, quantized_matmul, quantized_matmul_codes

X_SPECS = ["int8", "int8/ch0", "uint4", "int8n", "int6/s=f32"]
W_SPECS = ["int8/ch1", "int8", "int4/ch1", "int2/ch1", "int3/ch1/s=bf16"]


@settings(max_examples=25, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 300), n=st.integers(1, 9), xi=st.integers(0, 4), wi=st.integers(0, 4),
       seed=st.integers(0, 2**16))
def test_equals_the_fake_quant_product(m, k, n, xi, wi, seed):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (m, k)) * 3.0
    w = jax.random.normal(kw, (k, n)) * 0.1
    xs, ws = X_SPECS[xi], W_SPECS[wi]
    y = quantized_matmul(x, w, xs, ws)
    qx, qw = qlab.quantize(x, xs), qlab.quantize(w, ws)
    # the integer sum is exact: y / (sx sw) is the integer product of the codes
    exact = np.asarray(qx.codes, np.int64) @ np.asarray(qw.codes, np.int64)
    want = exact * np.asarray(qx.scale, np.float64) * np.asarray(qw.scale, np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-6, atol=1e-6 * np.abs(want).max() + 1e-30)
    ref = fake_quant(x, xs) @ fake_quant(w, ws)
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5 * float(jnp.abs(ref).max()) + 1e-30)


def test_gradients_are_the_fake_quant_products():
    x = jax.random.normal(jax.random.key(0), (16, 64))
    w = jax.random.normal(jax.random.key(1), (64, 8))
    r = jax.random.normal(jax.random.key(2), (16, 8))
    gx, gw = jax.grad(lambda x, w: jnp.sum(quantized_matmul(x, w, "int8", "int4/ch1") * r), (0, 1))(x, w)
    fx, fw = jax.grad(lambda x, w: jnp.sum((fake_quant(x, "int8") @ fake_quant(w, "int4/ch1")) * r), (0, 1))(x, w)
    np.testing.assert_allclose(gx, fx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gw, fw, rtol=1e-6, atol=1e-6)
    # converted weights: the same forward, gradient to x only
    qw = qlab.quantize(w, "int4/ch1")
    np.testing.assert_array_equal(quantized_matmul_codes(x, "int8", qw), quantized_matmul(x, w, "int8", "int4/ch1"))
    g = jax.grad(lambda x: jnp.sum(quantized_matmul_codes(x, "int8", qw) * r))(x)
    np.testing.assert_allclose(g, fx, rtol=1e-6, atol=1e-6)


def test_zeros_and_jit():
    y = jax.jit(lambda x, w: quantized_matmul(x, w, "int8", "int8/ch1"))(jnp.zeros((3, 5)), jnp.zeros((5, 2)))
    assert y.tolist() == [[0.0, 0.0]] * 3


@pytest.mark.parametrize("spec,axis,ok", [
    ("int8/ch1", 1, True), ("int8/ch0", 1, False), ("int8/ch0", 0, True), ("int4/g32", 1, False),
    ("int8/asym", 0, False), ("int8/mse", 0, False), ("fp8_e4m3", 0, False), ("int8/s=e8m0", 0, False),
    ("int8/sr", 0, False), ("uint8", 0, False), ("uint7/ch0", 0, True),
])
def test_supported_specs(spec, axis, ok):
    assert int_matmul_supported(spec, axis) is ok


def test_unsupported_spec_error_names_the_field():
    with pytest.raises(ValueError, match=r"w_spec = 'int4/g32'.*symmetric int1..int8"):
        quantized_matmul(jnp.ones((2, 64)), jnp.ones((64, 3)), "int8", "int4/g32")
    with pytest.raises(ValueError, match=r"x must be \[M, K\]"):
        quantized_matmul(jnp.ones((2, 4)), jnp.ones((5, 3)), "int8", "int8/ch1")


def test_backward_keeps_codes_and_scales_not_float_copies(capsys):
    # the residuals of a W8A8 product are int8 codes plus scales: a quarter of the bytes of float32 copies
    from jax.ad_checkpoint import print_saved_residuals

    x, w = jnp.ones((4, 64)), jnp.ones((64, 8))
    print_saved_residuals(lambda x, w: quantized_matmul(x, w, "int8", "int8/ch1").sum(), x, w)
    saved = sorted(line.split()[0] for line in capsys.readouterr().out.strip().splitlines())
    assert saved == sorted(["i8[4,64]", "f32[1,1]", "i8[64,8]", "f32[1,8]"])
