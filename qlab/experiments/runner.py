"""The sweep runner: a study's runs -> ``results/<name>/``, resumable, nothing lost, nothing done twice.

For each run still missing from the folder: claim it, call its method (``run.method.run(run)``), write the
row (:func:`~qlab.experiments.results.result_row`, from the run's typed values) and its per-layer table,
rebuild ``runs.csv`` / ``layers.csv``, release the claim. Plots are drawn from the tables by the CLI or a
notebook (:func:`qlab.plot.study_figures`), not here.

Example:
    >>> import tempfile
    >>> study = {"name": "doc", "base": {"steps": 20, "hidden": [16], "train_size": 256},
    ...          "sweep": {"method": ["float", "ptq_rtn"], "bits": [8, 2]}}
    >>> table = sweep(study, out=tempfile.mkdtemp(), progress=False)
    >>> table[["method", "weight"]].values.tolist()
    [['float', nan], ['ptq_rtn', 'int8/ch'], ['ptq_rtn', 'int2/ch']]
"""

from __future__ import annotations

import fnmatch
import json
import pathlib
import platform
import sys
import time
import traceback
from typing import Any, Mapping

import flax
import jax

import qlab
from qlab import distributed

from .image import BATCHABLE, batch_signature, run_batched
from .results import (atomic_write_text, claim_run, load_results, read_runs, rebuild_tables, release_run, result_row,
                      write_run)
from .study import KEYS, ConfigError, Run, Study, load_study

__all__ = ["sweep", "plan", "parse_only", "SweepError", "study_script"]


class SweepError(RuntimeError):
    """Some runs failed (the others were saved); ``failures`` maps config hash -> error text."""

    def __init__(self, failures: dict[str, str]):
        self.failures = failures
        lines = "\n".join(f"  {h}: {e.strip().splitlines()[-1]}" for h, e in failures.items())
        super().__init__(f"{len(failures)} run(s) failed (rerun to retry them):\n{lines}")


def parse_only(only: str | None) -> list[tuple[str, list[str]]]:
    """``"method=qat,bits=4|8"`` -> ``[("method", ["qat"]), ("bits", ["4", "8"])]``; values may be
    globs (``weight=int4/*``). An unknown key is a ConfigError naming the allowed keys.

    Example:
        >>> parse_only("method=qat,bits=4|8")
        [('method', ['qat']), ('bits', ['4', '8'])]
    """
    if not only:
        return []
    out = []
    allowed = set(KEYS) | {"config_hash"}
    for part in only.split(","):
        if "=" not in part:
            raise ConfigError(f"--only {only!r}: each filter is key=value (e.g. method=qat,bits=4)")
        k, v = (s.strip() for s in part.split("=", 1))
        if k not in allowed:
            raise ConfigError(f"--only: unknown key {k!r}; allowed: {', '.join(sorted(allowed))}")
        out.append((k, v.split("|")))
    return out


def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float) and v.is_integer():
        return str(int(v))
    return str(v)


def _matches(run: Run, filters) -> bool:
    return all(any(fnmatch.fnmatchcase(_fmt(run.get(k)), pat) for pat in pats) for k, pats in filters)


def plan(study, *, force: bool = False, only: str | None = None, out=None) -> tuple[Study, pathlib.Path, list[Run]]:
    """Load a study (everything is validated there) and decide what to run: ``(study, out_dir, runs_to_do)``.
    An ``only`` filter that matches none of the study's runs is a ConfigError listing the keys and values.

    Example:
        >>> st, out, todo = plan({"name": "p", "sweep": {"bits": [8, 4]}}, only="bits=4", out="/nonexistent")
        >>> [r.label for r in todo]
        ['int4/ch']
    """
    st = study if isinstance(study, Study) else load_study(study)
    filters = parse_only(only)
    chosen = [r for r in st.runs if _matches(r, filters)]
    if filters and not chosen:
        values = {k: sorted({_fmt(r.get(k)) for r in st.runs}) for k, _ in filters}
        listing = "; ".join(f"{k}: {', '.join(v)}" for k, v in values.items())
        raise ConfigError(f"--only {only!r} matches none of the {len(st.runs)} runs of study {st.name!r} "
                          f"(values in the study: {listing}); keys: {', '.join(sorted(KEYS))}")
    out_dir = pathlib.Path(out) if out is not None else pathlib.Path("results") / st.name
    runs = read_runs(out_dir)
    _check_same_study(out_dir, st.name, runs)
    done = {r["row"]["config_hash"] for r in runs}
    return st, out_dir, [r for r in chosen if force or r.config_hash not in done]


