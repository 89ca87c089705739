"""Gemma 3 270M converted: resident bytes against the accounting, and greedy decode speed, float vs packed int4.

    .venv/bin/python benchmarks/decode.py [--tokens 64] [--rounds 5] [--specs int8/ch,int4/g128,nf4/g64]
                                          [--xla-default-scheduler]

XLA:CPU's default (concurrency-optimised) scheduler keeps every layer's dequantized weight alive at once, so a
converted model's decode step would hold the whole float model in temporaries (385 MiB for the int4 linears)
and page-fault them in on every token. This script starts JAX with
``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` (temporaries: 5 MiB) unless
``--xla-default-scheduler`` is given; the flag must be set before JAX starts, so one run measures one setting.

Part 1, per weight spec on every linear layer (``.*_proj``; the tied embedding stays float32):
``qlab.nn.convert`` the model, then compare ``qlab.nn.resident_bytes`` (the bytes of the JAX arrays it holds)
with ``qlab.nn.model_size`` (the accounting): ``resident/accounted`` should be 1.00; the linear layers alone
are compared too. ``unpacked`` is what those layers would take with one byte a code and float32 scales (and
zero points): qlab's layout before codes were packed.
The float rows give the baseline in float32 (what qlab computes in) and in the model's own dtype (bf16).

Part 2: ``qlab.models.gemma3.decode_greedy`` (KV cache) continues one prompt by ``--tokens`` tokens, float32
model against the int4/g128 model converted as above (packed codes dequantized inside the jitted step).
Tokens/s count the single-token steps only (the prompt's prefill and compilation are timed apart); each model
runs ``--rounds`` times, interleaved; the table shows each model's best round, the summary the ratio of the
bests and the median of the per-round ratios (this machine's CPUs are shared: single rounds move by 20%). The llama.cpp column (the exported Q4_0 file
run by llama-cpp-python) belongs to ``benchmarks/export.py``; it is ``-`` here.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

SCHEDULER_FLAG = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
if "--xla-default-scheduler" not in sys.argv:  # before JAX starts (module docstring)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + SCHEDULER_FLAG).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from qlab import nn as qnn  # noqa: E402
from qlab.models import gemma3  # noqa: E402
from qlab.numerics import packed_nbytes  # noqa: E402

MiB = 2**20
PROMPT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


def _timed_decode(model, ids, tokens):
    """(new ids, prefill seconds, tokens/s of the single-token steps)."""
    t0 = time.perf_counter()
    gemma3.decode_greedy(model, ids, max_new_tokens=1)  # prefill (+ compile on first use)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = gemma3.decode_greedy(model, ids, max_new_tokens=tokens)
    total = time.perf_counter() - t0
    return out, prefill, (tokens - 1) / max(total - prefill, 1e-9)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--specs", default="int8/ch,int4/g128,nf4/g64")
    ap.add_argument("--xla-default-scheduler", action="store_true",
                    help="leave XLA:CPU's concurrency-optimised scheduler on (module docstring)")
    args = ap.parse_args()

    model, tok = gemma3.load_gemma3()
    size = qnn.model_size(model)
    print(f"Gemma 3 270M: {size['params']:,} params; float32 {size['float_mib']:.1f} MiB, "
          f"{size['native_dtype']} {size['float_native_mib']:.1f} MiB; resident {qnn.resident_bytes(model) / MiB:.1f} MiB")
    print()
    print("| weights (linear layers) | model: accounted MiB | resident MiB | resident/accounted "
          "| linear layers: accounted MiB | resident MiB | unpacked MiB |")
    print("|---|---|---|---|---|---|---|")
    linear_f32 = sum(m.kernel[...].nbytes for _, m in nnx.iter_modules(model) if isinstance(m, nnx.Linear))
    print(f"| float32 | {size['float_mib']:.1f} | {qnn.resident_bytes(model) / MiB:.1f} | "
          f"{qnn.resident_bytes(model) / size['float_bytes']:.3f} | {linear_f32 / MiB:.1f} | "
          f"{linear_f32 / MiB:.1f} | - |")
    ratios, int4 = {}, None
    for spec in args.specs.split(","):
        qm = qnn.quantize_model(model, [qnn.Rule(".*_proj", weight=spec)])
        cm = qnn.convert(qm)
        del qm
        gc.collect()
        acct = qnn.model_size(cm)["packed_bytes"]
        live = qnn.resident_bytes(cm)
        layers = [L.packed() for L in qnn.quantized_layers(cm).values()]
        q_acct = sum(packed_nbytes(p.spec, p.shape) for p in layers)
        q_live = sum(p.nbytes for p in layers)
        unpacked = sum(int(np.prod(p.shape)) + 4 * int(p.scale.size) * (2 if p.zero_point is not None else 1)
                       for p in layers)
        ratios[spec] = live / acct
        print(f"| {spec} | {acct / MiB:.1f} | {live / MiB:.1f} | {live / acct:.3f} | {q_acct / MiB:.1f} | "
              f"{q_live / MiB:.1f} | {unpacked / MiB:.1f} |")
        if spec == "int4/g128":
            int4 = cm
        else:
            del cm
        gc.collect()
    if int4 is None:
        int4 = qnn.convert(qnn.quantize_model(model, [qnn.Rule(".*_proj", weight="int4/g128")]))

    ids = tok.encode(PROMPT).ids
    best = {"float32": (None, None, 0.0), "int4/g128 packed": (None, None, 0.0)}
    round_ratios = []
    for r in range(args.rounds):
        tps_round = {}
        for name, m in (("float32", model), ("int4/g128 packed", int4)):
            out, prefill, tps = _timed_decode(m, ids, args.tokens)
            tps_round[name] = tps
            if tps > best[name][2]:
                best[name] = (out, prefill, tps)
        round_ratios.append(tps_round["int4/g128 packed"] / tps_round["float32"])
        print(f"round {r}: float32 {tps_round['float32']:.2f} tokens/s, int4/g128 packed "
              f"{tps_round['int4/g128 packed']:.2f} tokens/s ({round_ratios[-1]:.2f}x)")
    print()
    print(f"greedy decode of {args.tokens} tokens after a {len(ids)}-token prompt (KV cache), "
          f"{jax.devices()[0].platform}, best of {args.rounds}, XLA scheduler: "
          f"{'default' if args.xla_default_scheduler else 'plain (' + SCHEDULER_FLAG + ')'}:")
    print()
    print("| model | resident MiB | prefill s (first: + compile) | tokens/s | llama.cpp Q4_0 tokens/s |")
    print("|---|---|---|---|---|")
    for name, m in (("float32", model), ("int4/g128 packed", int4)):
        out, prefill, tps = best[name]
        print(f"| {name} | {qnn.resident_bytes(m) / MiB:.1f} | {prefill:.2f} | {tps:.2f} | - |")
    f_ids, q_ids = best["float32"][0], best["int4/g128 packed"][0]
    agree = next((i for i, (a, b) in enumerate(zip(f_ids, q_ids)) if a != b), min(len(f_ids), len(q_ids)))
    print(f"float32: {tok.decode(f_ids[:16])!r}...")
    print(f"int4:    {tok.decode(q_ids[:16])!r}... (the first {agree} tokens equal the float model's)")
    speed = best["int4/g128 packed"][2] / best["float32"][2]
    print("summary: resident/accounted " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items())
          + f"; decode int4/g128 packed / float32 tokens/s: best {speed:.2f}x "
          f"({best['int4/g128 packed'][2]:.1f} vs {best['float32'][2]:.1f}), median of rounds "
          f"{float(np.median(round_ratios)):.2f}x ({'default' if args.xla_default_scheduler else 'plain'} XLA scheduler)")


if __name__ == "__main__":
    main()
