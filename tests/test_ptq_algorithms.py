"""Array-level PTQ algorithms: GPTQ, AWQ, HQQ, SmoothQuant, RTN, outliers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qlab
from qlab import ptq
from qlab.ptq.gptq import gptq_block_size

N_IN, N_OUT = 128, 32


@pytest.fixture(scope="module")
def layer():
    """Correlated inputs (low-rank mixing + noise, uneven channel scales) and a random kernel."""
    k = jax.random.split(jax.random.key(0), 5)
    A = jax.random.normal(k[0], (N_IN, N_IN)) / np.sqrt(N_IN)
    scales = jnp.exp(jax.random.normal(k[1], (N_IN,)) * 0.7)
    X = (jax.random.normal(k[2], (1024, N_IN)) @ A + 0.2 * jax.random.normal(k[3], (1024, N_IN))) * scales
    W = jax.random.normal(k[4], (N_IN, N_OUT)) / np.sqrt(N_IN)
    return X, W, X.T @ X


def out_err(X, W, Q):
    return float(jnp.sum((X @ W - X @ Q) ** 2))


def requantize_codes(q):
    """Codes obtained by rounding dequantize(q) again with q's stored scales (fixed point check)."""
    spec = q.spec
    from qlab.numerics.granularity import from_view, to_view

    yv, _ = to_view(qlab.dequantize(q).astype(jnp.float32), spec.granularity)
    v = yv / q.scale
    if q.zero_point is not None:
        v = v + q.zero_point
    return from_view(spec.fmt.round(v), spec.granularity, q.shape)


def assert_on_grid(q):
    fmt = q.spec.fmt
    c = np.asarray(q.codes).astype(np.int32)
    assert c.min() >= fmt.qmin and c.max() <= fmt.qmax
    np.testing.assert_array_equal(np.asarray(requantize_codes(q)), c)
    # dequantize is exactly codes * scale (grouped view)
    assert np.all(np.isfinite(np.asarray(qlab.dequantize(q))))


@pytest.mark.parametrize("spec", ["int4/g32", "int3/ch", "int4/g32/asym"])
def test_gptq_beats_rtn_on_output_error(layer, spec):
    X, W, H = layer
    e_rtn = out_err(X, W, qlab.dequantize(ptq.rtn_weight(W, spec)))
    q = ptq.gptq_weight(W, H, spec)
    qa = ptq.gptq_weight(W, H, spec, act_order=True)
    assert out_err(X, W, qlab.dequantize(q)) < 0.8 * e_rtn
    assert out_err(X, W, qlab.dequantize(qa)) < 0.8 * e_rtn
    for qq in (q, qa):
        assert_on_grid(qq)
        assert qq.spec == qlab.parse_spec(spec).resolve(1, 0)


def test_gptq_identity_hessian_is_rtn(layer):
    _, W, _ = layer
    q = ptq.gptq_weight(W, jnp.eye(N_IN), "int4/g32")
    r = ptq.rtn_weight(W, "int4/g32")
    np.testing.assert_array_equal(np.asarray(q.codes), np.asarray(r.codes))
    np.testing.assert_array_equal(np.asarray(q.scale), np.asarray(r.scale))


