"""qlab's command line.

    qlab sweep experiments/<name>.toml [--force] [--only FILTER] [--out DIR] [--batch] [--no-progress]
    qlab check experiments/<name>.toml      validate and list the runs, run nothing
    qlab methods                            list registered methods

Exit codes: 0 success, 1 some runs failed (the others are saved), 2 invalid study or arguments.

Example:
    >>> main(["methods"])  # doctest: +ELLIPSIS
    float ...
    0
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qlab", description="qlab: quantization research workbench")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="run a study (resumable); writes results/<name>/")
    s.add_argument("study", help="a study TOML file (experiments/<name>.toml)")
    s.add_argument("--force", action="store_true", help="rerun runs that already have results")
    s.add_argument("--only", metavar="FILTER", help="only runs matching key=value[,key=value] (values: a|b, globs)")
    s.add_argument("--out", metavar="DIR", help="results folder (default results/<name>)")
    s.add_argument("--batch", action="store_true", default=None, help="train variants that differ only in seed, learning rates, integer bit width or clip ratio together (vmapped)")
    s.add_argument("--no-plots", action="store_true", help="do not write PNG plots")
    s.add_argument("--no-progress", action="store_true", help="no progress bars")
    c = sub.add_parser("check", help="validate a study and list its runs; runs nothing")
    c.add_argument("study")
    c.add_argument("--only", metavar="FILTER")
    c.add_argument("--out", metavar="DIR")
    sub.add_parser("methods", help="list registered methods")
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    from qlab.experiments.config import ConfigError

    try:
        if args.cmd == "methods":
            from qlab.experiments.methods import REGISTRY

            for name, m in sorted(REGISTRY.items()):
                print(f"{name:10s} {m.doc}")
            return 0
        if args.cmd == "check":
            from qlab.experiments.runner import plan

            st, out, todo = plan(args.study, only=args.only, out=args.out)
            print(f"study {st.name}: {len(st.runs)} runs, {len(todo)} to do -> {out}")
            for r in st.runs:
                mark = "todo" if r in todo else "done"
                print(f"  {mark} {r['config_hash']} {r['method']:8s} {r.get('weight') or '-':14s} rules={r.get('rules')} seed={r['seed']}")
            return 0
        from qlab.experiments.runner import SweepError, sweep

        t = __import__("time").perf_counter()
        try:
            table = sweep(args.study, force=args.force, only=args.only, out=args.out,
                          progress=not args.no_progress, plots=not args.no_plots, batch=args.batch)
        except SweepError as e:
            print(f"qlab sweep: {e}", file=sys.stderr)
            return 1
        cols = [c for c in ("method", "weight", "rules", "seed", "accuracy", "perplexity", "bits_per_weight", "model_mib") if c in table]
        with __import__("pandas").option_context("display.width", 140, "display.max_rows", 200):
            print(table[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(f"{len(table)} runs in the table; {__import__('time').perf_counter() - t:.1f} s")
        return 0
    except ConfigError as e:
        print(f"qlab {args.cmd}: invalid study: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
