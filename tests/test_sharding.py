"""Sharded training on a device mesh (jax.sharding + jit): the same step as one device for quantized models,
FSDP layouts that keep quantization groups whole, gradient accumulation, bf16 parameters with an f32 master,
per-block rematerialisation, PTQ statistics over a sharded batch, and two processes with CPU collectives.

Several devices need XLA_FLAGS before jax is imported, so those checks run in subprocesses."""

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from qlab.distributed import check_batch, initialize_from_env, make_mesh
from qlab.models import MLP, Transformer, TransformerConfig
from qlab.nn import Rule, quantize_model
from qlab.train import f32_master, lm_loss, train

ROOT = pathlib.Path(__file__).resolve().parents[1]

#: float tolerance for sharded vs one device: sums (matmuls over a split axis, the batch mean of the loss and
#: gradients) are reduced in another order; maxima (absmax scales) and integer matmuls are exact.
LOSS_ATOL, PARAM_ATOL = 2e-6, 2e-5

_COMMON = r"""
import json, sys
import jax, numpy as np
from flax import nnx
from qlab.distributed import make_mesh
from qlab.models import MLP
from qlab.nn import Rule, quantize_model
from qlab.train import train
import optax
# SGD: Adam's first steps are lr * sign(g), which turns float noise in a near-zero gradient (an LSQ step's)
# into a full lr-sized difference; SGD keeps a reduction-order difference as small as it is
SGD = optax.sgd(0.05)
RULES = {"w8a8_int_matmul": [Rule(".*", weight="int8/ch", act="int8", int_matmul=True)],
         "w4_g128": [Rule(".*", weight="int4/g128")],
         "lsq": [Rule(".*", weight="int4/ch", weight_quantizer="lsq")]}
rng = np.random.default_rng(0)
X = rng.normal(size=(512, 256)).astype(np.float32)
Y = np.argmax(X @ rng.normal(size=(256, 16)), axis=1).astype(np.int32)  # learnable labels
def model(rules):
    return quantize_model(MLP(256, hidden=(256,), out=16, rngs=nnx.Rngs(0)), RULES[rules])
def flat(m):
    return {"/".join(map(str, p)): np.asarray(v[...]).tolist() for p, v in nnx.to_flat_state(nnx.state(m, nnx.Param))}
"""

_FOUR_DEVICES = _COMMON + r"""
assert jax.device_count() == 4, jax.devices()
out = {}
for name in RULES:
    out[f"{name}/init"] = {"params": flat(model(name))}
    for tag, mesh in [("one", None), ("data4", make_mesh()), ("data2_fsdp2", make_mesh(data=2, fsdp=2))]:
        m = model(name)
        h = train(m, (X, Y), steps=5, batch_size=64, progress=False, mesh=mesh, optimizer=SGD)
        m1 = model(name)
        train(m1, (X, Y), steps=1, batch_size=64, progress=False, mesh=mesh, optimizer=SGD)
        out[f"{name}/{tag}"] = {"loss": h.loss, "params": flat(m), "step1": flat(m1)}
        if tag == "data2_fsdp2":
            out[f"{name}/{tag}"]["spec"] = str(m.layers[0].layer.kernel[...].sharding.spec)
errors = {}
for tag, kw in [("group", dict(mesh=make_mesh(fsdp=4))), ("batch", dict(mesh=make_mesh(), batch_size=66)),
                ("micro", dict(mesh=make_mesh(), accumulate=32))]:
    try:
        m = model("w4_g128")
        train(m, (X, Y), steps=2, progress=False, **{"batch_size": 64, **kw})
        errors[tag] = None
    except ValueError as e:
        errors[tag] = str(e)
    errors[tag + "_untouched"] = flat(m) == flat(model("w4_g128"))
out["errors"] = errors
# PTQ: GPTQ Hessian (and absmax) captured over a batch split across the 4 devices
from qlab.distributed import shard_batch
from qlab.nn import capture
qm = model("w4_g128")
host = capture(qm, [(X[:256], Y[:256])], stats=("hessian", "absmax"))
dev = capture(qm, [shard_batch((X[:256], Y[:256]), make_mesh())], stats=("hessian", "absmax"))
out["capture"] = {p: {k: float(np.max(np.abs(np.asarray(host[p][k]) - np.asarray(dev[p][k])))) for k in ("hessian", "absmax")}
                  | {"scale": float(np.max(np.abs(host[p]["hessian"]))), "count": [int(host[p]["count"]), int(dev[p]["count"])]}
                  for p in host}
# a sweep's training methods over a mesh given outside the study
import tempfile
from qlab.experiments import ConfigError, sweep
study = {"name": "meshed", "base": {"hidden": [32], "train_size": 256, "steps": 20, "batch_size": 32,
                                    "qat_steps": 10}, "sweep": {"method": ["float", "qat"], "bits": [4]}}
tables = {tag: sweep(study, out=tempfile.mkdtemp(), progress=False, mesh=mesh).to_dict("list")
          for tag, mesh in [("one", None), ("mesh", "data=2,fsdp=2")]}
out["sweep"] = {tag: {k: t[k] for k in ("method", "accuracy", "config_hash")} for tag, t in tables.items()}
try:
    sweep({**study, "base": {**study["base"], "batch_size": 30}}, out=tempfile.mkdtemp(), progress=False, mesh="data=4")
except ConfigError as e:
    out["sweep_error"] = str(e)
json.dump(out, open(sys.argv[1], "w"))
print("OK")
"""


