"""Formats against independent references: ml_dtypes casts, bitsandbytes' codebook
constructions, and MX/NVFP4 cases worked by hand from the specs."""

import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import norm

import qlab
from qlab.numerics.formats import BNB_FP4_VALUES, NF4_VALUES, FloatFormat, IntFormat, get_format

ML_DTYPES = {
    "fp8_e4m3": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp6_e3m2": ml_dtypes.float6_e3m2fn,
    "fp6_e2m3": ml_dtypes.float6_e2m3fn,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


def _all_finite_values(dt, bits):
    vals = np.arange(2**bits, dtype=np.uint8).view(dt).astype(np.float32)
    vals = vals[np.isfinite(vals)]
    return np.unique(vals)  # -0 and +0 collapse


@pytest.mark.parametrize("name", list(ML_DTYPES))
def test_minifloat_grid_equals_ml_dtypes(name):
    fmt = get_format(name)
    ref = _all_finite_values(ML_DTYPES[name], fmt.bits)
    np.testing.assert_array_equal(fmt.grid(), ref)
    assert fmt.max_abs == float(ml_dtypes.finfo(ML_DTYPES[name]).max)


@pytest.mark.parametrize("name", list(ML_DTYPES))
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_minifloat_round_and_codes_equal_ml_dtypes_cast(name, data):
    fmt = get_format(name)
    dt = ML_DTYPES[name]
    mx = fmt.max_abs
    # magnitudes spanning subnormals, normals and beyond the saturation point
    xs = data.draw(
        st.lists(
            st.floats(-4 * mx, 4 * mx, allow_nan=False, width=32)
            | st.floats(-2 * fmt.min_subnormal, 2 * fmt.min_subnormal, width=32),
            min_size=1,
            max_size=64,
        )
    )
    x = np.zeros(64, np.float32)  # one shape, so the jitted ops compile once
    x[: len(xs)] = xs
    ref = np.clip(x, -mx, mx).astype(dt)  # saturate, then the reference RNE cast
    got = np.asarray(jax.jit(fmt.round)(jnp.asarray(x)))
    np.testing.assert_array_equal(got, ref.astype(np.float32))
    codes = np.asarray(jax.jit(fmt.encode)(jnp.asarray(got)))
    np.testing.assert_array_equal(codes, ref.view(np.uint8))
    np.testing.assert_array_equal(np.asarray(jax.jit(fmt.decode)(jnp.asarray(codes))), got)


def test_float_round_saturates_inf_and_keeps_nan():
    fmt = get_format("fp8_e4m3")
    out = np.asarray(fmt.round(jnp.array([np.inf, -np.inf, np.nan, 1e30], jnp.float32)))
    assert out[0] == 448 and out[1] == -448 and np.isnan(out[2]) and out[3] == 448


def test_generic_eXmY_has_no_reserved_codes():
    f = get_format("e3m4")
    assert isinstance(f, FloatFormat) and f.bits == 8
    # bias 3, top exponent 7-3=4, mantissa all ones: (2 - 1/16) * 16
    assert f.max_abs == (2 - 1 / 16) * 16
    assert len(f.grid()) == 2 * 2**7 - 1  # every code is a value; +-0 merge


def test_nf4_matches_bitsandbytes_construction():
    # bitsandbytes create_normal_map(offset=0.9677083, use_extra_value=True)
    offset = 0.9677083
    v1 = norm.ppf(np.linspace(offset, 0.5, 9)[:-1])
    v3 = -norm.ppf(np.linspace(offset, 0.5, 8)[:-1])
    vals = np.sort(np.concatenate([v1, [0.0], v3]))
    vals = vals / vals.max()
    np.testing.assert_allclose(np.array(NF4_VALUES), vals, atol=2e-7)
    assert get_format("nf4").bits == 4


def test_bnb_fp4_matches_bitsandbytes_bit_layout():
    # bitsandbytes' FP4: sign | e1 e0 | m with bias 3, exponent 0 = {0, 0.0625}; normalised by 12
    ref = {}
    for sign in (0, 1):
        for e1 in (0, 1):
            for e0 in (0, 1):
                for m in (0, 1):
                    code = sign * 8 + e1 * 4 + e0 * 2 + m
                    e = e1 * 2 + e0
                    v = (0.0625 if m else 0.0) if e == 0 else 2.0 ** (-e + 3 + 1) * (1.5 if m else 1.0)
                    ref[code] = (-v if sign else v) / 12.0
    np.testing.assert_allclose(np.array(BNB_FP4_VALUES), [ref[i] for i in range(16)], rtol=1e-7)
    fmt = get_format("fp4_bnb")
    codes = fmt.encode(jnp.array([1.0, -0.25, 1 / 192, 0.0]))
    assert np.asarray(codes).tolist() == [3, 15, 1, 0]


@pytest.mark.parametrize("bits", range(1, 9))
def test_int_formats(bits):
    s, u = IntFormat(bits), IntFormat(bits, signed=False)
    assert (s.qmin, s.qmax) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert (u.qmin, u.qmax) == (0, 2**bits - 1)
    if bits >= 2:
        assert IntFormat(bits, narrow=True).qmin == -(2 ** (bits - 1)) + 1
    x = jnp.linspace(-300, 300, 1001)
    r = np.asarray(s.round(x))
    assert r.min() == s.qmin and r.max() == s.qmax and np.all(r == np.round(r))


def test_format_errors_name_field_and_allowed_values():
    with pytest.raises(ValueError, match=r"format: unknown name 'int9'.*allowed: .*int8"):
        get_format("int9")
    with pytest.raises(ValueError, match="IntFormat.bits"):
        IntFormat(0)
    with pytest.raises(ValueError, match="FloatFormat"):
        FloatFormat(5, 5)
    with pytest.raises(ValueError, match="at least 2 distinct"):
        qlab.codebook("bad", [1.0, 1.0])


# ---- block formats, worked by hand from the OCP MX v1.0 spec and NVIDIA's NVFP4 --------


def _block(values, n=32):
    x = np.zeros(n, np.float32)
    x[: len(values)] = values
    return jnp.asarray(x)[None, :]


def test_mxfp4_by_hand():
    # amax 5 -> shared exponent floor(log2 5) - emax(e2m1)=2 -> 2^0; 5 is a tie between 4 and 6
    # and rounds to even (4); 0.3 -> 0.5; -0.2 -> -0.0 (0.25 is a tie, rounds to even 0)
    q = qlab.quantize(_block([5.0, 0.3, -0.25, 2.6]), "mxfp4")
    assert float(q.scale.reshape(())) == 1.0
    y = np.asarray(qlab.dequantize(q))[0, :4]
    np.testing.assert_array_equal(y, [4.0, 0.5, -0.0, 3.0])
    # amax 100 -> 2^(6-2) = 16; 100/16 = 6.25 saturates to 6 -> 96
    q = qlab.quantize(_block([100.0, 1.0]), "mxfp4")
    assert float(q.scale.reshape(())) == 16.0
    np.testing.assert_array_equal(np.asarray(qlab.dequantize(q))[0, :2], [96.0, 0.0])


def test_mxint8_by_hand():
    # MXINT8: int8 read as fixed point 1.6 (emax 0); amax 1.9 -> X = 2^0, step 2^-6
    q = qlab.quantize(_block([1.9, -1.9, 0.3, 1.0]), "mxint8")
    assert float(q.scale.reshape(())) == 1.0  # the OCP scale X itself
    np.testing.assert_array_equal(np.asarray(q.codes)[0, :4], [122, -122, 19, 64])
    y = np.asarray(qlab.dequantize(q))[0, :4]
    np.testing.assert_array_equal(y, np.array([122, -122, 19, 64]) / 64)


def test_mxint8_packs_the_ocp_scale_byte_and_decodes_as_an_ocp_reader_does():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 64)) * np.array([[1e-3], [0.7], [3.0], [900.0]])).astype(np.float32)
    q = qlab.quantize(x, "mxint8")
    raw = np.frombuffer(qlab.pack_qtensor(q), np.uint8)
    codes, xbytes = raw[: x.size].view(np.int8).reshape(4, 2, 32), raw[x.size :].reshape(4, 2)
    amax = np.abs(x).reshape(4, 2, 32).max(-1)
    np.testing.assert_array_equal(xbytes.astype(int) - 127, np.floor(np.log2(amax)).astype(int))  # emax(INT8) = 0
    ocp = codes.astype(np.float64) * 2.0**-6 * np.exp2(xbytes.astype(np.float64) - 127)[..., None]
    np.testing.assert_array_equal(np.asarray(qlab.dequantize(q)).reshape(4, 2, 32), ocp.astype(np.float32))
    # -2.0 (code -128) is used: a value just under -127/64 * X rounds to it
    q = qlab.quantize(_block([1.0, -1.995]), "mxint8")
    assert np.asarray(q.codes)[0, 1] == -128 and float(q.scale.reshape(())) == 1.0


