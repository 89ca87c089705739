"""AWQ with shared, folded scales on Gemma 3 270M: perplexity before and after folding, and of the GGUF export.

    python benchmarks/awq_fold.py [--tokens 1024] [--calib 512] [--spec q4_0] [--no-llama]

AWQ (``layers/.*_proj``, one float calibration pass on ``--calib`` tokens of Emma) per layer as usual
(runtime divides) and with ``share_scales=True``; the latter folded into the norms
(``qlab.ptq.fold_input_scales``) and exported as GGUF, which llama.cpp (``make llama``) evaluates. Perplexity
on the first ``--tokens`` tokens of Pride and Prejudice. Prints a table (model, perplexity, seconds) and a
summary line: folded against unfolded perplexity, and llama.cpp's on the exported file.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from qlab import ptq
from qlab.data import load_austen
from qlab.evaluate import token_nll
from qlab.export.gguf import export_gguf
from qlab.models.gemma3 import gemma3_gguf_path, load_gemma3
from qlab.nn import Rule


def _ppl(model, ids):
    return float(np.exp(token_nll(model, np.asarray(ids))[0].mean()))


def _llama_ppl(path, ids):
    from llama_cpp import Llama  # optional extra (make llama): only this step needs it

    llm = Llama(str(path), n_ctx=len(ids), n_batch=len(ids), logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    lg = np.asarray(llm.scores[: len(ids)], np.float64)
    llm.close()
    lg = lg - lg.max(axis=1, keepdims=True)
    lg = lg - np.log(np.exp(lg).sum(axis=1, keepdims=True))
    return float(np.exp(-lg[np.arange(len(ids) - 1), np.asarray(ids[1:])].mean()))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--calib", type=int, default=512)
    ap.add_argument("--spec", default="q4_0")
    ap.add_argument("--no-llama", action="store_true")
    args = ap.parse_args()
    model, tok = load_gemma3()
    ids = tok.encode(load_austen("prideprejudice")).ids[: args.tokens]
    calib = tok.encode(load_austen("emma")).ids[: args.calib]
    batches = [np.asarray([calib[i:i + 128]]) for i in range(0, len(calib), 128)]
    rules = [Rule(r"layers/.*_proj", weight=args.spec)]
    rows = []

    def run(name, make):
        t = time.perf_counter()
        m = make()
        built = time.perf_counter() - t
        rows.append((name, _ppl(m, ids), built))
        return m

    run("float", lambda: model)
    run(f"RTN {args.spec}", lambda: ptq.rtn(model, rules))
    run(f"AWQ {args.spec}, per-layer scales", lambda: ptq.awq(model, rules, batches, forward=lambda m, b: m(b)))
    shared = run(f"AWQ {args.spec}, share_scales=True",
                 lambda: ptq.awq(model, rules, batches, forward=lambda m, b: m(b), share_scales=True))
    run("  the same, folded into the norms", lambda: ptq.fold_input_scales(shared))
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        g = export_gguf(shared, Path(d) / "gemma-awq.gguf", source=gemma3_gguf_path())
        t_export = time.perf_counter() - t
        llama = None if args.no_llama else _llama_ppl(g, ids)
        if llama is not None:
            rows.append(("  its GGUF export, run by llama.cpp", llama, t_export))
    print(f"{'model':<42} {'perplexity':>10} {'seconds':>8}")
    for name, p, s in rows:
        print(f"{name:<42} {p:10.3f} {s:8.1f}")
    unfolded, folded = rows[3][1], rows[4][1]
    print(f"summary: Gemma 3 270M AWQ {args.spec} share_scales: folded ppl {folded:.3f} vs unfolded {unfolded:.3f} "
          f"({folded / unfolded:.5f}x); per-layer AWQ {rows[2][1]:.3f}"
          + ("" if llama is None else f"; llama.cpp on the export {llama:.3f} ({llama / folded:.4f}x)"))


if __name__ == "__main__":
    main()