def _run(script, path, env_extra, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **env_extra}
    return subprocess.run([sys.executable, "-c", script, str(path)], cwd=path.parent, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    path = tmp_path_factory.mktemp("four") / "out.json"
    r = _run(_FOUR_DEVICES, path, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-4000:]
    return json.loads(path.read_text())


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k])))) for k in a)


@pytest.mark.parametrize("rules", ["w8a8_int_matmul", "w4_g128", "lsq"])
@pytest.mark.parametrize("mesh", ["data4", "data2_fsdp2"])
def test_sharded_step_equals_one_device(four, rules, mesh):
    """One step: the same loss and updated parameters. Five steps: the same losses; for LSQ within 1e-3, as
    its learned step (a sum over the group) differs in the last bits and a weight at a rounding boundary may
    then round the other way (a whole code step). The same holds for a float-matmul (fake-quant) layer whose
    input is quantized: a last-bit difference in the previous layer's output (per-device matmuls of other
    shapes) can flip an activation code; the integer-matmul path above stays within LOSS_ATOL here."""
    one, sh = four[f"{rules}/one"], four[f"{rules}/{mesh}"]
    assert sorted(sh["step1"]) == sorted(one["step1"])
    assert _max_diff(sh["step1"], one["step1"]) < PARAM_ATOL
    assert _max_diff(sh["step1"], four[f"{rules}/init"]["params"]) > 100 * PARAM_ATOL  # the step moved them
    assert len(sh["loss"]) == 5 and sh["loss"][-1] < sh["loss"][0]
    np.testing.assert_allclose(sh["loss"], one["loss"], rtol=0, atol=1e-3 if rules == "lsq" else LOSS_ATOL)
    if rules != "lsq":
        assert _max_diff(sh["params"], one["params"]) < PARAM_ATOL


def test_fsdp_splits_parameters_and_keeps_groups_whole(four):
    assert four["w4_g128/data2_fsdp2"]["spec"] == "P('fsdp', None)"
    err = four["errors"]
    assert "splits its quantization groups of 128" in err["group"] and "fsdp=4" in err["group"]
    assert "64 rows per device" in err["group"]
    assert "does not divide over the mesh {'data': 4, 'fsdp': 1}" in err["batch"] and "multiple of 4" in err["batch"]
    assert "x 32 micro-batches" in err["micro"] and "multiple of 128" in err["micro"]
    assert err["group_untouched"] and err["batch_untouched"] and err["micro_untouched"]  # before any step


def test_ptq_statistics_accumulate_over_a_sharded_batch(four):
    for path, d in four["capture"].items():
        assert d["count"] == [256, 256], path
        assert d["absmax"] == 0.0, path  # a maximum is exact in any order
        assert d["hessian"] <= 1e-5 * d["scale"], (path, d)


def test_a_sweep_trains_its_runs_over_a_mesh_given_outside_the_study(four):
    one, sh = four["sweep"]["one"], four["sweep"]["mesh"]
    assert one["config_hash"] == sh["config_hash"] and one["method"] == ["float", "qat"]
    np.testing.assert_allclose(sh["accuracy"], one["accuracy"], atol=1 / 256 + 1e-9)  # at most one sample flips
    assert "batch_size [30] does not divide over the mesh {'data': 4, 'fsdp': 1}" in four["sweep_error"]