def test_nvfp4_dequantizes_with_one_rounding_per_product():
    """(code * block scale) * tensor scale, each product correctly rounded, as a float64 reference."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((16, 256)) * rng.uniform(0.01, 50, (16, 1))).astype(np.float32)
    x[0, 0] = 157.3  # a tensor scale amax / 2688 with a full mantissa (this seed's has 9 trailing zeros)
    q = qlab.quantize(x, "nvfp4")
    code_vals = np.asarray(q.spec.fmt.decode(q.codes), np.float64).reshape(16, 16, 16)
    s = np.asarray(q.scale, np.float64).reshape(16, 16, 1)
    ts = np.float64(q.tensor_scale)
    ref = ((code_vals * s).astype(np.float32).astype(np.float64) * ts).astype(np.float32).reshape(x.shape)
    # the old double rounding, code * f32(block scale * tensor scale), differs on these data (so
    # the assertion below would fail on it)
    twice = (code_vals * (s * ts).astype(np.float32).astype(np.float64)).astype(np.float32).reshape(x.shape)
    assert (twice.view(np.uint32) != ref.view(np.uint32)).mean() > 0.03
    y = np.asarray(qlab.dequantize(q))
    np.testing.assert_array_equal(y.view(np.uint32), ref.view(np.uint32))
    np.testing.assert_array_equal(np.asarray(qlab.fake_quant(x, "nvfp4")).view(np.uint32), ref.view(np.uint32))


def test_mxfp8_by_hand():
    # e4m3: emax 8; amax 1000 -> 2^(9-8) = 2; 1000/2 = 500 saturates to 448 -> 896
    q = qlab.quantize(_block([1000.0, 3.0]), "mxfp8")
    assert float(q.scale.reshape(())) == 2.0
    np.testing.assert_array_equal(np.asarray(qlab.dequantize(q))[0, :2], [896.0, 3.0])


def test_nvfp4_two_level_scale():
    x = jnp.asarray(np.linspace(-3, 3, 64, dtype=np.float32))[None, :]
    q = qlab.quantize(x, "nvfp4")
    assert q.scale.shape == (1, 4, 1) and q.tensor_scale is not None
    # block scales are e4m3 values
    s = np.asarray(q.scale).ravel()
    np.testing.assert_array_equal(s, s.astype(ml_dtypes.float8_e4m3fn).astype(np.float32))
    ts = float(q.tensor_scale)
    assert ts == pytest.approx(3.0 / (6 * 448), rel=1e-6)
    err = np.abs(np.asarray(qlab.dequantize(q)) - np.asarray(x))
    assert err.max() <= 0.5 * 3.0 / 6 * 2 + 1e-6  # at most half of the widest fp4 step (2 units)


@pytest.mark.parametrize(
    "name,bpw",
    [("mxfp4", 4.25), ("mxfp8", 8.25), ("mxfp6", 6.25), ("mxint8", 8.25), ("int4/g128", 4.125)],
)
def test_block_bits_per_weight(name, bpw):
    assert qlab.bits_per_weight(name, (256, 4096)) == bpw


def test_nvfp4_bits_per_weight():
    n = 256 * 4096
    assert qlab.bits_per_weight("nvfp4", (256, 4096)) == pytest.approx(4 + 8 / 16 + 32 / n)


def test_codebook_nearest_value():
    cb = qlab.codebook("pow2", [-4, -2, -1, 0, 1, 2, 4])
    r = np.asarray(cb.round(jnp.array([2.9, 3.1, -0.4, 0.5, 100.0])))
    np.testing.assert_array_equal(r, [2.0, 4.0, 0.0, 1.0, 4.0])  # 0.5 is a tie: goes up
    assert math.isclose(cb.max_abs, 4.0)
