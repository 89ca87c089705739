"""Accelerator readiness without an accelerator: the jitted pieces qlab users run on GPUs and TPUs lower for
``cuda`` and ``tpu`` with ``jax.export`` on this CPU-only machine, with no host callback and no CPU-only custom
call (qlab's CPU kernel, LAPACK) in the program."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax import export

import qlab
from qlab import nn as qnn
from qlab.models import MLP
from qlab.ptq.gptq import gptq

PLATFORMS = ("cuda", "tpu")
CPU_ONLY = ("qlab_", "callback", "lapack", "cpu")


def _exported_text(f, *args, platform):
    return export.export(jax.jit(f), platforms=[platform])(*args).mlir_module()


def _assert_portable(text):
    calls = [line for line in text.splitlines() if "custom_call" in line]
    for word in CPU_ONLY:
        bad = [c.strip()[:160] for c in calls if word in c.lower()]
        assert not bad, f"CPU-only call in the exported program: {bad}"


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("spec", ["int4/g32", "int8/ch", "int3/g32/asym/mse", "fp8_e4m3/ch", "nf4/g64", "mxfp4",
                                  "nvfp4", "int8/b8x8"])
def test_fake_quant_exports(spec, platform):
    x = jax.ShapeDtypeStruct((64, 128), jnp.float32)
    _assert_portable(_exported_text(lambda v: qlab.fake_quant(v, spec), x, platform=platform))
    _assert_portable(_exported_text(jax.grad(lambda v: qlab.fake_quant(v, spec).sum()), x, platform=platform))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_integer_matmul_exports(platform):
    x, w = jax.ShapeDtypeStruct((16, 64), jnp.float32), jax.ShapeDtypeStruct((64, 32), jnp.float32)
    text = _exported_text(lambda a, b: qlab.quantized_matmul(a, b, "int8", "int8/ch1"), x, w, platform=platform)
    _assert_portable(text)
    assert "i8" in text  # the product really runs on 8-bit codes


@pytest.mark.parametrize("platform", PLATFORMS)
def test_qat_train_step_exports(platform):
    model = MLP(64, hidden=(32,), out=10, rngs=nnx.Rngs(0))
    qmodel = qnn.quantize_model(model, [qnn.Rule(".*", weight="int4/g16", act="int8")])
    graphdef, params, rest = nnx.split(qmodel, nnx.Param, ...)
    tx = optax.adam(1e-3)

    def step(params, opt_state, x, y):
        def loss(p):
            logits = nnx.merge(graphdef, p, rest)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        value, grads = jax.value_and_grad(loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    args = (params, tx.init(params), jnp.zeros((8, 64)), jnp.zeros((8,), jnp.int32))
    _assert_portable(_exported_text(step, *args, platform=platform))


@pytest.mark.parametrize("platform", PLATFORMS)
def test_gptq_exports(platform):
    W, H = jax.ShapeDtypeStruct((64, 32), jnp.float32), jax.ShapeDtypeStruct((64, 64), jnp.float32)
    _assert_portable(_exported_text(lambda w, h: qlab.dequantize(gptq(w, h, "int4/g32")), W, H, platform=platform))


def test_the_check_catches_a_cpu_only_call():
    """The same check flags what it should: qlab's CPU kernel in a program lowered for the CPU."""
    from qlab.numerics import native

    if not native.enabled():
        pytest.skip("the CPU kernel is not built here: nothing CPU-only to catch")
    text = jax.jit(lambda v: qlab.fake_quant(v, "int8/ch")).lower(np.zeros((64, 128), np.float32)).as_text()
    with pytest.raises(AssertionError, match="CPU-only call"):
        _assert_portable(text)
