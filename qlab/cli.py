"""qlab's command line.

    qlab sweep experiments/<name>.toml [--out DIR] [--only FILTER] [--force] [--batch] [--reference DIR]
                                       [--mesh data=N,fsdp=M]
    qlab check experiments/<name>.toml      validate and list the runs, run nothing
    qlab plot results/<name>                draw a study's figures from its tables
    qlab methods                            list the methods of each model family
    qlab keys                               list every study key, its default and what reads it

Exit codes: 0 success; 1 some runs failed (the others are saved) or the table differs from ``--reference``;
2 invalid study, arguments or output folder; 130 interrupted (rerun to resume).

Example:
    >>> main(["methods"])  # doctest: +ELLIPSIS
    image  float ...
    0
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import pandas as pd

import qlab
from qlab import plot
from qlab.experiments import (FAMILIES, REGISTRY, ConfigError, SweepError, compare_tables, load_results, plan,
                              schema_table, sweep)

__all__ = ["main"]

_SHOW = ("method", "weight", "seed", "accuracy", "perplexity", "bits_per_weight", "model_mib")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlab", description="qlab: a quantization research workbench for JAX")
    p.add_argument("--version", action="version", version=f"qlab {qlab.__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND", help="one of the commands below")
    s = sub.add_parser("sweep", help="run a study (resumable); writes runs.csv, layers.csv, study.json and plots")
    s.add_argument("study", help="a study TOML file (experiments/<name>.toml)")
    s.add_argument("--out", metavar="DIR", help="results folder (default results/<name>)")
    s.add_argument("--only", metavar="FILTER",
                   help="only runs matching key=value[,key=value] (values: a|b, globs such as weight=int4/*)")
    s.add_argument("--force", action="store_true", help="rerun runs that already have results")
    s.add_argument("--batch", action="store_true", default=None,
                   help="train variants that differ only in seed, learning rates, integer bit width or clip ratio "
                        "together (one vmapped program)")
    s.add_argument("--reference", metavar="DIR",
                   help="compare the table with a reference study folder's runs.csv and say whether they match")
    s.add_argument("--mesh", metavar="AXES", help="train each run over this process's devices, e.g. data=4 or "
                   "data=2,fsdp=2 (batch split over all of them, parameters over fsdp); not part of the study")
    s.add_argument("--no-plots", action="store_true", help="do not write PNG figures")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    c = sub.add_parser("check", help="validate a study and list its runs; runs nothing")
    c.add_argument("study", help="a study TOML file")
    c.add_argument("--only", metavar="FILTER", help="as for sweep")
    c.add_argument("--out", metavar="DIR", help="results folder whose finished runs are marked done")
    f = sub.add_parser("plot", help="draw a study's figures from its tables (runs.csv, layers.csv)")
    f.add_argument("folder", help="a study's results folder")
    sub.add_parser("methods", help="list the methods of each model family")
    sub.add_parser("keys", help="list every study key, its default and which methods read it")
    return p


def _table(table) -> str:
    cols = [c for c in _SHOW if c in table]
    with pd.option_context("display.width", 160, "display.max_rows", 200, "display.max_colwidth", 40):
        return table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}")


def _plots(out, table, name) -> None:
    _, layers = load_results(out, layers=True)
    for path in plot.save_study_figures(out, table, layers, name):
        print(f"wrote {path}")


def _sweep(args) -> int:
    t = time.perf_counter()
    st, out, todo = plan(args.study, force=args.force, only=args.only, out=args.out)
    print(f"study {st.name}: {len(st.runs)} runs, {len(todo)} to do -> {out}")
    try:
        table = sweep(st, force=args.force, only=args.only, out=out, progress=not args.no_progress, batch=args.batch,
                      mesh=args.mesh)
    except SweepError as e:
        print(f"qlab sweep: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        done = len(list((out / "runs").glob("*.json"))) if (out / "runs").is_dir() else 0
        print(f"\nqlab sweep: interrupted; {done} finished runs are saved in {out}; rerun to resume", file=sys.stderr)
        return 130
    print(_table(table))
    print(f"{len(table)} runs in the table, {table.attrs.get('computed', 0)} computed now; "
          f"{time.perf_counter() - t:.1f} s")
    if not args.no_plots and len(table):
        _plots(out, table, st.name)
    if args.reference:
        ok, lines = compare_tables(table, load_results(args.reference))
        for line in lines[:20]:
            print(f"  {line}")
        print(f"{'matches' if ok else 'DIFFERS FROM'} the reference {args.reference} ({len(table)} runs compared)")
        return 0 if ok else 1
    return 0


def main(argv=None) -> int:
    """Run the command line; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        if args.cmd == "methods":
            for (family, name), m in sorted(REGISTRY.items()):
                print(f"{family:6s} {name:16s} {m.doc}")
            return 0
        if args.cmd == "keys":
            print(schema_table())
            return 0
        if args.cmd == "plot":
            table = load_results(args.folder)
            _plots(pathlib.Path(args.folder), table, pathlib.Path(args.folder).name)
            return 0
        if args.cmd == "check":
            st, out, todo = plan(args.study, only=args.only, out=args.out)
            todo_hashes = {r.config_hash for r in todo}
            print(f"study {st.name}: {len(st.runs)} runs, {len(todo)} to do -> {out}")
            for r in st.runs:
                mark = "todo" if r.config_hash in todo_hashes else "done"
                print(f"  {mark} {r.config_hash} {r.method.family:5s} {r.method.name:16s} {r.label:24s} seed={r.seed}")
            return 0
        return _sweep(args)
    except ConfigError as e:
        print(f"qlab {args.cmd}: invalid study: {e}", file=sys.stderr)
        return 2
    except (PermissionError, IsADirectoryError, NotADirectoryError, FileNotFoundError) as e:
        where = getattr(e, "filename", None) or ""
        print(f"qlab {args.cmd}: cannot use {where or 'the output folder'}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nqlab {args.cmd}: interrupted; rerun to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