_TWO_PROCESSES = _COMMON + r"""
from qlab.distributed import initialize_from_env
import os
if os.environ.get("JAX_NUM_PROCESSES"):
    assert initialize_from_env() is not None
assert jax.device_count() == 4
m = model("w8a8_int_matmul")
h = train(m, (X, Y), steps=6, batch_size=64, progress=False, mesh=make_mesh(data=2, fsdp=2))
if jax.process_index() == 0:
    json.dump({"loss": h.loss, "processes": jax.process_count(), "local": jax.local_device_count()},
              open(sys.argv[1], "w"))
print("OK")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_with_two_devices_each_match_one_process_with_four(tmp_path):
    one = _run(_TWO_PROCESSES, tmp_path / "one.json", {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"})
    assert one.returncode == 0, one.stderr[-3000:]
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
           "JAX_COORDINATOR_ADDRESS": f"localhost:{_free_port()}", "JAX_NUM_PROCESSES": "2"}
    procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESSES, str(tmp_path / "two.json")], cwd=tmp_path,
                              env={**os.environ, **env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e[-3000:] for _, e in outs]
    a, b = json.loads((tmp_path / "one.json").read_text()), json.loads((tmp_path / "two.json").read_text())
    assert (a["processes"], b["processes"], b["local"]) == (1, 2, 2)
    np.testing.assert_allclose(b["loss"], a["loss"], rtol=0, atol=LOSS_ATOL)


# --------------------------------------------------------------------------- one device


def _data(n=256, d=256, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)).astype(np.float32), rng.integers(0, 16, n).astype(np.int32)


def _g128():
    return quantize_model(MLP(256, hidden=(256,), out=16, rngs=nnx.Rngs(0)), [Rule(".*", weight="int4/g128")])


def _leaves(m):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(m, nnx.Param))]


def test_accumulating_micro_batches_equals_one_big_batch():
    x, y = _data()
    whole, acc = _g128(), _g128()
    ha = train(whole, (x, y), steps=6, batch_size=64, progress=False, optimizer=optax.sgd(0.05))
    hb = train(acc, (x, y), steps=6, batch_size=64, progress=False, optimizer=optax.sgd(0.05), accumulate=4)
    np.testing.assert_allclose(hb.loss, ha.loss, rtol=0, atol=LOSS_ATOL)
    for p, q in zip(_leaves(whole), _leaves(acc)):
        np.testing.assert_allclose(q, p, rtol=0, atol=PARAM_ATOL)
    # independently: the accumulated first step's loss is the mean loss over the whole first batch
    from qlab import data

    xb, yb = next(iter(data.batches((x, y), 64, 0, steps=1)))
    ref = optax.softmax_cross_entropy_with_integer_labels(_g128()(jnp.asarray(xb)), yb).mean()
    assert abs(hb.loss[0] - float(ref)) < LOSS_ATOL
    with pytest.raises(ValueError, match="accumulate=3 does not divide a batch of 64 rows"):
        train(_g128(), (x, y), steps=1, batch_size=64, progress=False, accumulate=3)
    with pytest.raises(ValueError, match="accumulate must be a positive integer"):
        train(_g128(), (x, y), steps=1, batch_size=64, progress=False, accumulate=0)


def test_bf16_parameters_with_an_f32_master_track_f32_training():
    x, y = _data()
    f32m, bf16m = _g128(), _g128()
    ha = train(f32m, (x, y), steps=20, batch_size=64, progress=False, learning_rate=3e-3)
    hb = train(bf16m, (x, y), steps=20, batch_size=64, progress=False, learning_rate=3e-3, param_dtype=jnp.bfloat16)
    assert {a.dtype for a in _leaves(bf16m)} == {jnp.dtype(jnp.bfloat16)}
    assert hb.loss[-1] < hb.loss[0] - 0.5
    np.testing.assert_allclose(hb.loss, ha.loss, rtol=0, atol=0.05)  # bf16 rounding of weights, not of updates
    with pytest.raises(ValueError, match="param_dtype= needs optimizer= an optax transformation"):
        train(bf16m, (x, y), steps=1, progress=False, param_dtype=jnp.bfloat16,
              optimizer=nnx.Optimizer(bf16m, optax.sgd(0.1), wrt=nnx.Param))


def test_f32_master_keeps_updates_smaller_than_bf16_resolution():
    tx = f32_master(optax.sgd(1e-3))
    p = {"w": jnp.ones(3, jnp.bfloat16)}
    st = tx.init(p)
    for _ in range(10):
        u, st = tx.update({"w": jnp.ones(3, jnp.bfloat16)}, st, p)
        p = optax.apply_updates(p, u)
    assert st.master["w"].dtype == jnp.float32 and p["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(st.master["w"], 0.99, rtol=1e-6)
    np.testing.assert_array_equal(p["w"], jnp.asarray(st.master["w"]).astype(jnp.bfloat16))
    # plain bf16 sgd loses them all: 1 - 1e-3 rounds back to 1
    q = {"w": jnp.ones(3, jnp.bfloat16)}
    s2 = optax.sgd(1e-3).init(q)
    for _ in range(10):
        u, s2 = optax.sgd(1e-3).update({"w": jnp.ones(3, jnp.bfloat16)}, s2, q)
        q = optax.apply_updates(q, u)
    assert float(q["w"][0]) == 1.0


def test_remat_per_block_gives_the_same_loss_gradients_and_statistics():
    cfg = TransformerConfig(50, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=16)
    tok = jnp.asarray(np.random.default_rng(0).integers(0, 50, (4, 17)), jnp.int32)
    rules = [Rule(r".*einsum.*", weight=None), Rule(".*", weight="int4/ch", act="int8", act_range="ema")]
    got = []
    for remat in (False, True):
        m = quantize_model(Transformer(dataclasses.replace(cfg, remat=remat), rngs=nnx.Rngs(0)), rules)
        loss, grads = nnx.jit(lambda m, t: nnx.value_and_grad(lm_loss)(m, t))(m, tok)
        got.append((loss, grads, nnx.state(m, nnx.Not(nnx.Param))))
        if remat:  # the jaxpr holds a checkpoint (remat) per block
            jaxpr = str(jax.make_jaxpr(lambda s: nnx.merge(nnx.graphdef(m), s)(tok[:, :-1]))(nnx.state(m)))
            assert jaxpr.count("checkpoint") + jaxpr.count("remat") >= cfg.n_layers
    (l0, g0, s0), (l1, g1, s1) = got
    assert float(l0) == float(l1)
    for a, b in zip(jax.tree.leaves(g0) + jax.tree.leaves(s0), jax.tree.leaves(g1) + jax.tree.leaves(s1)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    assert any(float(jnp.max(jnp.abs(a))) > 0 for a in jax.tree.leaves(s1))  # the EMA ranges did update


def test_mesh_and_environment_errors():
    with pytest.raises(ValueError, match=r"data=2 x fsdp=1 needs 2 devices; there are 1"):
        make_mesh(data=2, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="fsdp must be a positive integer"):
        make_mesh(fsdp=0)
    with pytest.raises(ValueError, match="does not divide over the mesh"):
        check_batch(np.zeros((3, 2)), _fake_mesh(2))
    assert initialize_from_env({}) is None
    assert initialize_from_env({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None  # an array task: a worker
    assert initialize_from_env({"SLURM_NTASKS": "4"}, dry_run=True) == {"cluster_detection_method": "slurm"}
    with pytest.raises(ValueError, match="JAX_COORDINATOR_ADDRESS set but not"):
        initialize_from_env({"JAX_COORDINATOR_ADDRESS": "h:1"}, dry_run=True)
    with pytest.raises(ValueError, match=r"JAX_PROCESS_ID=2 is not in \[0, JAX_NUM_PROCESSES=2\)"):
        initialize_from_env({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"})


def _fake_mesh(n):
    """A mesh object with ``n`` devices for the size checks only (this process has one device)."""
    return type("M", (), {"size": n, "shape": {"data": n, "fsdp": 1}})()


def test_gemma3_remat_per_block_gives_the_same_loss_and_gradients():
    from qlab.models.gemma3.model import Gemma3, Gemma3Config

    tok = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 9)), jnp.int32)
    got = []
    for remat in (False, True):
        m = quantize_model(Gemma3(Gemma3Config.tiny(vocab_size=64, remat=remat), rngs=nnx.Rngs(0)),
                           [Rule(r".*einsum.*|.*embed.*", weight=None), Rule(".*", weight="int4/g16")])
        got.append(nnx.jit(lambda m, t: nnx.value_and_grad(lm_loss)(m, t))(m, tok))
    (l0, g0), (l1, g1) = got
    assert abs(float(l0) - float(l1)) < 1e-6
    for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1)):  # recomputed blocks fuse differently: last bits
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
