"""Float (dequantized Q4_K_M) Gemma 3 270M: load time, perplexity on Pride and Prejudice, eval speed.

    .venv/bin/python benchmarks/gemma3_float.py [--tokens 1024] [--generate]

Text: janeaustenr's ``prideprejudice`` (Debian r-cran-janeaustenr, `make data`), all lines joined with "\\n"
(empty lines kept), tokenized with BOS prepended, first ``--tokens`` tokens. Reference (transformers): ~17.3.
"""

from __future__ import annotations

import argparse
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import rdata

from qlab.evaluate import perplexity
from qlab.models import gemma3
from qlab.models.cache import cache_dir

AUSTEN = Path("debian/usr/lib/R/site-library/janeaustenr/data")


def _pride_and_prejudice() -> str:
    """Read the R lazy-load DB directly (the library's loader lives in qlab.data; this script stays standalone)."""
    d = cache_dir() / AUSTEN
    if not (d / "Rdata.rdx").exists():
        raise FileNotFoundError(f"{d}/Rdata.rdx not found: run `make data` (Debian r-cran-janeaustenr)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata warns about the .rdx extension
        index = rdata.conversion.convert(rdata.parser.parse_file(d / "Rdata.rdx"))
        offset, length = (int(v) for v in index["variables"]["prideprejudice"])
        with open(d / "Rdata.rdb", "rb") as f:
            f.seek(offset)
            blob = f.read(length)
        lines = rdata.conversion.convert(rdata.parser.parse_data(zlib.decompress(blob[4:])))  # 4-byte length
    return "\n".join(str(s) for s in lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--generate", action="store_true", help="also print a greedy continuation")
    args = ap.parse_args()

    t0 = time.perf_counter()
    model, tok = gemma3.load_gemma3()
    load_s = time.perf_counter() - t0
    ids = np.asarray(tok.encode(_pride_and_prejudice()).ids[: args.tokens])

    t0 = time.perf_counter()
    ppl = perplexity(model, ids)
    first_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ppl2 = perplexity(model, ids)
    eval_s = time.perf_counter() - t0
    assert ppl == ppl2

    rows = [("load (float32, cached)", f"{load_s:.1f} s"), ("tokens (incl. BOS)", f"{len(ids)}"),
            ("perplexity", f"{ppl:.3f}"), ("first eval (incl. compile)", f"{first_s:.1f} s"),
            ("eval", f"{eval_s:.1f} s"), ("throughput", f"{(len(ids) - 1) / eval_s:.0f} tok/s")]
    w = max(len(r[0]) for r in rows)
    print(f"{'metric':<{w}}  value")
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    if args.generate:
        prompt = "It is a truth universally acknowledged, that"
        print(f"greedy: {prompt!r} -> {gemma3.generate(model, tok, prompt, max_new_tokens=24)!r}")
    print(f"summary: float ppl {ppl:.3f} vs reference 17.3 (ratio {ppl / 17.3:.3f}), "
          f"{(len(ids) - 1) / eval_s:.0f} tok/s")


if __name__ == "__main__":
    main()
