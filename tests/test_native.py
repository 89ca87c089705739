"""The CPU kernels (qlab.numerics.native: fake_quant, quantize): bit-identical to the XLA path on every spec
they cover, over shapes, dtypes and edge values; both of its schedules (whole groups, and large
groups split into bands); in place and fresh outputs; vmap, grad, and the specs it declines."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qlab
from qlab.numerics import native
from qlab.numerics.quantize import fake_quant_xla, quantize_xla

hsettings = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KERNEL_SPECS = [
    "int8", "int8/ch", "int8/ch0", "int4/g16", "int4/g16a0", "int4/g24p", "int4/g24a0p", "int2/g8",
    "int1/ch", "uint4/g16", "uint8/ch", "int4n/g16", "int2n/ch0", "int3/g16/s=bf16", "int8/ch/s=f32",
    "int4/g16/absmax_to=qmin", "int8/tensor/s=bf16",
]  # fmt: skip


def test_kernel_is_built_and_enabled():
    st_ = native.status()
    assert st_["enabled"], st_["detail"]
    assert st_["detail"].endswith(".so")


def _xla(x, spec):
    return np.asarray(fake_quant_xla(x, spec))


def _kernel(x, spec):
    view = native.kernel_view(spec, x.shape, x.dtype)
    assert view is not None, str(spec)
    return np.asarray(jax.jit(lambda v: native.fake_quant_cpu(v, spec, view))(x))


def _same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a.view(np.uint8), b.view(np.uint8))


@st.composite
def cases(draw):
    spec = qlab.parse_spec(draw(st.sampled_from(KERNEL_SPECS)))
    shape = draw(st.sampled_from([(48, 32), (5, 48), (3, 4, 48), (96,), (1, 48), (130, 48)]))
    if native.kernel_view(spec, shape, jnp.float32) is None:  # e.g. g16 on 5 rows along axis 0, unpadded
        shape = (48, 48)
    dtype = draw(st.sampled_from([np.float32, jnp.bfloat16, np.float16]))
    kind = draw(st.sampled_from(["normal", "huge", "tiny", "denormal", "zeros", "const", "nonfinite"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    x = rng.standard_normal(shape).astype(np.float32)
    x = {
        "normal": x,
        "huge": x * np.float32(3e37),
        "tiny": x * np.float32(1e-30),
        "denormal": x * np.float32(1e-39),
        "zeros": np.zeros(shape, np.float32),
        "const": np.full(shape, -0.37, np.float32),
        "nonfinite": x,
    }[kind]
    if kind == "nonfinite":
        flat = x.reshape(-1)
        idx = rng.choice(flat.size, size=min(4, flat.size), replace=False)
        flat[idx] = np.array([np.nan, np.inf, -np.inf, -0.0], np.float32)[: len(idx)]
    return spec, np.asarray(jnp.asarray(x, dtype))


@hsettings
@given(cases())
def test_kernel_bit_identical_to_xla_path(case):
    spec, x = case
    assert _same_bits(_kernel(x, spec), _xla(x, spec))


@hsettings
@given(cases())
def test_fake_quant_still_equals_dequantize_of_quantize(case):
    spec, x = case
    y = np.asarray(jax.jit(qlab.fake_quant, static_argnums=1)(x, spec))
    ref = np.asarray(qlab.dequantize(qlab.quantize(x, spec)))
    nan = np.isnan(np.asarray(x, np.float32))  # quantize stores code 0 for NaN; fake_quant keeps the NaN
    assert _same_bits(y[~nan], ref[~nan])
    assert np.isnan(np.asarray(y, np.float32)[nan]).all()


@hsettings
@given(cases())
def test_quantize_kernel_bit_identical_to_xla_path(case):
    spec, x = case
    q = jax.jit(qlab.quantize, static_argnums=1)(x, spec)
    assert "qlab_quantize_int" in jax.jit(qlab.quantize, static_argnums=1).lower(x, spec).as_text()
    ref = quantize_xla(x, spec)
    for a, b in ((q.codes, ref.codes), (q.scale, ref.scale)):
        assert _same_bits(a, b)


@pytest.mark.parametrize(
    "spec,shape",
    [
        ("int8/ch", (40000, 64)),  # one 10 MB group per column block: split into bands
        ("int4/tensor", (1 << 21,)),  # one contiguous 8 MB group
        ("int8/ch0", (2, 1 << 21)),  # two contiguous 8 MB groups
        ("int4/g128a0", (4096, 1024)),  # many groups
    ],
)
def test_large_groups_and_in_place(spec, shape):
    # arrays this large take the XLA path in fake_quant (native.fake_quant_view), but the kernel
    # still covers them: called directly, into a copy of a live input and in place of a donated one
    sp = qlab.parse_spec(spec)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    x.reshape(-1)[[7, 1000, -3]] = [np.nan, np.inf, 1e-40]
    ref = _xla(x, sp)
    assert _same_bits(_kernel(x, sp), ref)
    view = native.kernel_view(sp, x.shape, x.dtype)
    donated = jax.jit(lambda v: native.fake_quant_cpu(v, sp, view), donate_argnums=0)(jnp.asarray(x))
    assert _same_bits(donated, ref)
    assert _same_bits(jax.jit(lambda v: qlab.fake_quant(v, sp), donate_argnums=0)(jnp.asarray(x)), ref)
    q, ref = qlab.quantize(x, sp), quantize_xla(x, sp)
    assert _same_bits(q.codes, ref.codes) and _same_bits(q.scale, ref.scale)


def test_vmap_and_grad_through_the_kernel():
    sp = qlab.parse_spec("int4/g16")
    x = jax.random.normal(jax.random.key(0), (3, 8, 32))
    batched = jax.vmap(lambda v: qlab.fake_quant(v, sp))(x)
    assert _same_bits(batched, np.stack([_xla(np.asarray(v), sp) for v in x]))
    qb = jax.vmap(lambda v: qlab.quantize(v, sp))(x)
    for i in range(3):
        assert _same_bits(qb.codes[i], qlab.quantize(x[i], sp).codes)
        assert _same_bits(qb.scale[i], qlab.quantize(x[i], sp).scale)
    g = jax.grad(lambda v: (qlab.fake_quant(v, sp) * 2.0).sum())(x[0])
    assert np.array_equal(np.asarray(g), np.full((8, 32), 2.0, np.float32))  # absmax: identity STE


def test_the_kernel_is_what_runs_on_cpu():
    sp = qlab.parse_spec("int8/ch")
    hlo = jax.jit(lambda v: qlab.fake_quant(v, sp)).lower(jnp.ones((8, 16))).as_text()
    assert "qlab_fake_quant_int" in hlo


def test_fake_quant_dispatches_the_kernel_only_up_to_its_size_limit():
    # above the limit the kernel is not faster than the XLA path in both modes (fresh, donated);
    # quantize's kernel has no such limit
    sp = qlab.parse_spec("int8/ch")
    limit = native.FAKE_QUANT_MAX_ELEMENTS
    for rows, kernel in ((limit // 64, True), (limit // 64 + 1, False)):
        x = jax.ShapeDtypeStruct((rows, 64), jnp.float32)
        assert ("qlab_fake_quant_int" in jax.jit(lambda v: qlab.fake_quant(v, sp)).lower(x).as_text()) == kernel
        assert "qlab_quantize_int" in jax.jit(lambda v: qlab.quantize(v, sp).codes).lower(x).as_text()


@pytest.mark.parametrize(
    "spec,shape,dtype",
    [
        ("int8/asym", (8, 16), np.float32),  # zero point
        ("fp8_e4m3/ch", (8, 16), np.float32),  # minifloat
        ("int4/g16/p99", (8, 16), np.float32),  # percentile range
        ("int4/g16/sr", (8, 16), np.float32),  # stochastic rounding
        ("int8/ch1", (4, 8, 16), np.float32),  # channel axis in the middle
        ("int8/b4x8", (8, 16), np.float32),  # 2-D blocks
        ("nvfp4", (8, 32), np.float32),  # second-level scale
        ("int4/g16/s=e8m0", (8, 16), np.float32),  # power-of-two scale
        ("int8/ch", (8, 16), np.int32),  # not a float
    ],
)
def test_kernel_declines_what_it_does_not_cover(spec, shape, dtype):
    assert native.kernel_view(qlab.parse_spec(spec), shape, dtype) is None


def test_overrides_and_given_ranges_take_the_xla_path():
    sp = qlab.parse_spec("int8/ch")
    x = jnp.ones((8, 16))
    for f in (lambda v: qlab.fake_quant(v, sp, bits=4), lambda v: qlab.fake_quant_range(v, sp, -1.0, 1.0)):
        assert "qlab_fake_quant_int" not in jax.jit(f).lower(x).as_text()


def test_qlab_native_0_turns_the_kernel_off():
    code = (
        "import jax, jax.numpy as jnp, qlab; from qlab.numerics import native; "
        "print(native.status()['enabled'], 'qlab_fake_quant_int' in "
        "jax.jit(lambda v: qlab.fake_quant(v, 'int8/ch')).lower(jnp.ones((4, 8))).as_text())"
    )
    env = dict(os.environ, QLAB_NATIVE="0", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_build_failure_is_reported_not_hidden(tmp_path):
    code = (
        "import warnings, qlab.numerics.native as n\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always'); s = n.status()\n"
        "print(s['enabled'], any('unavailable' in str(x.message) for x in w))\n"
        "try:\n    n.build()\nexcept RuntimeError as e:\n    print('error', 'no-such-compiler' in str(e))\n"
    )
    env = dict(os.environ, CXX="no-such-compiler", QLAB_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "error", "True"]


_SPECS_FOR_EXPORT = ["int8/ch", "int4/g16", "int8/tensor/s=bf16"]


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_export_for_an_accelerator_has_no_cpu_custom_call(platform):
    from jax import export

    x = jnp.ones((8, 32), jnp.float32)
    for s in _SPECS_FOR_EXPORT:
        for f in (lambda v: qlab.fake_quant(v, s), lambda v: qlab.quantize(v, s).codes):
            text = export.export(jax.jit(f), platforms=[platform])(x).mlir_module()
            assert "stablehlo.custom_call" not in text, (platform, s)
    # the same functions lowered for CPU do call the kernel: the test above is not vacuous
    assert "qlab_fake_quant_int" in jax.jit(lambda v: qlab.fake_quant(v, "int8/ch")).lower(x).as_text()


def test_no_compiler_runs_unless_lowering_for_cpu(tmp_path):
    # CXX is a stand-in that records each run and fails: tracing and exporting for cuda/tpu must not
    # run it; the first lowering for CPU does, then falls back to the XLA path with a warning
    marker = tmp_path / "compiler-ran"
    cxx = tmp_path / "fake-cxx"
    cxx.write_text(f"#!/bin/sh\necho run >> {marker}\nexit 1\n")
    cxx.chmod(0o755)
    code = (
        "import warnings, jax, jax.numpy as jnp, numpy as np, qlab, os\n"
        "from jax import export\n"
        "from qlab.numerics.quantize import fake_quant_xla\n"
        "x = jnp.linspace(-1, 1, 256).reshape(8, 32)\n"
        "f = jax.jit(lambda v: qlab.fake_quant(v, 'int8/ch'))\n"
        "jax.make_jaxpr(f)(x)\n"
        "for p in ('cuda', 'tpu'): export.export(f, platforms=[p])(x)\n"
        f"print('before-cpu', os.path.exists({str(marker)!r}))\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always'); y = f(x)\n"
        f"print('after-cpu', os.path.exists({str(marker)!r}), any('unavailable' in str(m.message) for m in w))\n"
        "print('same', bool(np.array_equal(np.asarray(y), np.asarray(fake_quant_xla(x, 'int8/ch')))))\n"
    )
    env = dict(os.environ, CXX=str(cxx), QLAB_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["before-cpu", "False", "after-cpu", "True", "True", "same", "True"]


def test_dispatch_maps_and_differentiates_like_its_reference():
    def ref(v, w):
        return (v * w, jnp.sum(v))

    def ker(v, w):
        return (w * v, jnp.sum(v[::-1]) * 0.0 + jnp.sum(v))

    v, w = jnp.arange(6.0).reshape(2, 3), jnp.float32(3.0)
    mapped = jax.vmap(lambda a: native.dispatch(ref, ker, a, w))(v)  # w unmapped
    assert np.array_equal(mapped[0], v * 3.0) and np.array_equal(mapped[1], v.sum(1))
    t = jnp.ones_like(v)
    _, tangents = jax.jvp(lambda a: native.dispatch(ref, ker, a, w), (v,), (t,))
    assert np.array_equal(tangents[0], t * 3.0) and float(tangents[1]) == 6.0
    # quantize's float output (the scale) differentiates through the XLA path on CPU too
    x = jax.random.normal(jax.random.key(1), (8, 16))
    g = jax.grad(lambda a: qlab.quantize(a, "int8/ch").scale.sum())(x)
    g_ref = jax.grad(lambda a: quantize_xla(a, "int8/ch").scale.sum())(x)
    assert _same_bits(g, g_ref)
