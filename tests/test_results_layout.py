"""Every study folder under results/ has the one layout that results/README.md describes, and the experiment
scripts that write their own results write that layout too."""

from __future__ import annotations

import importlib.util
import json
import pathlib

import pandas as pd
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
# <study>_small/ folders are the notebooks' scratch output at their default size (ignored by results/.gitignore)
# results/ablations/ holds one study folder per ablation (and an index README) instead of being one
GROUPS = ("ablations",)
STUDIES = sorted(q for p in RESULTS.iterdir() if p.is_dir() and not p.name.endswith("_small")
                 for q in ([r for r in p.iterdir() if r.is_dir() and not r.name.endswith("_small")]
                           if p.name in GROUPS else [p]))
ALLOWED_SUFFIXES = {".csv", ".json", ".png", ".svg", ".md"}


def command_refs(folder: pathlib.Path, study: dict) -> list[str]:
    """What the README must mention to say how the study ran: the command study.json records, else its source
    (a script or a TOML file), else the notebook that defines a study of that name."""
    if study.get("command"):
        return [study["command"]]
    if study.get("source"):
        return [study["source"]]
    return [str(nb.relative_to(ROOT)) for nb in sorted((ROOT / "notebooks").glob("*.py"))
            if f'"{folder.name}"' in nb.read_text()]


def layout_problems(folder: pathlib.Path) -> list[str]:
    """Everything about ``folder`` that departs from the study layout (empty when it conforms)."""
    problems = []
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            if p.name != "runs":
                problems.append(f"unexpected folder {p.name}/")
            else:
                problems += [f"runs/{q.name} is not a run JSON" for q in sorted(p.iterdir())
                             if not (q.is_file() and q.suffix == ".json")]
        elif p.suffix not in ALLOWED_SUFFIXES:
            problems.append(f"unexpected file {p.name}")
    for name in ("runs.csv", "study.json", "README.md"):
        if not (folder / name).is_file():
            problems.append(f"missing {name}")
    if problems:
        return problems

    runs = pd.read_csv(folder / "runs.csv")
    if "config_hash" not in runs:
        return problems + ["runs.csv has no config_hash column"]
    if runs.config_hash.isna().any() or not runs.config_hash.is_unique:
        problems.append("runs.csv config_hash values are missing or repeated")
    records = [json.loads(p.read_text()) for p in sorted((folder / "runs").glob("*.json"))]
    if records:
        stored = {r["row"]["config_hash"] for r in records}
        problems += [f"run {h} has no runs/{h}.json" for h in runs.config_hash if h not in stored]
        if any(r.get("layers") for r in records if r["row"]["config_hash"] in set(runs.config_hash)):
            if not (folder / "layers.csv").is_file():
                problems.append("per-layer rows exist but layers.csv is missing")

    study = json.loads((folder / "study.json").read_text())
    if study.get("name") != folder.name:
        problems.append(f"study.json names {study.get('name')!r}, not {folder.name!r}")
    readme = (folder / "README.md").read_text()
    refs = command_refs(folder, study)
    if not refs:
        problems.append("no command, source or defining notebook for the study")
    problems += [f"README.md does not mention {ref!r}" for ref in refs if ref not in readme]
    problems += [f"{ref} does not exist" for ref in refs
                 if not ref.startswith(("python ", "qlab ")) and not (ROOT / ref).exists()]
    return problems


def test_results_has_studies():
    assert len(STUDIES) >= 5, STUDIES


@pytest.mark.parametrize("folder", STUDIES, ids=[p.name for p in STUDIES])
def test_study_folder_layout(folder):
    assert layout_problems(folder) == []


def test_results_readme_links_every_study():
    """results/README.md links each study folder, and each group's folder, whose README links its studies."""
    index = (RESULTS / "README.md").read_text()
    indexes = {p: (p.parent / "README.md").read_text() if p.parent != RESULTS else index for p in STUDIES}
    assert [str(p.relative_to(RESULTS)) for p in STUDIES if f"]({p.name}/README.md)" not in indexes[p]] == []
    assert [g for g in GROUPS if (RESULTS / g).is_dir() and f"]({g}/README.md)" not in index] == []
    assert {p.name for p in RESULTS.iterdir() if p.is_file()} == {"README.md", ".gitignore"}


def test_layout_check_catches_departures(tmp_path):
    folder = tmp_path / "demo"
    (folder / "runs").mkdir(parents=True)
    pd.DataFrame({"config_hash": ["a", "a"], "accuracy": [0.5, 0.6]}).to_csv(folder / "runs.csv", index=False)
    (folder / "study.json").write_text(json.dumps({"name": "other", "source": "experiments/nowhere.toml"}))
    (folder / "README.md").write_text("# demo\n")
    (folder / "run.log").write_text("log\n")
    assert layout_problems(folder) == ["unexpected file run.log"]
    (folder / "run.log").unlink()
    problems = layout_problems(folder)
    assert "runs.csv config_hash values are missing or repeated" in problems
    assert "study.json names 'other', not 'demo'" in problems
    assert "README.md does not mention 'experiments/nowhere.toml'" in problems
    assert "experiments/nowhere.toml does not exist" in problems


