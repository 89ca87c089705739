"""The sweep runner: study -> runs -> ``results/<name>/`` (resumable, nothing lost).

Example:
    >>> import tempfile
    >>> study = {"name": "doc", "base": {"steps": 20, "hidden": [16], "train_size": 256},
    ...          "sweep": {"method": ["float", "ptq_rtn"], "bits": [8, 2]}}
    >>> table = sweep(study, out=tempfile.mkdtemp(), progress=False, plots=False)
    >>> table[["method", "weight"]].values.tolist()
    [['float', nan], ['ptq_rtn', 'int8/ch'], ['ptq_rtn', 'int2/ch']]
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import pathlib
import platform
import sys
import time
import traceback
from typing import Any, Mapping

from .config import DEFAULTS, ConfigError, Study, load_study, resolve_rules
from .results import atomic_write_text, method_labels, read_runs, rebuild_tables, write_run

__all__ = ["sweep", "plan", "parse_only", "SweepError"]

#: Columns of runs.csv that describe the run rather than measure it.
CONFIG_COLUMNS = ["study", "config_hash", *DEFAULTS]


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
    allowed = set(DEFAULTS) | {"config_hash"}
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


def _matches(run: Mapping[str, Any], filters) -> bool:
    return all(any(fnmatch.fnmatchcase(_fmt(run.get(k)), pat) for pat in pats) for k, pats in filters)


def plan(study, *, force: bool = False, only: str | None = None, out=None) -> tuple[Study, pathlib.Path, list[dict]]:
    """Validate a study and decide what to run: ``(study, out_dir, runs_to_do)``. Raises ConfigError
    before anything runs (bad keys, specs, methods, rule sets, missing data)."""
    from .methods import REGISTRY

    st = study if isinstance(study, Study) else load_study(study)
    for i, run in enumerate(st.runs):
        run["_rules"] = None if run["method"] == "float" else resolve_rules(run, st.rule_sets)
        m = REGISTRY[run["method"]]
        if m.check is not None:
            try:
                m.check(run)
            except ValueError as e:
                raise ConfigError(f"run {i + 1} (method={run['method']!r}, weight={run.get('weight')!r}): {e}") from None
    filters = parse_only(only)
    out_dir = pathlib.Path(out) if out is not None else pathlib.Path("results") / st.name
    done = {r["row"]["config_hash"] for r in read_runs(out_dir)}
    todo = []
    for run in st.runs:
        if filters and not _matches(run, filters):
            continue
        if run["config_hash"] in done and not force:
            continue
        todo.append(run)
    return st, out_dir, todo


def _meta() -> dict:
    import flax
    import jax

    import qlab

    return {
        "qlab_version": qlab.__version__,
        "jax_version": jax.__version__,
        "flax_version": flax.__version__,
        "python_version": platform.python_version(),
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
    }


def _row(st: Study, run: dict, metrics: Mapping[str, Any], meta: dict, wall_s: float) -> dict:
    cfg = {k: (json.dumps(v) if isinstance(v, list) else v) for k, v in run.items() if not k.startswith("_")}
    cfg.pop("rules_def", None)
    return {
        "study": st.name,
        **cfg,
        **dict(metrics),
        "wall_s": wall_s,
        **meta,
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _run_one(run: dict, progress: bool):
    from .methods import REGISTRY

    out = REGISTRY[run["method"]].fn(run, int(run["seed"]), progress=progress)
    metrics, layers = out if isinstance(out, tuple) else (out, None)
    return metrics, layers


def sweep(
    study,
    *,
    force: bool = False,
    only: str | None = None,
    out=None,
    progress: bool = True,
    plots: bool = True,
    batch: bool | None = None,
    raise_on_error: bool = True,
):
    """Run every missing run of a study and return the study's full result table (one row per run).

    Args:
        study: a TOML path, a dict (same structure), or a :class:`Study`.
        force: rerun runs that already have a result.
        only: run only the runs matching a filter such as ``"method=qat,bits=4|8"`` (globs allowed).
        out: results folder (default ``results/<name>``).
        progress: one ``tqdm.auto`` bar over the study (and the training loop's own bars).
        plots: write ``pareto.png``, ``accuracy_vs_bits.png`` and ``layers.png`` when there is data.
        batch: train runs that differ only in traceable values together, as one vmapped program: seed,
            learning rates and (``qat``, ``ptq_rtn``) integer bit widths of one spec family (``int2/ch``
            .. ``int8/ch``); each row keeps its own specs' size metrics. Default: the study's ``batch`` key.

    Each finished run is saved at once (``runs/<hash>.json``, atomic) and ``runs.csv`` /
    ``layers.csv`` are rebuilt, so a sweep killed at any point resumes where it stopped.
    Failed runs are reported (SweepError) after the others finished; they are not saved.
    """
    st, out_dir, todo = plan(study, force=force, only=only, out=out)
    if not todo and (out_dir / "runs.csv").is_file() and (not plots or (out_dir / "pareto.png").is_file()):
        from .results import load_results

        table = load_results(out_dir)  # finished study: nothing to run, nothing rewritten
        if list(table["config_hash"]) == [r["config_hash"] for r in st.runs]:
            return table
    out_dir.mkdir(parents=True, exist_ok=True)
    order = [r["config_hash"] for r in st.runs]
    atomic_write_text(out_dir / "study.json", json.dumps({
        "name": st.name, "description": st.description, "source": st.source,
        "runs": [{k: v for k, v in r.items() if not k.startswith("_")} for r in st.runs],
    }, indent=1, default=str))
    meta = _meta()
    failures: dict[str, str] = {}
    use_batch = st.batch if batch is None else batch
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc=f"sweep {st.name}", unit="run", dynamic_ncols=True)
    try:
        groups = _batch_groups(todo) if use_batch else [[r] for r in todo]
        for group in groups:
            t0 = time.perf_counter()
            if bar is not None:
                r0 = group[0]
                bar.set_postfix_str(f"{r0['method']} {r0.get('weight') or ''}".strip() + (f" x{len(group)}" if len(group) > 1 else ""))
            try:
                if len(group) > 1:
                    from .methods import run_batched

                    results = run_batched(group, progress=progress)
                else:
                    results = [_run_one(group[0], progress)]
            except Exception:  # noqa: BLE001 -- recorded, reported at the end
                for run in group:
                    failures[run["config_hash"]] = traceback.format_exc()
                print(f"run {group[0]['config_hash']} failed:\n{failures[group[0]['config_hash']]}", file=sys.stderr)
                if bar is not None:
                    bar.update(len(group))
                continue
            wall = (time.perf_counter() - t0) / len(group)
            for run, (metrics, layers) in zip(group, results):
                row = _row(st, run, metrics, meta, wall)
                write_run(out_dir, row, None if layers is None else layers.to_dict("records"))
            rebuild_tables(out_dir, order)
            if bar is not None:
                bar.update(len(group))
    finally:
        if bar is not None:
            bar.close()
    table, layers = rebuild_tables(out_dir, order)
    if plots and len(table):
        _plots(table, layers, out_dir, st.name)
    if failures and raise_on_error:
        raise SweepError(failures)
    return table


def _batch_groups(todo: list[dict]) -> list[list[dict]]:
    """Group runs of a batchable method that differ only in traceable values: seed, learning rates
    and (``qat``, ``ptq_rtn``) integer bit widths of one spec family (``methods.batch_signature``)."""
    from .methods import BATCHABLE, batch_signature

    groups: dict[str, list[dict]] = {}
    singles = []
    for run in todo:
        if run["method"] not in BATCHABLE:
            singles.append([run])
            continue
        groups.setdefault(batch_signature(run), []).append(run)
    return singles + list(groups.values())


def _plots(table, layers, out_dir: pathlib.Path, name: str):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    from qlab import plot

    # classification studies report accuracy (higher is better), language models perplexity (lower)
    metric, maximize = ("accuracy", True) if "accuracy" in table else ("perplexity", False)
    table = table.assign(method=method_labels(table))  # GPTQ with act-order is its own series
    try:
        fig = plot.pareto(table, x="model_mib", y=metric, hue="method", label="weight", maximize=maximize,
                          title=f"{name}: {metric} vs size")
        plot.save(fig, out_dir / "pareto.png")
        plt.close(fig)
        q = table[table["method"] != "float"]
        if len(q) and "bits_per_weight" in q:
            by = "granularity" if "granularity" in q and q["granularity"].nunique() > 1 else None
            fig = plot.metric_vs_bits(table, y=metric, hue="method", by=by, title=f"{name}: {metric} vs bits/weight")
            plot.save(fig, out_dir / f"{metric}_vs_bits.png")
            plt.close(fig)
        if len(layers) and "weight_sqnr_db" in layers:
            lay = layers[(layers["weight_spec"] != "float") & (layers["method"] == "ptq_rtn")] if (layers["method"] == "ptq_rtn").any() else layers[layers["weight_spec"] != "float"]
            if len(lay):
                fig = plot.layer_bars(lay, y="weight_sqnr_db", hue="weight", title=f"{name}: weight SQNR per layer")
                plot.save(fig, out_dir / "layers.png")
                plt.close(fig)
    except Exception:  # noqa: BLE001 -- a plot must never lose results
        print(f"plotting failed (results are saved):\n{traceback.format_exc()}", file=sys.stderr)
