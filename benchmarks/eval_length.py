"""How many evaluation tokens does Gemma 3 270M's perplexity need? Standard errors against text length (issue #15).

    python benchmarks/eval_length.py [--lengths 1024,4096,16384] [--spec int4/g128]

Scores the float Gemma 3 270M and an RTN model (``--spec`` on every attention / MLP projection, embedding float)
on the first L tokens of Pride and Prejudice, for each L of ``--lengths``, in rows of 1,024 tokens (each row BOS +
the next 1,023 tokens of the text, so the first row is exactly the default evaluation of qlab's Gemma studies,
``eval_tokens = 1024``, and every row has the same context length). Both models run in one compiled program
(:func:`qlab.evaluate.compare_to_reference`) a few rows at a time; the per-part figures are pooled exactly (token
count, mean and standard error of the per-token NLL and of the paired NLL difference). Prints per length: float
perplexity and its se (absolute and relative), the quantized/float perplexity ratio and its paired se, and the
seconds spent (both models, cumulative), then a ``summary:`` line: the shortest length whose relative se of the
float perplexity is under 1%, and the same for the paired ratio. The standard errors treat tokens as independent
(as ``compare_to_reference`` does); neighbouring tokens are correlated, so they are lower bounds.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlab import ptq  # noqa: E402
from qlab.evaluate import compare_to_reference  # noqa: E402
from qlab.nn import Rule  # noqa: E402

PROJ = r"layers/\d+/(attn|mlp)/\w+_proj"
ROW = 1024


def pooled(parts: list[tuple[int, float, float]]) -> tuple[int, float, float]:
    """Pool ``(n, mean, se)`` of disjoint sets of values (se: sample std with ddof 1 over sqrt(n)) into the
    figures of their union, exactly.

    >>> rng = np.random.default_rng(0); x = rng.normal(size=100)
    >>> def mse(v): return len(v), v.mean(), v.std(ddof=1) / math.sqrt(len(v))
    >>> n, m, se = pooled([mse(x[:30]), mse(x[30:])])
    >>> n, bool(np.isclose(m, x.mean())), bool(np.isclose(se, mse(x)[2]))
    (100, True, True)
    """
    n = sum(p[0] for p in parts)
    s1 = sum(p[0] * p[1] for p in parts)
    s2 = sum((p[2] ** 2 * p[0]) * (p[0] - 1) + p[0] * p[1] ** 2 for p in parts)
    mean = s1 / n
    var = (s2 - n * mean ** 2) / (n - 1)
    return n, mean, math.sqrt(max(var, 0.0) / n)


def rows_of(ids: np.ndarray, bos: int, n_rows: int) -> np.ndarray:
    """``n_rows`` rows of ``ROW`` tokens: BOS + the next ``ROW - 1`` text tokens each (``ids`` without BOS).

    >>> rows_of(np.arange(10, 5000), 2, 2)[:, :3].tolist()
    [[2, 10, 11], [2, 1033, 1034]]
    """
    body = ids[: n_rows * (ROW - 1)].reshape(n_rows, ROW - 1)
    return np.concatenate([np.full((n_rows, 1), bos, ids.dtype), body], axis=1).astype(np.int32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--spec", default="int4/g128")
    ap.add_argument("--batch", type=int, default=4, help="rows per compiled call")
    ns = ap.parse_args()
    lengths = [int(v) for v in ns.lengths.split(",")]
    from qlab.data.text import load_austen  # deferred: the model stack loads only when the script runs
    from qlab.experiments.lm import lm_model

    t0 = time.time()
    model, tok = lm_model("gemma3")
    enc = tok.encode(load_austen("prideprejudice")).ids
    ids = np.asarray(enc[1:], np.int32)
    bos = int(enc[0])
    qm = ptq.rtn(model, [Rule("embed"), Rule(PROJ, weight=ns.spec)])
    print(f"loaded and quantized in {time.time() - t0:.0f}s; text {len(ids)} tokens", flush=True)
    n_rows = max(lengths) // ROW
    rows = rows_of(ids, bos, n_rows)
    # parts: row 0 alone, then batches that end on every requested length
    bounds = sorted({0, 1, *[min(n_rows, L // ROW) for L in lengths]})
    cuts = []
    for a, b in zip(bounds, bounds[1:]):
        cuts += [(s, min(s + ns.batch, b)) for s in range(a, b, ns.batch)]
    parts, elapsed, table = [], 0.0, []
    for a, b in cuts:
        t = time.time()
        c = compare_to_reference(qm, model, jnp.asarray(rows[a:b]), any_structure=True, chunk=128)
        elapsed += time.time() - t
        parts.append((c.tokens, math.log(c.ref_ppl), c.ref_ppl_se / c.ref_ppl, math.log(c.ppl_ratio),
                      c.ppl_ratio_se / c.ppl_ratio))
        if b * ROW in lengths or b == n_rows:
            n, m, se = pooled([(p[0], p[1], p[2]) for p in parts])
            _, d, dse = pooled([(p[0], p[3], p[4]) for p in parts])
            ppl, ratio = math.exp(m), math.exp(d)
            table.append(dict(tokens=b * ROW, scored=n, ppl=ppl, ppl_se=ppl * se, ppl_rel_se=se, ratio=ratio,
                              ratio_se=ratio * dse, ratio_rel_se=dse, seconds=elapsed))
            r = table[-1]
            print(f"  {r['tokens']:>6} tokens: float ppl {ppl:.3f} +- {r['ppl_se']:.3f} ({100 * se:.2f}%), "
                  f"{ns.spec} ratio {ratio:.4f} +- {r['ratio_se']:.4f} ({100 * dse:.2f}%), {elapsed:.0f}s", flush=True)
    print()
    print(f"| tokens | float ppl | se | se % | {ns.spec} RTN / float ppl | paired se | paired se % | seconds (both models) |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in table:
        print(f"| {r['tokens']:,} | {r['ppl']:.3f} | {r['ppl_se']:.3f} | {100 * r['ppl_rel_se']:.2f} | {r['ratio']:.4f} | "
              f"{r['ratio_se']:.4f} | {100 * r['ratio_rel_se']:.2f} | {r['seconds']:.0f} |")
    ppl_ok = next((r["tokens"] for r in table if r["ppl_rel_se"] < 0.01), None)
    ratio_ok = next((r["tokens"] for r in table if r["ratio_rel_se"] < 0.01), None)
    print(f"summary: float perplexity se < 1% from {ppl_ok if ppl_ok else '> ' + str(table[-1]['tokens'])} tokens "
          f"({100 * table[-1]['ppl_rel_se']:.2f}% at {table[-1]['tokens']}); {ns.spec} paired ratio se < 1% from "
          f"{ratio_ok if ratio_ok else '> ' + str(table[-1]['tokens'])} tokens "
          f"({100 * table[-1]['ratio_rel_se']:.2f}% at {table[-1]['tokens']}); total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
