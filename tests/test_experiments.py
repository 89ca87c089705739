"""Studies: grid expansion and validation, resume after SIGKILL, determinism, results files."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from qlab.experiments import ConfigError, expand, image, load_study, sweep
from qlab.experiments.results import read_runs, write_run
from qlab.experiments.runner import parse_only, plan

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = {"hidden": [16], "train_size": 256, "steps": 15, "qat_steps": 5, "batch_size": 32}


# --------------------------------------------------------------------------- expansion


def test_grid_is_cartesian_and_float_runs_deduplicated():
    runs = expand({"sweep": {"method": ["float", "ptq_rtn", "qat"], "bits": [8, 4], "granularity": ["ch", "g16"]}})
    assert [r["method"] for r in runs].count("float") == 1
    assert len(runs) == 1 + 2 * 2 * 2
    q = [r for r in runs if r["method"] == "ptq_rtn"]
    assert [r["weight"] for r in q] == ["int8/ch", "int8/g16", "int4/ch", "int4/g16"]
    assert all(r["qat_steps"] is None for r in q)  # PTQ drops QAT-only keys
    assert len({r["config_hash"] for r in runs}) == len(runs)


def test_several_grids_includes_and_weight_override():
    runs = expand({
        "base": {"seed": 3},
        "sweep": [{"bits": [8, 4]}, {"format": ["nf4", "fp8_e4m3"], "granularity": ["g16"]}],
        "include": [{"weight": "int4/g32/asym/mse", "method": "qat"}, {"bits": 8}],  # last one duplicates
    })
    assert [r["weight"] for r in runs] == ["int8/ch", "int4/ch", "nf4/g16", "fp8_e4m3/g16", "int4/g32/asym/mse"]
    assert all(r["seed"] == 3 for r in runs)


def test_hash_is_stable_and_sensitive():
    a = expand({"sweep": {"bits": [4]}})[0]
    b = expand({"sweep": {"bits": [4]}})[0]
    c = expand({"sweep": {"bits": [4]}, "base": {"seed": 1}})[0]
    assert a["config_hash"] == b["config_hash"] != c["config_hash"]


def test_named_rule_sets():
    st = load_study({"name": "r", "rule_sets": {"head8": [{"pattern": "head", "weight": "int8/ch"},
                                                          {"pattern": ".*", "weight": "$weight"}]},
                     "sweep": {"rules": ["all", "first_last_8bit", "head8"], "bits": [2]}})
    assert [r["rules"] for r in st.runs] == ["all", "first_last_8bit", "head8"]
    assert "rules_def" in st.runs[2]  # user rule sets are part of the run's identity


@pytest.mark.parametrize("cfg, words", [
    ({"sweep": {"bitz": [4]}}, ["unknown key 'bitz'", "allowed", "bits"]),
    ({"base": {"method": "gptq9"}}, ["method", "'gptq9'", "allowed", "ptq_rtn", "qat"]),
    ({"sweep": {"granularity": ["g16x"]}}, ["granularity", "'g16x'"]),
    ({"base": {"weight": "int4/g16/zz"}}, ["weight", "'int4/g16/zz'", "unknown token"]),
    ({"base": {"format": "int99x"}}, ["format", "int99x"]),
    ({"base": {"range": "best"}}, ["range", "'best'"]),
    ({"base": {"bits": 1}}, ["bits", "between 2 and 16"]),
    ({"base": {"steps": "ten"}}, ["steps", "positive integer"]),
    ({"base": {"model": "resnet"}}, ["model", "allowed", "mlp"]),
    ({"base": {"data": "imagenet"}}, ["data", "allowed", "digits"]),
    ({"base": {"rules": "mine"}}, ["rules", "'mine'", "allowed", "first_last_8bit"]),
    ({"sweep": {"bits": 4}}, ["bits", "non-empty list"]),
    ({"sweeps": {"bits": [4]}}, ["top-level", "'sweeps'", "allowed"]),
    ({"rule_sets": {"x": [{"pattern": "(", "weight": "int8"}]}}, ["rule_sets.x", "regex"]),
    ({"rule_sets": {"x": [{"pattern": ".*", "weight": "int8/bad"}]}, "base": {"rules": "x"}}, ["rule set", "'x'"]),
])
def test_validation_errors_name_key_and_allowed(cfg, words):
    with pytest.raises(ConfigError) as e:
        load_study({"name": "bad", **cfg})
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_missing_data_is_reported_before_running(monkeypatch, tmp_path):
    monkeypatch.setenv("QLAB_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match=r"data = 'fashion_mnist' is not available.*apt|install"):
        load_study({"name": "f", "base": {"data": "fashion_mnist"}})


def test_method_check_runs_before_anything(tmp_path):
    with pytest.raises(ConfigError, match="qat_lsq.*integer"):
        plan({"name": "l", "base": {"method": "qat_lsq", "format": "nf4"}}, out=tmp_path)
    assert not (tmp_path / "runs").exists()


def test_group_size_must_fit_every_matched_layer(tmp_path):
    with pytest.raises(ConfigError, match=r"run 2 .*'int8/g32' does not fit layer 'layers/0' \(kernel 784x128\)"):
        plan({"name": "g", "base": {"data": "fashion_mnist", "hidden": [128]}, "sweep": {"granularity": ["ch", "g32"]}},
             out=tmp_path)
    # a rule set that keeps the offending layer at another spec is fine
    plan({"name": "g", "base": {"hidden": [24], "rules": "first_last_8bit"}, "sweep": {"granularity": ["g8"]}}, out=tmp_path)


def test_only_filter():
    assert parse_only("method=qat,bits=4|8") == [("method", ["qat"]), ("bits", ["4", "8"])]
    with pytest.raises(ConfigError, match="unknown key 'bitz'"):
        parse_only("bitz=4")


def test_read_runs_ignores_temp_files(tmp_path):
    write_run(tmp_path, {"config_hash": "a1", "accuracy": 0.5})
    (tmp_path / "runs" / ".b2.json.xyz.tmp").write_text('{"row": {"config_ha')
    assert [r["row"]["config_hash"] for r in read_runs(tmp_path)] == ["a1"]
    assert not list((tmp_path / "runs").glob("*.tmp"))


# --------------------------------------------------------------------------- running


def _study(name, **sweep_axes):
    return {"name": name, "base": dict(TINY), "sweep": sweep_axes or {"method": ["float", "ptq_rtn", "qat"], "bits": [8, 2]}}


def test_sweep_writes_tables_and_is_idempotent(tmp_path):
    study = _study("t1")
    table = sweep(study, out=tmp_path, progress=False)
    assert len(table) == 5 and table["config_hash"].is_unique
    for col in ["method", "bits", "granularity", "weight", "seed", "accuracy", "bits_per_weight", "model_mib",
                "model_bytes", "params", "wall_s", "qlab_version", "jax_version", "config_hash"]:
        assert col in table, col
    on_disk = pd.read_csv(tmp_path / "runs.csv")
    assert len(on_disk) == 5
    layers = pd.read_csv(tmp_path / "layers.csv")
    assert set(layers["layer"]) == {"layers/0", "head"}
    from qlab import plot

    paths = plot.save_study_figures(tmp_path, table, layers, "t1")
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and len(paths) == 3
    q = table[table["method"] == "ptq_rtn"].set_index("weight")
    assert q.loc["int2/ch", "model_bytes"] < q.loc["int8/ch", "model_bytes"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")}
    _, _, todo = plan(study, out=tmp_path)
    assert todo == []  # rerunning a finished study does nothing
    csv_mtime = (tmp_path / "runs.csv").stat().st_mtime_ns
    again = sweep(study, out=tmp_path, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "runs").glob("*.json")} == mtimes
    assert (tmp_path / "runs.csv").stat().st_mtime_ns == csv_mtime
    assert len(again) == 5
    # --only + --force redoes exactly the matching runs
    _, _, todo = plan(study, out=tmp_path, force=True, only="method=ptq_rtn,bits=2")
    assert [(r["method"], r["bits"]) for r in todo] == [("ptq_rtn", 2)]


def test_same_study_and_seed_give_same_metrics(tmp_path):
    study = _study("det", method=["ptq_rtn", "qat"], bits=[4])  # noqa
    a = sweep(study, out=tmp_path / "a", progress=False)
    image.clear_caches()
    b = sweep(study, out=tmp_path / "b", progress=False)
    cols = ["config_hash", "accuracy", "float_accuracy", "model_bytes", "bits_per_weight", "qat_final_loss"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_resume_after_sigkill(tmp_path):
    """Kill the sweep (SIGKILL) while it runs, several times, then resume: every run exactly once."""
    toml = tmp_path / "kill.toml"
    toml.write_text(
        'name = "kill"\n[base]\nhidden = [16]\ntrain_size = 256\nsteps = 15\nbatch_size = 32\n'
        '[sweep]\nmethod = ["ptq_rtn"]\nbits = [8, 6, 4, 3, 2]\ngranularity = ["ch", "g16"]\n'
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "qlab.cli", "sweep", str(toml), "--out", str(out), "--no-progress", "--no-plots"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    n_total = 10
    seen_counts = []
    for kill_after in (2,):  # kill once the k-th result exists (mid-run of the next)
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and p.poll() is None:
            n = len(list((out / "runs").glob("*.json"))) if (out / "runs").is_dir() else 0
            if n >= kill_after:
                time.sleep(0.3)
                break
            time.sleep(0.05)
        p.send_signal(signal.SIGKILL)
        p.wait()
        files = sorted((out / "runs").glob("*.json"))
        for f in files:
            json.loads(f.read_text())  # every file complete
        seen_counts.append(len(files))
        assert len(files) < n_total, "the sweep finished before it could be killed"
    done_before = {f.name: f.read_text() for f in (out / "runs").glob("*.json")}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    table = pd.read_csv(out / "runs.csv")
    assert len(table) == n_total and table["config_hash"].is_unique
    assert sorted(zip(table["bits"], table["granularity"])) == sorted((b, g) for b in (8, 6, 4, 3, 2) for g in ("ch", "g16"))
    for name, text in done_before.items():  # finished runs were not redone
        assert (out / "runs" / name).read_text() == text
    assert table["accuracy"].notna().all()
    assert not list((out / "runs").glob("*.tmp"))


# --------------------------------------------------------------------------- batched variants


def test_batched_sweep_matches_sequential(tmp_path):
    study = {"name": "b", "base": {**TINY, "qat_steps": 10},
             "sweep": {"method": ["float", "qat"], "seed": [0, 1, 2], "learning_rate": [3e-3]}}
    image.clear_caches()
    seq = sweep(study, out=tmp_path / "s", progress=False)
    image.clear_caches()
    bat = sweep(study, out=tmp_path / "b", progress=False, batch=True)
    assert list(bat["config_hash"]) == list(seq["config_hash"])
    assert (bat["batched"].dropna() == 3).all() and bat["batched"].notna().sum() == 6
    # float training sees the same batches and updates: same models up to float rounding
    f = bat["method"] == "float"
    assert (abs(bat.loc[f, "accuracy"].to_numpy() - seq.loc[f, "accuracy"].to_numpy()) <= 0.02).all()
    assert (abs(bat["accuracy"] - seq["accuracy"]) <= 0.05).all()


_SHARD_SCRIPT = r"""
import jax, numpy as np
from flax import nnx
from qlab.data import digits_dataset
from qlab.train import train_variants, variant_sharding
from qlab.models import MLP
assert jax.device_count() == 4, jax.devices()
assert variant_sharding(8).mesh.devices.size == 4 and variant_sharding(6).mesh.devices.size == 3
ds = digits_dataset()
ms = [MLP(64, hidden=(16,), rngs=nnx.Rngs(s)) for s in range(4)]
losses = train_variants(ms, ds, steps=30, batch_size=32, learning_rates=[3e-3] * 4, seeds=[0, 1, 2, 3])
np.save("losses.npy", losses)
print("OK", losses.shape)
"""


def test_batched_variants_shard_over_devices(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "PYTHONPATH": str(ROOT),
           "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", _SHARD_SCRIPT], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "OK (4, 30)" in r.stdout, r.stderr[-3000:]
    sharded = __import__("numpy").load(tmp_path / "losses.npy")
    # the same 4 variants on one device give the same losses
    from flax import nnx

    from qlab.data import digits_dataset
    from qlab.models import MLP
    from qlab.train import train_variants

    ms = [MLP(64, hidden=(16,), rngs=nnx.Rngs(s)) for s in range(4)]
    single = train_variants(ms, digits_dataset(), steps=30, batch_size=32, learning_rates=[3e-3] * 4,
                                    seeds=[0, 1, 2, 3])
    assert abs(single - sharded).max() < 1e-4


def test_ptq_algorithm_methods(tmp_path):
    with pytest.raises(ConfigError, match="ptq_hqq.*asymmetric"):
        plan({"name": "h", "base": {"method": "ptq_hqq"}}, out=tmp_path)
    ptq_only = {k: v for k, v in TINY.items() if k != "qat_steps"}  # a key no run reads is an error
    study = {"name": "p", "base": {**ptq_only, "bits": 3, "calibration_size": 128},
             "include": [{"method": "ptq_rtn"}, {"method": "ptq_gptq"}, {"method": "ptq_hqq", "symmetric": False}]}
    t = sweep(study, out=tmp_path, progress=False)
    assert list(t["method"]) == ["ptq_rtn", "ptq_gptq", "ptq_hqq"]
    assert t["accuracy"].between(0, 1).all() and (t["bits_per_weight"] < 4.5).all()
    assert t.loc[t["method"] == "ptq_gptq", "calibration_size"].item() == 128
    assert pd.isna(t.loc[t["method"] == "ptq_rtn", "calibration_size"].item())


# --------------------------------------------------------------------------- one path: typed runs, honest rows


def test_runs_hold_typed_specs_and_rules():
    from qlab.nn import Rule
    from qlab.numerics import QuantSpec

    run = load_study({"name": "t", "base": {"method": "qat_lsq", "bits": 4, "rules": "first_last_8bit"}}).runs[0]
    assert isinstance(run.weight, QuantSpec) and str(run.weight) == "int4/ch"
    assert all(isinstance(r, Rule) for r in run.rules)
    assert [(r.pattern, str(r.weight), r.weight_quantizer) for r in run.rules] == [
        ("@first|@last", "int8/ch", "lsq"), (".*", "int4/ch", "lsq")]
    assert run.method.family == "image" and run.method.name == "qat_lsq"


def test_a_rule_set_that_matches_no_layer_is_an_error():
    with pytest.raises(ConfigError, match=r"rule 'decoder/.\*' matches no layer; layers: layers/0, head"):
        load_study({"name": "r", "base": {"hidden": [16], "rules": "mine"},
                    "rule_sets": {"mine": [{"pattern": "decoder/.*", "weight": "int4/ch"}]}})


def test_a_key_no_run_reads_is_an_error():
    with pytest.raises(ConfigError, match=r"none of its runs reads: calibration_size \(read by: ptq_awq, ptq_gptq"):
        load_study({"name": "k", "sweep": {"method": ["ptq_rtn", "qat"], "calibration_size": [64, 128]}})
    with pytest.raises(ConfigError, match=r"method 'float' does not read bits"):
        load_study({"name": "k", "include": [{"method": "float", "bits": 4}]})


def test_mixed_runs_are_labelled_by_their_rule_set_and_layers_by_their_own_spec(tmp_path):
    from qlab import plot

    ptq_only = {k: v for k, v in TINY.items() if k != "qat_steps"}
    study = {"name": "mix", "base": {**ptq_only, "hidden": [16, 16]},
             "sweep": {"method": ["ptq_rtn"], "rules": ["all", "first_last_8bit"], "bits": [3]}}
    table = sweep(study, out=tmp_path, progress=False)
    uni, mixed = table.iloc[0], table.iloc[1]
    assert (uni["weight"], uni["bits"], uni["format"], uni["granularity"]) == ("int3/ch", 3, "int", "ch")
    assert mixed["weight"] == "first_last_8bit(int3/ch)" and pd.isna(mixed["bits"]) and pd.isna(mixed["format"])
    layers = pd.read_csv(tmp_path / "layers.csv")
    mine = layers[layers["config_hash"] == mixed["config_hash"]].set_index("layer")["weight_spec"].to_dict()
    assert mine == {"layers/0": "int8/ch1", "layers/1": "int3/ch1", "head": "int8/ch1"}
    assert 3 < mixed["bits_per_weight"] < 8.5
    fig = plot.study_figures(table, layers)["layers"]
    labels = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert labels == {"int8/ch1", "int3/ch1"}  # one bar per layer spec, never an average of 3 and 8 bits


def test_format_columns_describe_the_spec_that_ran():
    runs = expand({"include": [{"weight": "nf4/g16"}, {"format": "fp4_e2m1", "granularity": "g16"}]})
    cols = [r.columns() for r in runs]
    assert [(c["format"], c["bits"], c["granularity"]) for c in cols] == [("nf4", 4, "g16"), ("fp4_e2m1", 4, "g16")]
    from qlab.plot import series_labels

    assert series_labels(pd.DataFrame([{"method": "ptq_rtn", **c} for c in cols])) == [
        "ptq_rtn nf4/g16", "ptq_rtn fp4_e2m1/g16"]  # two formats, two series


def test_committed_results_keep_their_hashes():
    """Every committed study that a TOML defines expands to the same config hashes as its runs.csv."""
    for toml, folder in [("quickstart", "quickstart"), ("gemma3_ptq", "gemma3_ptq"), ("mixed", "mixed")]:
        st = load_study(ROOT / "experiments" / f"{toml}.toml", check=False)
        assert [r.config_hash for r in st.runs] == list(pd.read_csv(ROOT / "results" / folder / "runs.csv")["config_hash"])


def test_a_folder_of_another_study_is_an_error_before_any_run(tmp_path):
    base = {"steps": 5, "hidden": [8], "train_size": 128}
    sweep({"name": "first", "base": base, "sweep": {"bits": [8]}}, out=tmp_path, progress=False)
    before = sorted(p.name for p in (tmp_path / "runs").iterdir()), (tmp_path / "study.json").read_text()
    with pytest.raises(ConfigError, match=rf"results folder {tmp_path} holds study 'first', not 'second'"):
        sweep({"name": "second", "base": base, "sweep": {"bits": [4]}}, out=tmp_path, progress=False)
    assert (sorted(p.name for p in (tmp_path / "runs").iterdir()), (tmp_path / "study.json").read_text()) == before
    (tmp_path / "study.json").unlink()  # the rows alone still say whose folder it is
    with pytest.raises(ConfigError, match="holds study 'first'"):
        sweep({"name": "second", "base": base, "sweep": {"bits": [4]}}, out=tmp_path, progress=False)


# --------------------------------------------------------------------------- ablation keys and seed statistics


def test_qat_ablation_keys_reach_the_rules_and_keep_old_hashes():
    plain, off, sgd = expand({"base": {**TINY, "method": "qat_lsq", "bits": 2, "act": "uint2"},
                              "sweep": [{"lsq_grad_scale": [True, False]}, {"qat_optimizer": ["sgd"]}]})
    assert "lsq_grad_scale" not in plain.config and "qat_optimizer" not in plain.config  # at the default: not hashed
    assert [r.lsq_grad_scale for r in plain.rules] == [True] and [r.lsq_grad_scale for r in off.rules] == [False]
    assert off["lsq_grad_scale"] is False and sgd["qat_optimizer"] == "sgd"
    assert len({plain.config_hash, off.config_hash, sgd.config_hash}) == 3
    pact = expand({"base": {**TINY, "method": "qat_pact", "bits": 3, "act": "uint3"}})[0]
    assert [(r.weight_quantizer, r.act_quantizer) for r in pact.rules] == [("ste", "pact")]


@pytest.mark.parametrize("run, words", [
    ({"method": "qat", "lsq_grad_scale": False}, r"method 'qat' does not read lsq_grad_scale; it reads: .*qat_optimizer"),
    ({"method": "ptq_rtn", "qat_optimizer": "sgd"}, r"method 'ptq_rtn' does not read qat_optimizer"),
    ({"method": "qat", "qat_optimizer": "rmsprop"}, r"qat_optimizer = 'rmsprop' is unknown; allowed: adam, sgd"),
    ({"method": "qat_pact"}, r"method 'qat_pact' learns the activations' clip \(PACT\): set act"),
    ({"method": "qat_pact", "act": "fp8_e4m3"}, r"'fp8_e4m3' is not a symmetric integer format"),
])
def test_qat_ablation_keys_are_errors_where_unread(run, words):
    with pytest.raises(ConfigError, match=words):
        load_study({"name": "k", "base": TINY, "include": [run]}, check=False)


def test_qat_optimizer_and_grad_scale_change_training():
    base = {**TINY, "method": "qat_lsq", "bits": 2, "qat_learning_rate": 0.05}
    runs = expand({"base": base, "sweep": [{"lsq_grad_scale": [True, False], "qat_optimizer": ["sgd"]}]})
    losses = [r.method.run(r)[0]["qat_final_loss"] for r in runs]
    assert losses[0] != losses[1]


def test_seed_stats_fold_seeds_into_mean_and_std():
    from qlab.experiments.results import seed_stats

    t = pd.DataFrame({"method": ["float", "qat", "qat", "qat", "qat", "qat", "qat"],
                      "bits": [None, 2, 2, 2, 4, 4, 4], "seed": [0, 0, 1, 2, 0, 1, 2],
                      "config_hash": list("abcdefg"), "accuracy": [0.9, 0.7, 0.8, 0.9, 0.85, 0.85, 0.88]})
    s = seed_stats(t, scale=100)
    assert list(s.columns) == ["method", "bits", "n", "mean", "std", "mean ± std"]  # hash and seed are not keys
    assert s["n"].tolist() == [1, 3, 3]
    assert s["mean"].round(6).tolist() == [90.0, 80.0, 86.0]
    assert s["std"].round(6).tolist()[1:] == [10.0, round(float(pd.Series([85, 85, 88.0]).std()), 6)]
    assert s["mean ± std"].tolist() == ["90.0", "80.0 ± 10.0", "86.0 ± 1.7"]
    assert seed_stats(t, by="method")["n"].tolist() == [1, 6]
