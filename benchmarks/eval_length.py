"""How many evaluation tokens does Gemma 3 270M's perplexity need? Standard errors against text length (issue #15).

    python benchmarks/eval_length.py [--lengths 1024,4096,16384] [--spec int4/g128] [--float-only]

Scores the float Gemma 3 270M and an RTN model (``--spec`` on every attention / MLP projection, embedding float;
``--float-only``: the float model alone, about half the time) on the first L tokens of Pride and Prejudice, for
each L of ``--lengths``, in rows of 1,024 tokens (:func:`qlab.evaluate.bos_rows`: each row BOS + the next 1,023
tokens of the text), as qlab's Gemma studies evaluate ``eval_tokens = L`` (the first row alone is exactly
``eval_tokens = 1024``). The models run ``--batch`` rows per compiled call, logits ``256 // batch`` positions per
row at a time, as the studies run them (:func:`qlab.evaluate.paired_token_stats`, :func:`qlab.evaluate.token_nll`);
the per-token figures are pooled by concatenation and summarised as the studies summarise them
(:meth:`qlab.evaluate.ReferenceComparison.from_token_stats`, :func:`qlab.evaluate.perplexity_from_nll`). Prints per
length: float perplexity and its se (absolute and relative), the quantized/float perplexity ratio and its paired se
(unless ``--float-only``), and the seconds spent scoring (cumulative), then a ``summary:`` line: the shortest
length (a multiple of 1,024, every one up to the longest checked) from which the relative se of the float perplexity
stays under 1%, and the same for the paired ratio. The standard errors treat tokens as independent (as
``compare_to_reference`` does); neighbouring tokens are correlated, so they are lower bounds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from qlab import ptq  # noqa: E402
from qlab.evaluate import ReferenceComparison, bos_rows, paired_token_stats, perplexity_from_nll, token_nll  # noqa: E402
from qlab.nn import Rule  # noqa: E402

PROJ = r"layers/\d+/(attn|mlp)/\w+_proj"
ROW = 1024


def from_rows(rel_se: list[float], limit: float = 0.01) -> int | None:
    """The smallest row count ``r`` (1-based) with ``rel_se[r' - 1] < limit`` for every ``r' >= r``, or None.

    >>> from_rows([0.03, 0.009, 0.011, 0.008, 0.007]), from_rows([0.02, 0.011])
    (4, None)
    """
    r = None
    for i in range(len(rel_se), 0, -1):
        if rel_se[i - 1] >= limit:
            break
        r = i
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", default="1024,4096,16384")
    ap.add_argument("--spec", default="int4/g128")
    ap.add_argument("--float-only", action="store_true", help="score the float model alone")
    ap.add_argument("--batch", type=int, default=4, help="rows per compiled call")
    ns = ap.parse_args()
    lengths = [int(v) for v in ns.lengths.split(",")]
    if any(L % ROW for L in lengths):
        ap.error(f"--lengths: multiples of {ROW}")
    from qlab.data.text import load_austen  # deferred: the model stack loads only when the script runs
    from qlab.experiments.lm import lm_model

    t0 = time.time()
    model, tok = lm_model("gemma3")
    enc = tok.encode(load_austen("prideprejudice")).ids
    qm = None if ns.float_only else ptq.rtn(model, [Rule("embed"), Rule(PROJ, weight=ns.spec)])
    print(f"loaded{'' if qm is None else ' and quantized'} in {time.time() - t0:.0f}s; text {len(enc)} tokens "
          f"(BOS + {len(enc) - 1}: room for {(len(enc) - 1) // (ROW - 1)} rows of {ROW})", flush=True)
    n_rows = max(lengths) // ROW
    rows = bos_rows(enc, ROW, n_rows)
    # calls: row 0 alone (the 1,024-token evaluation, as the studies run it), then batches ending on every length
    bounds = sorted({0, 1, *[L // ROW for L in lengths]})
    cuts = []
    for a, b in zip(bounds, bounds[1:]):
        cuts += [(s, min(s + ns.batch, b)) for s in range(a, b, ns.batch)]
    parts, elapsed, table, ppl_rel, ratio_rel = [], 0.0, [], [], []
    for a, b in cuts:
        t = time.time()
        chunk = 256 // min(b - a, ns.batch)
        if qm is None:
            parts.append({"ref_nll": token_nll(model, rows[a:b], chunk)})
        else:
            parts.append(paired_token_stats(qm, model, rows[a:b], any_structure=True, chunk=chunk))
        elapsed += time.time() - t
        pooled = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        for r in range(a + 1, b + 1):  # the figures at every row count, for the summary
            ppl, se = perplexity_from_nll(pooled["ref_nll"][:r])
            ppl_rel.append(se / ppl)
            if qm is not None:
                c = ReferenceComparison.from_token_stats({k: v[:r] for k, v in pooled.items()})
                ratio_rel.append(c.ppl_ratio_se / c.ppl_ratio)
        if b * ROW in lengths:
            ppl, se = perplexity_from_nll(pooled["ref_nll"])
            r = dict(tokens=b * ROW, scored=pooled["ref_nll"].size, ppl=ppl, ppl_se=se, ppl_rel_se=se / ppl,
                     seconds=elapsed)
            line = f"  {r['tokens']:>6} tokens: float ppl {ppl:.3f} +- {se:.3f} ({100 * se / ppl:.2f}%)"
            if qm is not None:
                c = ReferenceComparison.from_token_stats(pooled)
                r.update(ratio=c.ppl_ratio, ratio_se=c.ppl_ratio_se, ratio_rel_se=c.ppl_ratio_se / c.ppl_ratio)
                line += f", {ns.spec} ratio {c.ppl_ratio:.4f} +- {c.ppl_ratio_se:.4f} ({100 * r['ratio_rel_se']:.2f}%)"
            table.append(r)
            print(f"{line}, {elapsed:.0f}s", flush=True)
    print()
    who = "float model" if qm is None else "both models"
    if qm is None:
        print(f"| tokens | float ppl | se | se % | seconds ({who}) |")
        print("|--:|--:|--:|--:|--:|")
    else:
        print(f"| tokens | float ppl | se | se % | {ns.spec} RTN / float ppl | paired se | paired se % | "
              f"seconds ({who}) |")
        print("|--:|--:|--:|--:|--:|--:|--:|--:|")
    for r in table:
        cells = [f"{r['tokens']:,}", f"{r['ppl']:.3f}", f"{r['ppl_se']:.3f}", f"{100 * r['ppl_rel_se']:.2f}"]
        if qm is not None:
            cells += [f"{r['ratio']:.4f}", f"{r['ratio_se']:.4f}", f"{100 * r['ratio_rel_se']:.2f}"]
        print("| " + " | ".join(cells + [f"{r['seconds']:.0f}"]) + " |")
    last = n_rows * ROW

    def reach(rel, what):
        r = from_rows(rel)
        return (f"{what} se < 1% from {r * ROW if r else '> ' + str(last)} tokens "
                f"({100 * rel[-1]:.2f}% at {last})")

    tail = "" if qm is None else "; " + reach(ratio_rel, f"{ns.spec} paired ratio")
    print(f"summary: {reach(ppl_rel, 'float perplexity')}{tail}; scoring {elapsed:.0f}s "
          f"({elapsed / n_rows:.1f}s per 1,024 tokens, {who}); total {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
