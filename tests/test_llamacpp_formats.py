"""llama.cpp's legacy block formats (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) against the gguf package's
numpy reference (gguf.quants, which mirrors ggml-quants.c's quantize_row_*_ref): values bit for
bit, and codes and f16 scales equal to the ones in the GGML block bytes."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import qlab
from qlab.numerics.spec import parse_spec

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

TYPES = {"q8_0": T.Q8_0, "q4_0": T.Q4_0, "q4_1": T.Q4_1, "q5_0": T.Q5_0, "q5_1": T.Q5_1}


def _reference(w, name):
    t = TYPES[name]
    return gguf.quants.dequantize(gguf.quants.quantize(w, t), t).reshape(w.shape)


def _assert_bitwise(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    nan = np.isnan(a)
    assert (nan == np.isnan(b)).all()
    diff = (a.view(np.uint32) != b.view(np.uint32)) & ~nan
    assert not diff.any(), f"{diff.sum()} of {diff.size} values differ, e.g. {a[diff][:4]} vs {b[diff][:4]}"


def _check(w, name):
    ref = _reference(w, name)
    _assert_bitwise(qlab.dequantize(qlab.quantize(w, name)), ref)
    _assert_bitwise(qlab.fake_quant(w, name), ref)


@pytest.mark.parametrize("name", list(TYPES))
def test_random_rows_equal_gguf_bit_for_bit(name):
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((48, 256)) * rng.uniform(1e-3, 30.0, (48, 1))).astype(np.float32)
    w[3, 5] = 0.0
    _check(w, name)


def _edge_rows():
    rng = np.random.default_rng(2)
    rows = [
        np.zeros(32),
        np.full(32, 0.7),
        np.full(32, -3.0),
        np.r_[np.full(31, 1.0), -1.0],  # magnitude tie between +1 and -1: the first wins
        np.r_[-2.0, np.full(31, 2.0)],
        np.arange(32) - 15.5,  # halves
        (np.arange(32) - 16) * 0.5,
        (np.arange(32) % 17 - 8) + 0.5,
        np.linspace(-1, 1, 32) * 7 / 8,
        rng.standard_normal(32) * 1e4,
        rng.standard_normal(32) * 3e5,  # Q4_0's f16 scale nears its top
        rng.standard_normal(32) * 1e6,  # f16 scale overflows to inf, as in llama.cpp
        rng.standard_normal(32) * 1e-6,  # f16 scale underflows to 0 or subnormal
        rng.standard_normal(32) * 1e-9,
        np.r_[1e-3, np.zeros(31)],
        np.r_[np.zeros(31), -5.0],
        np.r_[np.full(16, 4.0), np.full(16, 5.0)],  # Q4_1: range [4, 5], not widened to 0
    ]
    # near-ties: x = (k + 1/2) * d for the Q4_0/Q8_0 steps of a block whose extreme is 7 or 127
    k = np.arange(31) - 15
    rows.append(np.r_[7.0, (k + 0.5) * 7.0 / 8])
    rows.append(np.r_[-127.0, (k + 0.5)])
    rows.append(np.r_[-127.0, (k * 4 + 0.5) * np.float32(1 + 2**-20)])
    return np.stack(rows).astype(np.float32)


@pytest.mark.parametrize("name", list(TYPES))
def test_edge_rows_equal_gguf_bit_for_bit(name):
    _check(_edge_rows(), name)


_finite32 = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@pytest.mark.parametrize("name", list(TYPES))
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_hypothesis_blocks_equal_gguf_bit_for_bit(name, data):
    rows = data.draw(st.integers(1, 4))
    elems = data.draw(st.sampled_from([_finite32, st.sampled_from([0.0, 0.5, -0.5, 1.5, -2.5, 7.0, -8.0, 3.0])]))
    w = data.draw(hnp.arrays(np.float32, (rows, 64), elements=elems))
    w = w * np.float32(data.draw(st.sampled_from([1.0, 1e-3, 0.1, 37.0])))
    _check(w.astype(np.float32), name)


def _blocks(name, w):
    return gguf.quants.quantize(w, TYPES[name]).reshape(-1)


def test_q8_0_codes_and_scales_equal_the_block_bytes():
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((8, 128)) * 2).astype(np.float32)
    raw = _blocks("q8_0", w).reshape(-1, 34)  # f16 d, 32 int8 codes
    q = qlab.quantize(w, "q8_0")
    assert q.scale.shape == (8, 4, 1)
    np.testing.assert_array_equal(np.asarray(q.scale).reshape(-1), raw[:, :2].copy().view(np.float16).reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1, 32), raw[:, 2:].view(np.int8))


def _nibbles(qs, bits_hi=None):
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int32)  # element j, then j + 16
    if bits_hi is not None:
        codes |= (np.unpackbits(bits_hi, axis=-1, bitorder="little").astype(np.int32) << 4)
    return codes


def test_q4_0_codes_and_scales_equal_the_block_bytes():
    rng = np.random.default_rng(4)
    w = (rng.standard_normal((8, 128)) * 2).astype(np.float32)
    raw = _blocks("q4_0", w).reshape(-1, 18)  # f16 d, 16 bytes of nibbles
    q = qlab.quantize(w, "q4_0")
    d = raw[:, :2].copy().view(np.float16).reshape(-1)
    np.testing.assert_array_equal(np.asarray(q.scale).reshape(-1), d)
    assert (d < 0).any() and (d > 0).any()  # the signed extreme maps to -8 either way
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1, 32), _nibbles(raw[:, 2:]) - 8)


def test_q4_1_and_q5_1_scales_minima_and_codes_equal_the_block_bytes():
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((4, 64)) + 3).astype(np.float32)
    raw = _blocks("q4_1", w).reshape(-1, 20)  # f16 d, f16 m, nibbles
    q = qlab.quantize(w, "q4_1")
    np.testing.assert_array_equal(np.asarray(q.scale).reshape(-1), raw[:, :2].copy().view(np.float16).reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.zero_point).reshape(-1), raw[:, 2:4].copy().view(np.float16).reshape(-1))
    np.testing.assert_array_equal(np.asarray(q.codes).reshape(-1, 32), _nibbles(raw[:, 4:]))
    assert float(np.min(q.zero_point)) > 0  # the minimum itself, not widened to 0
    raw5 = _blocks("q5_1", w).reshape(-1, 24)  # f16 d, f16 m, 4 bytes of fifth bits, nibbles
    q5 = qlab.quantize(w, "q5_1")
    np.testing.assert_array_equal(np.asarray(q5.codes).reshape(-1, 32), _nibbles(raw5[:, 8:], raw5[:, 4:8]))


@pytest.mark.parametrize("name, bpw", [("q8_0", 8.5), ("q4_0", 4.5), ("q4_1", 5.0), ("q5_0", 5.5), ("q5_1", 6.0)])
def test_bits_per_weight_and_packed_size_match_ggml(name, bpw):
    shape = (16, 256)
    assert qlab.bits_per_weight(name, shape) == bpw
    assert qlab.packed_nbytes(name, shape) == gguf.quants.quantize(np.zeros(shape, np.float32), TYPES[name]).nbytes


def test_pack_round_trip_of_llama_formats():
    w = np.random.default_rng(6).standard_normal((4, 64)).astype(np.float32)
    for name in TYPES:
        q = qlab.quantize(w, name)
        q2 = qlab.unpack_qtensor(qlab.pack_qtensor(q), q.spec, q.shape)
        _assert_bitwise(qlab.dequantize(q2), qlab.dequantize(q))


@pytest.mark.parametrize("text", ["int4/g32/absmax_to=signed_extreme/biased_trunc/cs=f32", "int8/g32/half_away",
                                  "uint4/g32/asym/zp=min", "int4/g128/absmax_to=qmax+0.5", "q4_0", "q5_1",
                                  "int8/g32/half_away/cs=f32/s=bf16", "q4_0/g64"])
def test_spec_strings_round_trip(text):
    spec = parse_spec(text)
    assert parse_spec(str(spec)) == spec


def test_presets_are_their_token_forms():
    assert parse_spec("q8_0") == parse_spec("int8/g32/half_away/cs=f32")
    assert parse_spec("q4_0") == parse_spec("int4/g32/absmax_to=signed_extreme/biased_trunc/cs=f32")
    assert parse_spec("q4_1") == parse_spec("uint4/g32/asym/zp=min/biased_trunc/cs=f32")


@pytest.mark.parametrize("text, words", [
    ("int4/absmax_to=middle", "absmax_to"),
    ("uint4/absmax_to=signed_extreme", "signed integer"),
    ("int4/absmax_to=signed_extreme/s=e8m0", "negative scales"),
    ("fp8_e4m3/half_away", "integer formats"),
    ("int4/asym/zp=min", "unsigned"),
    ("uint4/zp=min", "asymmetric"),
    ("int4/cs=f64", "code_scale"),
    ("int8/cs=f32/s=e8m0", "code_scale"),
    ("uint4/asym/cs=f32", "zero_point='min'"),
    ("int4/round_up", "half_away|biased_trunc"),
])
def test_bad_values_say_what_is_allowed(text, words):
    with pytest.raises(ValueError, match=words.replace("|", r"\|")):
        parse_spec(text)


def test_llama_formats_stay_off_the_cpu_kernel():
    from qlab.numerics.spec import plain_absmax_int

    for text in list(TYPES) + ["int8/g32/half_away", "int4/g32/absmax_to=qmax+0.5", "int8/g32/cs=f32"]:
        assert not plain_absmax_int(text)


def test_q8_0_differs_from_int8_g32_only_at_near_ties():
    """The fix this preset exists for: llama.cpp's codes come from the f32 scale, qlab's int8/g32
    from the stored f16 one; both store the same scale, and codes differ by at most one step."""
    w = np.random.default_rng(7).standard_normal((64, 256)).astype(np.float32)
    a, b = qlab.quantize(w, "q8_0"), qlab.quantize(w, "int8/g32")
    np.testing.assert_array_equal(np.asarray(a.scale), np.asarray(b.scale))
    d = np.abs(np.asarray(a.codes, np.int32) - np.asarray(b.codes, np.int32))
    assert d.max() == 1 and 0 < (d > 0).mean() < 0.05


def test_qmax_plus_half_scale_grid():
    """Qwix / AQT: scale = absmax / (qmax + 0.5); the top value sits on a half-way point and clips."""
    x = np.array([[7.5, -7.5, 1.0, 0.49, -3.2, 0.0, 5.0, 2.6]], np.float32)
    for bits in (4, 8):
        qmax = 2 ** (bits - 1) - 1
        spec = parse_spec(f"int{bits}/ch0/s=f32/absmax_to=qmax+0.5")
        q = qlab.quantize(x, spec)
        step = np.float32(7.5) * (np.float32(1) / np.float32(qmax + 0.5))
        assert float(q.scale.reshape(())) == step
        v = x * (np.float32(1) / step)  # float32, as qlab divides
        expect = np.clip(np.round(v), -qmax - 1, qmax)
        np.testing.assert_array_equal(np.asarray(q.codes, np.float32)[0], expect[0])
        assert int(q.codes[0, 0]) == qmax and abs(float(v[0, 0]) - (qmax + 0.5)) < 1e-4  # lands on a half, clips
        np.testing.assert_array_equal(np.asarray(qlab.dequantize(q)), expect.astype(np.float32) * step)


@pytest.mark.parametrize("name", ["q4_0", "q5_0", "q4_1", "q5_1"])
def test_near_tie_not_fused_into_fma(name):
    """x * (1/d) = 2.4999995 in float32 (so 11 after + 8.5 and trunc); one FMA would give 10."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((48, 256)) * rng.uniform(1e-3, 20.0, (48, 1))).astype(np.float32)
    _check(w, name)
