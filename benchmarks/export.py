"""Export speed: Gemma 3 270M quantized with RTN to Q4_0 (embedding Q8_0) and written as GGUF and as
safetensors; then llama.cpp (llama-cpp-python, ``make llama``) greedy-decodes 64 tokens from the GGUF.

    python benchmarks/export.py [--tokens 64] [--threads 2]

Prints a table (step, seconds, detail) and a summary line: export time against the 60 s goal and
llama.cpp's decode speed in tokens/s. (qlab's own decode speed, float vs packed int4, is measured
where resident packed weights live.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from qlab import ptq
from qlab.export.gguf import export_gguf
from qlab.export.safetensors import export_safetensors
from qlab.models.gemma3 import gemma3_gguf_path, load_gemma3
from qlab.nn import Rule

PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune,"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = []
    t = time.perf_counter()
    model, tok = load_gemma3()
    rows.append(("load float Gemma 3 270M (cached)", time.perf_counter() - t, ""))
    t = time.perf_counter()
    qm = ptq.rtn(model, [Rule("embed", weight="q8_0"), Rule(r"layers/.*_proj", weight="q4_0")])
    rows.append(("RTN q4_0 (embed q8_0)", time.perf_counter() - t, ""))
    with tempfile.TemporaryDirectory() as d:
        t = time.perf_counter()
        g = export_gguf(qm, Path(d) / "gemma-q4_0.gguf", source=gemma3_gguf_path())
        t_gguf = time.perf_counter() - t
        rows.append(("export GGUF", t_gguf, f"{g.stat().st_size / 2**20:.1f} MiB"))
        t = time.perf_counter()
        s = export_safetensors(qm, Path(d) / "gemma-q4_0.safetensors")
        rows.append(("export safetensors", time.perf_counter() - t, f"{s.stat().st_size / 2**20:.1f} MiB"))
        from llama_cpp import Llama  # optional extra (make llama): only this step needs it

        llm = Llama(str(g), n_ctx=256, verbose=False, n_threads=args.threads)
        ids = tok.encode(PROMPT).ids
        llm.eval(ids)  # prefill, not timed
        t = time.perf_counter()
        out = []
        for _ in range(args.tokens):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            llm.eval([nxt])
        dt = time.perf_counter() - t
        tps = args.tokens / dt
        rows.append((f"llama.cpp greedy decode, {args.tokens} tokens", dt, f"{tps:.1f} tokens/s"))
        llm.close()
    print(f"{'step':<40} {'seconds':>8}  detail")
    for name, sec, detail in rows:
        print(f"{name:<40} {sec:8.2f}  {detail}")
    print(f"summary: GGUF export {t_gguf:.1f} s ({t_gguf / 60:.2f}x the 60 s goal); "
          f"llama.cpp Q4_0 greedy decode {tps:.1f} tokens/s")


if __name__ == "__main__":
    main()