def _check_same_study(out_dir: pathlib.Path, name: str, runs: list[dict]) -> None:
    """A folder that holds another study's results is an error (a worker given the wrong ``--out``)."""
    names = {r["row"].get("study") for r in runs} - {None, name}
    study = out_dir / "study.json"
    if study.is_file():
        try:
            names |= {json.loads(study.read_text()).get("name")} - {None, name}
        except json.JSONDecodeError:
            pass  # a half-written study.json cannot happen (atomic writes); the rows still say whose they are
    if names:
        raise ConfigError(f"results folder {out_dir} holds study {sorted(names)[0]!r}, not {name!r}: give this "
                          f"study its own folder (--out), or rename one of the studies")


def _meta() -> dict:
    return {
        "qlab_version": qlab.__version__,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "python_version": platform.python_version(),
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
    }


_POLL_S = 0.5  # how often a sweep looks at runs another sweep holds


def _finished(out_dir: pathlib.Path, run: Run) -> bool:
    return (out_dir / "runs" / f"{run.config_hash}.json").is_file()


def _groups(todo: list[Run], batch: bool) -> list[list[Run]]:
    """One run a group, or (``batch``) runs of a batchable method grouped by :func:`batch_signature`."""
    if not batch:
        return [[r] for r in todo]
    groups: dict[str, list[Run]] = {}
    singles = []
    for run in todo:
        if run.method.family == "image" and run.method.name in BATCHABLE and run.search is None:
            groups.setdefault(batch_signature(run), []).append(run)
        else:
            singles.append([run])
    return singles + list(groups.values())


def _run_group(group: list[Run], progress: bool) -> list[tuple[dict, Any]]:
    if len(group) > 1:
        return run_batched(group, progress=progress)
    out = group[0].method.run(group[0], progress=progress)
    return [out if isinstance(out, tuple) else (out, None)]


def _check_mesh(mesh, st: Study, todo: list[Run], batch: bool | None):
    """The mesh (a Mesh, or text such as ``"data=2,fsdp=2"``) once every run's batch divides over it."""
    if mesh is None:
        return None
    if batch:
        raise ConfigError("batch=True (variants vmapped as one program) and mesh= (each run split over the mesh) "
                          "exclude each other; drop one")
    try:
        mesh = distributed.parse_mesh(mesh) if isinstance(mesh, str) else mesh
    except ValueError as e:
        raise ConfigError(str(e)) from None
    bad = sorted({int(r["batch_size"]) for r in todo if r.get("batch_size") is not None
                  and int(r["batch_size"]) % mesh.size})
    if bad:
        raise ConfigError(f"study {st.name!r}: batch_size {bad} does not divide over the mesh {dict(mesh.shape)} "
                          f"({mesh.size} devices); use multiples of {mesh.size}")
    return mesh


