"""QAT training-step overhead vs float: qlab.nn (and Qwix's QAT, when installed).

Models: MLP 784-1024-1024-10 (batch 256) and the char Transformer (4 layers, d_model 256,
seq 128, batch 16). Schemes: W8A8 (int8 per-channel weights, int8 per-token dynamic
activations, which is what Qwix's QtRule does by default; all linear layers incl. embeddings/attention call
sites for the same rule `.*`)
and W4 g128 (int4 weights, groups of 128, float activations). One jitted Adam step per
call, state donated (the qlab.train pattern); per config: first-step time (trace + compile + run) and the median
of N steps, measured interleaved across configs in rounds so load changes hit all alike. Qwix's W8A8 runs twice:
with its default backward (multiplies by the float operands) and as ``qwix W8A8 qres`` with quantized residuals
(multiplies by the quantized operands: the fake-quant product's gradient, which qlab computes).

    python benchmarks/qat_overhead.py [--steps 10] [--rounds 3] [--no-qwix]

Prints a table and ends with one summary line of median step-time ratios vs float.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from qlab import nn as qnn
from qlab.models import MLP, Transformer, TransformerConfig

SCHEMES = {
    "W8A8": dict(weight="int8/ch", act="int8/ch"),  # per-channel weights, per-token activations (as Qwix)
    "W4g128": dict(weight="int4/g128p", act=None),  # padded groups: 784 = 6.125 x 128
}


def xent(model, batch):
    x, y = batch
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def lm(model, batch):
    logits = model(batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def make_step(model, loss_fn):
    opt = nnx.Optimizer(model, optax.adam(1e-4), wrt=nnx.Param)
    graphdef, state = nnx.split((model, opt))

    # the state is donated, as qlab.train's step does: outputs reuse the inputs' buffers instead of
    # fresh allocations, whose page faults otherwise add 0.1-1.5 ms of noise per step here
    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, batch):
        m, o = nnx.merge(graphdef, state)
        val, grads = nnx.value_and_grad(loss_fn)(m, batch)
        o.update(m, grads)
        return nnx.state((m, o)), val

    holder = {"state": state}

    def run(batch):
        holder["state"], v = step(holder["state"], batch)
        return v

    return run


def qwix_model(model, scheme, sample, quantized_residuals=False):
    """Qwix's QAT for ``scheme``. By default Qwix's backward multiplies by the float (unquantized)
    operands; ``quantized_residuals`` makes it multiply by the quantized ones, the gradient of the
    fake-quant product that qlab computes (Qwix's ``use_original_residuals=False``)."""
    import qwix

    s = SCHEMES[scheme]
    rule = qwix.QtRule(
        module_path=".*",
        weight_qtype="int8" if s["weight"].startswith("int8") else "int4",
        act_qtype="int8" if s["act"] else None,
        tile_size=128 if "g128" in s["weight"] else None,
        additional_qt_config={"use_original_residuals": False} if quantized_residuals else None,
    )
    return qwix.quantize_model(model, qwix.QtProvider([rule]), sample)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10, help="timed steps per config per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--no-qwix", action="store_true")
    ap.add_argument("--models", default="mlp,transformer")
    args = ap.parse_args(argv)
    try:
        if args.no_qwix:
            raise ImportError
        import qwix  # noqa: F401

        have_qwix = True
    except ImportError:
        have_qwix = False

    rng = np.random.default_rng(0)
    suites = {}
    if "mlp" in args.models:
        batch = (jnp.asarray(rng.normal(size=(256, 28, 28, 1)).astype(np.float32)),
                 jnp.asarray(rng.integers(0, 10, 256).astype(np.int32)))
        suites["mlp"] = (lambda: MLP(784, hidden=(1024, 1024), out=10, rngs=nnx.Rngs(0)), xent, batch, batch[0][:2])
    if "transformer" in args.models:
        cfg = TransformerConfig(vocab_size=96, d_model=256, n_layers=4, n_heads=4, d_ff=1024, max_len=128)
        toks = jnp.asarray(rng.integers(0, 96, (16, 129)).astype(np.int32))
        suites["transformer"] = (lambda: Transformer(cfg, rngs=nnx.Rngs(0)), lm, toks, toks[:2, :-1])

    rows = []
    for name, (build, loss_fn, batch, sample) in suites.items():
        configs = {"float": build()}
        for scheme, s in SCHEMES.items():
            configs[f"qlab {scheme}"] = qnn.quantize_model(build(), [qnn.Rule(".*", **s)])
            if have_qwix:
                variants = {f"qwix {scheme}": False}
                if s["act"]:  # tiled (g128) residuals are always the float ones in Qwix
                    variants[f"qwix {scheme} qres"] = True
                for label, qres in variants.items():
                    try:
                        configs[label] = qwix_model(build(), scheme, sample, quantized_residuals=qres)
                    except Exception as e:  # report and go on
                        print(f"{label} on {name} failed: {type(e).__name__}: {e}", flush=True)
        steps, first = {}, {}
        for label, model in configs.items():
            steps[label] = make_step(model, loss_fn)
            t0 = time.perf_counter()
            jax.block_until_ready(steps[label](batch))
            first[label] = time.perf_counter() - t0
        times = {label: [] for label in configs}
        for _ in range(args.rounds):
            for label in configs:
                run = steps[label]
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    jax.block_until_ready(run(batch))
                    times[label].append(time.perf_counter() - t0)
        base = statistics.median(times["float"])
        for label in configs:
            med = statistics.median(times[label])
            rows.append((name, label, first[label], med * 1e3, med / base))
            print(f"{name:12s} {label:19s} first {first[label]:7.2f}s  median {med * 1e3:8.2f} ms  "
                  f"x{med / base:5.3f}", flush=True)

    print()
    print(f"{'model':12s} {'config':19s} {'first step s':>12s} {'median ms':>10s} {'vs float':>9s}")
    for r in rows:
        print(f"{r[0]:12s} {r[1]:19s} {r[2]:12.2f} {r[3]:10.2f} {r[4]:9.3f}")
    print(f"(jax {jax.__version__}, {jax.devices()[0].platform}, {os.cpu_count()} CPUs, steps={args.steps}x{args.rounds} "
          f"rounds, qwix {'yes' if have_qwix else 'not installed'})")
    summary = ", ".join(f"{r[0]} {r[1]} {r[4]:.2f}x" for r in rows if r[1] != "float")
    print("SUMMARY step time vs float: " + summary)


if __name__ == "__main__":
    main()
