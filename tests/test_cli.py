"""The command line: exit codes and messages on bad studies; a tiny sweep end to end."""

import pathlib
import subprocess
import sys

import pytest

from qlab.cli import main

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _toml(tmp_path, text, name="s"):
    p = tmp_path / f"{name}.toml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text, words", [
    ('[sweep]\nbitz = [4]\n', ["invalid study", "unknown key 'bitz'", "allowed:"]),
    ('[base]\nweight = "int4/g16/zz"\n', ["invalid study", "weight = 'int4/g16/zz'", "unknown token 'zz'"]),
    ('[base]\nmethod = "nope"\n', ["method = 'nope'", "allowed: float, ptq_awq, ptq_gptq", "qat_lsq"]),
    ('[base]\ndata = "fashion_mnist"\n', ["data = 'fashion_mnist' is not available", "install"]),
    ('[base\nbits = 4\n', ["not valid TOML"]),
])
def test_bad_study_exit_2_with_message(tmp_path, capsys, monkeypatch, text, words):
    monkeypatch.setenv("QLAB_FASHION_MNIST_DIR", str(tmp_path / "none"))
    assert main(["sweep", _toml(tmp_path, text), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    for w in words:
        assert w in err, (w, err)
    assert not (tmp_path / "o").exists()


def test_missing_file_and_bad_only(tmp_path, capsys):
    assert main(["sweep", str(tmp_path / "nope.toml")]) == 2
    assert "study file not found" in capsys.readouterr().err
    p = _toml(tmp_path, '[sweep]\nbits = [8]\n')
    assert main(["check", p, "--only", "bitz=4"]) == 2
    assert "unknown key 'bitz'" in capsys.readouterr().err


def test_usage_error_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["sweep"])
    assert e.value.code == 2


def test_check_lists_runs(tmp_path, capsys):
    p = _toml(tmp_path, '[sweep]\nmethod = ["float", "ptq_rtn"]\nbits = [8, 4]\n')
    assert main(["check", p, "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "3 runs, 3 to do" in out and "int4/ch" in out


def test_sweep_subprocess_then_rerun_does_nothing(tmp_path):
    p = _toml(tmp_path, 'name = "cli"\n[base]\nhidden = [16]\ntrain_size = 256\nsteps = 10\nbatch_size = 32\n'
                        '[sweep]\nmethod = ["float", "ptq_rtn"]\nbits = [8, 2]\n')
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "qlab.cli", "sweep", p, "--out", str(out), "--no-progress"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "3 runs in the table" in r.stdout
    assert (out / "runs.csv").is_file() and (out / "pareto.png").is_file()
    before = sorted(x.stat().st_mtime_ns for x in (out / "runs").glob("*.json"))
    r = subprocess.run(cmd + ["--only", "bits=2"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert sorted(x.stat().st_mtime_ns for x in (out / "runs").glob("*.json")) == before


TINY_TOML = 'name = "{name}"\n[base]\nhidden = [16]\ntrain_size = 256\nsteps = 10\nbatch_size = 32\n' \
            '[sweep]\nmethod = ["ptq_rtn"]\nbits = [8, 6, 5, 4, 3, 2]\ngranularity = ["ch", "g16"]\n'


def test_version_and_help_on_every_argument(capsys):
    import qlab

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"qlab {qlab.__version__}"
    from qlab.cli import _parser

    for action in _parser()._actions:  # every argument of every command says what it is for
        for sub in getattr(action, "choices", None) and action.choices.values() or []:
            for a in sub._actions:
                assert a.help, (sub.prog, a.dest)


def test_only_matching_nothing_exits_2_with_the_keys(tmp_path, capsys):
    p = _toml(tmp_path, '[sweep]\nbits = [8, 4]\n')
    assert main(["sweep", p, "--only", "bits=3", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "matches none of the 2 runs" in err and "bits: 4, 8" in err and "granularity" in err
    assert not (tmp_path / "o").exists()


def test_read_only_out_is_one_line(tmp_path, capsys):
    import os

    if os.geteuid() == 0:  # root writes anywhere: a path under a regular file cannot be created by anyone
        out = tmp_path / "file"
        out.write_text("")
        out = out / "o"
    else:
        out = tmp_path / "ro"
        out.mkdir()
        out.chmod(0o500)
    p = _toml(tmp_path, '[sweep]\nbits = [8]\n[base]\nhidden = [8]\nsteps = 5\n')
    assert main(["sweep", p, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and "cannot use" in err, err


def test_ctrl_c_is_one_line_and_resumes(tmp_path):
    import signal
    import time

    p = _toml(tmp_path, TINY_TOML.format(name="intr"))
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "qlab.cli", "sweep", p, "--out", str(out), "--no-progress", "--no-plots"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "runs").is_dir() and list((out / "runs").glob("*.json")):
            break  # one run saved: interrupt the next
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode in (130, 0), err
    if proc.returncode == 130:
        assert "rerun to resume" in err and "Traceback" not in err, err
        assert not list((out / "runs").glob("*.claim"))  # the interrupted run's claim is released
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    import pandas as pd

    assert len(pd.read_csv(out / "runs.csv")) == 12


def test_two_sweeps_on_one_folder_split_the_runs(tmp_path):
    p = _toml(tmp_path, TINY_TOML.format(name="two"))
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "qlab.cli", "sweep", p, "--out", str(out), "--no-progress", "--no-plots"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [pr.communicate(timeout=300) for pr in procs]
    assert all(pr.returncode == 0 for pr in procs), [e for _, e in outs]
    import re

    computed = [int(re.search(r"(\d+) computed now", o).group(1)) for o, _ in outs]
    assert sum(computed) == 12, (computed, outs)  # every run done exactly once between them
    import pandas as pd

    t = pd.read_csv(out / "runs.csv")
    assert len(t) == 12 and t["config_hash"].is_unique and not list((out / "runs").glob("*.claim"))


def test_corrupted_runs_csv_is_rebuilt(tmp_path, capsys):
    p = _toml(tmp_path, '[sweep]\nbits = [8, 4]\n[base]\nhidden = [8]\nsteps = 5\n')
    out = tmp_path / "o"
    assert main(["sweep", p, "--out", str(out), "--no-progress", "--no-plots"]) == 0
    good = (out / "runs.csv").read_text()
    for bad in ("", good[: len(good) // 2] + '\n"unterminated'):
        (out / "runs.csv").write_text(bad)
        capsys.readouterr()
        assert main(["sweep", p, "--out", str(out), "--no-progress", "--no-plots"]) == 0
        assert "2 runs in the table, 0 computed now" in capsys.readouterr().out


def test_reference_comparison(tmp_path, capsys):
    p = _toml(tmp_path, '[sweep]\nbits = [8, 2]\n[base]\nhidden = [8]\nsteps = 5\n')
    assert main(["sweep", p, "--out", str(tmp_path / "a"), "--no-progress", "--no-plots"]) == 0
    assert main(["sweep", p, "--out", str(tmp_path / "b"), "--no-progress", "--no-plots",
                 "--reference", str(tmp_path / "a")]) == 0
    assert "matches the reference" in capsys.readouterr().out
    import pandas as pd

    ref = pd.read_csv(tmp_path / "a" / "runs.csv")
    ref.loc[1, "accuracy"] -= 0.1
    ref.to_csv(tmp_path / "a" / "runs.csv", index=False)
    assert main(["sweep", p, "--out", str(tmp_path / "b"), "--no-progress", "--no-plots",
                 "--reference", str(tmp_path / "a")]) == 1
    assert "DIFFERS FROM the reference" in capsys.readouterr().out


def test_three_workers_one_killed_give_the_single_worker_table(tmp_path):
    """Workers sharing a folder (a job array): one is SIGKILLed mid-run; its claim is taken over and the
    table equals a single worker's, every run done once."""
    import signal
    import time

    import pandas as pd

    p = _toml(tmp_path, TINY_TOML.format(name="w3"))
    cmd = [sys.executable, "-m", "qlab.cli", "sweep", p, "--no-progress", "--no-plots", "--out"]
    single = subprocess.run(cmd + [str(tmp_path / "one")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr
    out = tmp_path / "three"
    procs = [subprocess.Popen(cmd + [str(out)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    deadline = time.time() + 120
    victim = procs[0]
    while time.time() < deadline and victim.poll() is None:  # kill it while it holds a claim
        if (out / "runs").is_dir() and list((out / "runs").glob("*.claim")) and list((out / "runs").glob("*.json")):
            break
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    outs = [pr.communicate(timeout=300) for pr in procs[1:]]
    assert all(pr.returncode == 0 for pr in procs[1:]), [e for _, e in outs]
    a, b = pd.read_csv(tmp_path / "one" / "runs.csv"), pd.read_csv(out / "runs.csv")
    cols = ["config_hash", "weight", "accuracy", "bits_per_weight", "model_bytes"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert not list((out / "runs").glob("*.claim"))


def test_a_mesh_larger_than_the_machine_exits_2(tmp_path, capsys):
    p = _toml(tmp_path, TINY_TOML.format(name="m"))
    assert main(["sweep", p, "--out", str(tmp_path / "o"), "--no-progress", "--no-plots", "--mesh", "data=64"]) == 2
    err = capsys.readouterr().err
    assert "data=64 x fsdp=1 needs 64 devices" in err and not (tmp_path / "o" / "runs").exists()
    assert main(["sweep", p, "--out", str(tmp_path / "o"), "--no-progress", "--mesh", "gpus=2"]) == 2
    assert "write data=N and/or fsdp=M" in capsys.readouterr().err