def test_gptq_group_scales(layer):
    X, W, H = layer
    q = ptq.gptq_weight(W, H, "int4/g32")
    assert q.scale.shape == (N_IN // 32, 1, N_OUT)
    # group scales are computed when the sweep reaches the group: the first group has seen no update yet
    # (its scale is RTN's); later groups were computed from error-updated rows (so they differ)
    r = ptq.rtn_weight(W, "int4/g32")
    np.testing.assert_array_equal(np.asarray(q.scale[0]), np.asarray(r.scale[0]))
    assert not np.array_equal(np.asarray(q.scale[1:]), np.asarray(r.scale[1:]))
    # static groups (act order): the scales are those of RTN on the original kernel, by construction
    qs = ptq.gptq_weight(W, H, "int4/g32", act_order=True)
    np.testing.assert_array_equal(np.asarray(qs.scale), np.asarray(ptq.rtn_weight(W, "int4/g32").scale))
    with pytest.raises(ValueError, match="static_groups"):
        ptq.gptq_weight(W, H, "int4/g32", act_order=True, static_groups=False)


def test_gptq_dead_inputs_and_padding():
    k = jax.random.split(jax.random.key(3), 2)
    X = jax.random.normal(k[0], (256, 96)).at[:, 5].set(0.0)  # input 5 never fires
    W = jax.random.normal(k[1], (96, 8))
    q = ptq.gptq_weight(W, X.T @ X, "int8/ch", block_size=64)  # 96 rows: the last block is padded
    assert_on_grid(q)
    assert int(q.codes[5].astype(jnp.int32).__abs__().max()) == 0
    assert out_err(X, W, qlab.dequantize(q)) < out_err(X, W, qlab.dequantize(ptq.rtn_weight(W, "int8/ch")))


def test_gptq_rejects_bad_inputs(layer):
    X, W, H = layer
    with pytest.raises(ValueError, match="H must be"):
        ptq.gptq_weight(W, H[:10, :10], "int4/g32")
    with pytest.raises(ValueError, match="per-group along the input axis"):
        ptq.gptq_weight(W, H, "int4/b32x32")
    assert gptq_block_size(128, 64) == 64 and gptq_block_size(128, 256) == 128


def test_awq_rescaling_is_exact_in_float(layer):
    X, W, _ = layer
    s = ptq.awq_scales(jnp.mean(jnp.abs(X), axis=0), 0.5)
    Xs, Ws = ptq.apply_input_scale(X, W, s)
    np.testing.assert_allclose(np.asarray(Xs @ Ws), np.asarray(X @ W), rtol=1e-4, atol=1e-4)


def test_awq_beats_rtn(layer):
    X, W, _ = layer
    spec = "int3/g32"
    q, s, info = ptq.awq_weight(W, X, spec, return_info=True)
    assert s.shape == (N_IN,) and 0.0 <= info["alpha"] < 1.0 and len(info["losses"]) == 20
    assert_on_grid(q)
    got = out_err(X, W, qlab.dequantize(q) / s[:, None])
    assert got < out_err(X, W, qlab.dequantize(ptq.rtn_weight(W, spec)))
    # the scale search alone never does worse than RTN (alpha = 0 is RTN)
    assert info["losses"].min() <= info["losses"][0]
    with pytest.raises(ValueError, match="no rows"):
        ptq.awq_weight(W, X[:0], spec)


def test_smoothquant_scales_and_float_invariance(layer):
    X, W, _ = layer
    a = jnp.max(jnp.abs(X), axis=0)
    s = ptq.smoothquant_scales(a, W, alpha=0.5)
    np.testing.assert_allclose(np.asarray(s), np.sqrt(np.asarray(a) / np.asarray(jnp.max(jnp.abs(W), 1))), rtol=1e-5)
    Xs, Ws = ptq.apply_input_scale(X, W, s)
    np.testing.assert_allclose(np.asarray(Xs @ Ws), np.asarray(X @ W), rtol=1e-4, atol=1e-4)
    # activations get flatter: the spread of per-channel maxima shrinks
    a2 = jnp.max(jnp.abs(Xs), axis=0)
    assert float(a2.max() / a2.min()) < float(a.max() / a.min())
    # dead channels get s = 1
    assert float(ptq.smoothquant_scales(a.at[3].set(0.0), W)[3]) == 1.0


@pytest.mark.parametrize("spec", ["int4/g64/asym/zp=float", "int3/g64/asym/zp=float"])
def test_hqq_lowers_weight_error(spec):
    W = jax.random.t(jax.random.key(7), 5.0, (256, 64))
    r = qlab.dequantize(ptq.rtn_weight(W, spec))
    q = ptq.hqq_weight(W, spec)
    h = qlab.dequantize(q)
    assert_on_grid(q)
    assert float(jnp.mean(jnp.abs(h - W))) < float(jnp.mean(jnp.abs(r - W)))
    assert float(jnp.mean((h - W) ** 2)) < float(jnp.mean((r - W) ** 2))
    assert q.zero_point.shape == (256 // 64, 1, 64)
    with pytest.raises(ValueError, match="asymmetric"):
        ptq.hqq_weight(W, "int4/g64")


def test_outlier_columns():
    a = np.array([0.1, 6.5, 3.0, 100.0, 6.0])
    assert ptq.outlier_columns(a).tolist() == [1, 3]
    assert ptq.outlier_columns(a, threshold=2.0).tolist() == [1, 2, 3, 4]
    assert ptq.outlier_fraction(a) == pytest.approx(0.4)


# ---- llama.cpp presets (code_scale="f32", zero_point="min", half_away / biased_trunc) -------------


@pytest.mark.parametrize("name", ["q8_0", "q4_0", "q4_1", "q5_1"])
def test_rtn_helpers_reproduce_quantize_for_llamacpp_presets(layer, name):
    """group_params + group_code_params + grid_round (GPTQ's pieces) give quantize's codes and values."""
    from qlab.ptq.rtn import grid_round, group_code_params, group_params, resolve_weight_spec

    _, W, _ = layer
    spec = resolve_weight_spec(name, require_rows=True)
    q = ptq.rtn_weight(W, spec)
    ng = N_IN // 32
    rows = W.reshape(ng, 32, N_OUT)
    s, z = jax.vmap(lambda r: group_params(r, spec))(rows)
    code = jax.vmap(lambda r: group_code_params(r, spec))(rows)
    r, y = grid_round(rows, s, z, None, spec, code=code)
    np.testing.assert_array_equal(np.asarray(spec.fmt.encode(r)).reshape(N_IN, N_OUT), np.asarray(q.codes))
    np.testing.assert_array_equal(np.asarray(y).reshape(N_IN, N_OUT), np.asarray(qlab.dequantize(q)))


@pytest.mark.parametrize("name", ["q4_0", "q4_1", "q8_0"])
def test_gptq_and_awq_with_llamacpp_presets(layer, name):
    """GPTQ and AWQ honour zp=min and the presets' rounding: each beats RTN on the output error."""
    X, W, H = layer
    e_rtn = out_err(X, W, qlab.dequantize(ptq.rtn_weight(W, name)))
    q = ptq.gptq_weight(W, H, name)
    assert q.spec.rounding == qlab.parse_spec(name).rounding
    assert out_err(X, W, qlab.dequantize(q)) < e_rtn
    qa, s = ptq.awq_weight(W, X, name)
    assert out_err(X, W, qlab.dequantize(qa) / s[:, None]) < e_rtn


def test_stochastic_rounding_rejected_by_row_algorithms(layer):
    _, W, H = layer
    with pytest.raises(ValueError, match="stochastic"):
        ptq.gptq_weight(W, H, "int4/g32/sr")


def test_hqq_rejects_zero_point_min():
    with pytest.raises(ValueError, match="zero_point='min'"):
        ptq.hqq_weight(jnp.ones((64, 4)), "q4_1")