def sweep(study, *, force: bool = False, only: str | None = None, out=None, progress: bool = True,
          batch: bool | None = None, raise_on_error: bool = True, mesh=None):
    """Run every missing run of a study and return the study's full result table (one row per run).

    Args:
        study: a TOML path, a dict (same structure), or a :class:`Study`.
        force: rerun runs that already have a result.
        only: run only the runs matching a filter such as ``"method=qat,bits=4|8"`` (globs allowed).
        out: results folder (default ``results/<name>``).
        progress: one ``tqdm.auto`` bar over the study (and the training loop's own bars).
        batch: train runs that differ only in traceable values together, as one vmapped program: seed,
            learning rates and (``qat``, ``ptq_rtn``) integer bit widths of one spec family (``int2/ch``
            .. ``int8/ch``); each row keeps its own specs' size metrics. Default: the study's ``batch`` key.
        raise_on_error: raise :class:`SweepError` at the end if some runs failed.
        mesh: train each run data-parallel (and FSDP) over a device mesh: a ``jax.sharding.Mesh`` or text
            such as ``"data=4"`` / ``"data=2,fsdp=2"`` over this process's devices
            (:func:`qlab.distributed.parse_mesh`). Not part of the study (it changes only float rounding), so
            the same study file runs on one CPU or a GPU/TPU mesh; runs are then trained one at a time
            (``batch`` is off). A batch size the mesh does not divide is a ConfigError before any run.

    Each finished run is saved at once (``runs/<hash>.json``, atomic) and ``runs.csv`` / ``layers.csv`` are
    rebuilt, so a sweep killed at any point resumes where it stopped. Runs another live sweep has claimed
    are left to it, and waited for at the end; if that sweep dies its claims are taken over (same host: its
    process is gone; other hosts: the claim is older than ``QLAB_CLAIM_TTL`` seconds), so any number of
    workers started on one folder (a job array, a loop) end with every run done exactly once. Failed runs are reported after the others finished; they are not saved. The table's
    ``attrs["computed"]`` counts the runs this call did.
    """
    st, out_dir, todo = plan(study, force=force, only=only, out=out)
    mesh = _check_mesh(mesh, st, todo, batch)
    if mesh is not None:
        batch = False
    done_before = {r["row"]["config_hash"] for r in read_runs(out_dir)}
    order = [r.config_hash for r in st.runs]
    if not todo and (out_dir / "runs.csv").is_file():
        table = load_results(out_dir)  # finished study: nothing to run, nothing rewritten
        if list(table["config_hash"]) == order:
            return table
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "study.json", json.dumps({
        "name": st.name, "description": st.description, "source": st.source,
        "runs": [{"config_hash": r.config_hash, **r.config} for r in st.runs],
    }, indent=1, default=str))
    meta = _meta()
    failures: dict[str, str] = {}
    computed = 0
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm  # noqa: PLC0415 -- picks the notebook or terminal bar when first used

        bar = tqdm(total=len(todo), desc=f"sweep {st.name}", unit="run", dynamic_ncols=True)

    def do(group: list[Run]) -> list[Run]:
        """Claim, run and save a group; returns the runs another live sweep holds."""
        nonlocal computed
        claimed = [r for r in group if claim_run(out_dir, r.config_hash)]
        for r in [r for r in claimed if r.config_hash not in done_before and _finished(out_dir, r)]:
            release_run(out_dir, r.config_hash)  # another sweep finished it after we planned
            claimed.remove(r)
        held = [r for r in group if r not in claimed and not _finished(out_dir, r)]
        if not claimed:
            return held
        if bar is not None:
            bar.set_postfix_str(f"{claimed[0].method.name} {claimed[0].label}" +
                                (f" x{len(claimed)}" if len(claimed) > 1 else ""))
        t0 = time.perf_counter()
        try:
            results = _run_group(claimed, progress)
            wall = (time.perf_counter() - t0) / len(claimed)
            for run, (metrics, layers) in zip(claimed, results):
                write_run(out_dir, result_row(st.name, run, metrics, meta, wall),
                          None if layers is None else layers.to_dict("records"))
            rebuild_tables(out_dir, order)
            computed += len(claimed)
        except Exception:  # noqa: BLE001 -- recorded, reported at the end
            for run in claimed:
                failures[run.config_hash] = traceback.format_exc()
            print(f"run {claimed[0].config_hash} failed:\n{failures[claimed[0].config_hash]}", file=sys.stderr)
        finally:
            for run in claimed:
                release_run(out_dir, run.config_hash)
        return held

    with distributed.use_mesh(mesh):  # the runs' train() calls pick it up
        try:
            held = []
            for group in _groups(todo, st.batch if batch is None else batch):
                held += do(group)
                if bar is not None:
                    bar.update(len(group))
            if held:
                print(f"{len(held)} run(s) are claimed by another sweep working on {out_dir}: waiting for them "
                      "(a claim whose sweep died is taken over)", file=sys.stderr)
            while held:  # another sweep's runs: wait until they are saved, or redo them if that sweep died
                time.sleep(_POLL_S)
                held = [h for r in held for h in do([r])]
        finally:
            if bar is not None:
                bar.close()
    table, _ = rebuild_tables(out_dir, order)
    table.attrs["computed"] = computed  # runs this call did (the rest were done before, or by another sweep)
    if failures and raise_on_error:
        raise SweepError(failures)
    return table


def study_script(doc: str, study, default_out, write, argv=None):
    """The command line of a study's report script, ``python experiments/<script>.py [--out DIR] [--readme]``:
    run the study (resumable: the same as ``qlab sweep <study_file> --out DIR``) unless ``--readme``, then
    ``write(out_dir, study)`` (``study``: a TOML path, a dict or a :class:`Study`), which writes the study's own tables, plots and README.md from the stored runs.

    Example:
        >>> import tempfile
        >>> out = tempfile.mkdtemp()
        >>> study = {"name": "doc", "base": {"steps": 20, "hidden": [16], "train_size": 256}}
        >>> study_script("A study.", study, out, lambda o, st: print(st.name, len(load_results(o))), argv=[])
        doc 1
    """
    import argparse

    ap = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    ap.add_argument("--out", default=str(default_out), help=f"results folder (default {default_out})")
    ap.add_argument("--readme", action="store_true", help="only rewrite the tables, plots and README from the stored runs")
    a = ap.parse_args(argv)
    st = study if isinstance(study, Study) else load_study(study)
    out = pathlib.Path(a.out)
    if not a.readme:
        sweep(st, out=out)
    return write(out, st)
