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