def load_script(name: str):
    """The module of ``experiments/<name>.py``."""
    spec = importlib.util.spec_from_file_location(f"experiment_{name}", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qat_fashion_mnist_writes_the_layout(tmp_path):
    from qlab.experiments.results import write_run

    m = load_script("qat_fashion_mnist")
    args = dict(train_size=100, float_epochs=1, qat_epochs=1, batch_size=32, lr=1e-3, qat_lr=3e-4, seed=0)
    rows = [dict(m.run_config(args, "float", 32, 32, "-", 100), test_accuracy=0.8, train_seconds=1.0, model_mib=1.0)]
    for bits, quantizer in m.CONFIGS:
        if quantizer == "ste":
            rows.append(dict(m.run_config(args, "ptq_rtn", bits, 8, "rtn", 100), test_accuracy=0.1 * bits,
                             train_seconds=0.0, model_mib=bits / 32))
        rows.append(dict(m.run_config(args, "qat", bits, 8, quantizer, 100), test_accuracy=0.7, train_seconds=1.0,
                         model_mib=bits / 32, converted_accuracy=0.7))
    out = tmp_path / m.STUDY
    for row in rows:
        write_run(out, row)
    runs = m.write_study(out, rows, args, wall_s=60.0, environment="test")
    assert layout_problems(out) == []
    assert len(runs) == len(rows) == 11
    assert "--train-size 100 --float-epochs 1" in (out / "README.md").read_text()


def test_qat_austen_writes_the_layout(tmp_path):
    from qlab.experiments.results import write_run

    m = load_script("qat_austen")
    args = dict(float_steps=10, qat_steps=5, batch_size=4, seq_len=16, d_model=16, layers=1, val_chars=100,
                lr=2e-3, qat_lr=3e-4, seed=0)
    runs_in = [("float", "float"), ("ptq_rtn", "W8A8"), ("qat", "W8A8"), ("ptq_rtn", "W4g32"), ("qat", "W4g32"),
               ("float+ft", "float")]
    rows = [dict(m.run_config(args, method, scheme), val_ppl=5.0 + i, train_seconds=1.0, model_mib=1.0 / (i + 1))
            for i, (method, scheme) in enumerate(runs_in)]
    out = tmp_path / m.STUDY
    for row in rows:
        write_run(out, row)
    runs = m.write_study(out, rows, args, wall_s=60.0, environment="test", vocab_size=81, params=1000)
    assert layout_problems(out) == []
    assert list(runs.train_steps) == [10, 0, 5, 0, 5, 15]


def test_minilm_ptq_writes_the_layout(tmp_path):
    from qlab.experiments.results import write_run

    m = load_script("minilm_ptq")
    args = {"n_eval": 30, "n_calib": 8}
    configs = [m.run_config(args, *job) for job in m.jobs()]
    assert len({c["config_hash"] for c in configs}) == len(configs)
    for i, c in enumerate(configs):
        write_run(tmp_path / m.STUDY, dict(c, cos_mean=1.0 - i / 100, cos_min=0.5, probe_acc=0.4, model_mib=50.0,
                                           quant_s=1.0, eval_s=1.0))
    m.write_study(tmp_path / m.STUDY, args, configs, wall_s=60.0, outliers=None)
    assert layout_problems(tmp_path / m.STUDY) == []
    assert (tmp_path / m.STUDY / "cos.png").is_file()


def test_ablation_range_gemma3_writes_the_layout(tmp_path):
    """The README script of the range-setting study reads its runs (made-up metrics here) into the layout."""
    import qlab.experiments as qx
    from qlab.experiments.results import atomic_write_text, rebuild_tables, result_row, write_run

    m = load_script("ablation_range_gemma3")
    study = qx.load_study(ROOT / m.STUDY, check=False)
    out = tmp_path / study.name
    for i, run in enumerate(study.runs):
        quantized = run.method.name != "float"
        metrics = dict(perplexity=10.0 + i, perplexity_se=1.0, ppl_ratio=1.0 + i / 10 * quantized,
                       ppl_ratio_se=0.01 * quantized, kl=i / 100, top1=0.9, collapsed=i == 3, quantized_params=100,
                       bits_per_weight=run["bits"] if quantized else 32.0)
        layers = [dict(layer="layers/0/attn/q_proj", params=100, weight_sqnr_db=20.0 + i)] if quantized else None
        write_run(out, result_row(study.name, run, metrics, {"jax_version": "test"}, wall_s=1.0), layers)
    atomic_write_text(out / "study.json", json.dumps({"name": study.name, "source": m.STUDY}))
    rebuild_tables(out, [r.config_hash for r in study.runs])
    t = m.write(out)
    assert layout_problems(out) == []
    assert len(t) == len(study.runs) and (out / "range_vs_bits.png").is_file()
    assert "collapsed (ppl" in (out / "README.md").read_text()
