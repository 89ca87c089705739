"""The language-model family: Gemma 3 (``model = "gemma3"``: Gemma 3 270M; ``"gemma3_tiny"``: a random toy for
tests) and its methods ``float``, ``ptq_rtn``, ``ptq_gptq`` (``act_order``), ``ptq_awq`` and ``ptq_hqq``.

The model is loaded once per process. The study's rules apply to the attention and MLP projections; the
tied embedding and the attention's own products (q.k^T, p.v) stay float. Each run reports ``perplexity``
on the first ``eval_tokens`` tokens of the ``data`` text with its standard error over tokens (``perplexity_se``),
``float_perplexity`` (and ``float_perplexity_se``), ``perplexity_increase``, the paired figures against the float
model on the same tokens (``ppl_ratio`` with ``ppl_ratio_se``, mean KL divergence ``kl``, top-1 agreement ``top1``,
each with its ``_se``; see :func:`qlab.evaluate.compare_to_reference`), ``collapsed`` (perplexity above the vocabulary
size) and the size metrics. GPTQ / AWQ calibrate on ``calibration_seqs`` x ``calibration_len`` tokens of the
``calibration`` text: block by block on the already-quantized predecessors (``sequential = true``; ``quant_s``
includes the captures), or with ``sequential = false`` on statistics of one float pass, captured once per
process and shared by the runs.

Example:
    >>> from qlab.experiments import expand
    >>> run = expand({"base": {"model": "gemma3_tiny", "data": "tiny_text", "eval_tokens": 32,
    ...                        "weight": "int8/ch"}})[0]
    >>> metrics, layers = run.method.run(run)
    >>> metrics["perplexity"] > 1, len(layers)
    (True, 43)
"""

from __future__ import annotations

import functools
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlab import nn as qnn
from qlab import ptq
from qlab.data.text import AUSTEN_NOVELS, load_austen
from qlab.evaluate import compare_to_reference, perplexity_with_error
from qlab.models import gemma3 as G

from . import methods
from .methods import SPEC_KEYS, Family, layer_table, register, register_family, size_metrics

__all__ = ["lm_model", "lm_linears", "layer_shapes", "TINY_TEXT"]

#: A short text for ``data`` / ``calibration`` = "tiny_text" (tests).
TINY_TEXT = ("the cat sat at the inn. the heat in the attic was a trial, and the cat ran. "
             "then the tenant came in. a cat, the cat, at that hour: there it sat, content. ") * 6
#: Projection layers (quantized by the study's rules); the tied embedding always stays float.
_PROJ = (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
#: Call sites (jnp.einsum / dot / matmul inside the attention) of a language model: always float.
_CALL_SITES = r"(.*/)?(einsum|dot|matmul|dot_general)_\d+"


def _check_data(name: str) -> None:
    if name == "austen":
        load_austen("prideprejudice")


FAMILY = register_family(Family(
    "lm", models=("gemma3", "gemma3_tiny"), datasets=("austen", "tiny_text"),
    reads=("model", "data", "eval_tokens", "seed"),
    choices={"calibration": (*AUSTEN_NOVELS, "tiny_text")}, check_data=_check_data, metric="perplexity"))

_models: dict[str, tuple[Any, Any]] = {}


def lm_model(name: str):
    """``(model, tokenizer)`` of a language model, loaded once per process (the shared float model:
    methods must not change it, or must restore it).

    Example:
        >>> lm_model("gemma3_tiny")[0].config.n_layers
        6
    """
    if name not in _models:
        if name == "gemma3":
            _models[name] = G.load_gemma3()
        else:
            _models[name] = (G.Gemma3(G.Gemma3Config.tiny(), rngs=nnx.Rngs(0)), G.build_tokenizer(*G.tiny_vocab(320)))
    return _models[name]


@functools.lru_cache(maxsize=16)
def _layer_shapes(name: str):
    c = G.Gemma3Config() if name == "gemma3" else G.Gemma3Config.tiny()
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"q_proj": (c.d_model, q), "k_proj": (c.d_model, kv), "v_proj": (c.d_model, kv), "o_proj": (q, c.d_model),
              "gate_proj": (c.d_model, c.ffn_dim), "up_proj": (c.d_model, c.ffn_dim), "down_proj": (c.ffn_dim, c.d_model)}
    return tuple((f"layers/{i}/{blk}/{n}", shapes[n]) for i in range(c.n_layers) for blk, names in _PROJ for n in names)


def layer_shapes(run) -> tuple[tuple[str, tuple[int, int]], ...]:
    """``((path, kernel shape), ...)`` of the projections the study's rules apply to (no model loaded).

    Example:
        >>> layer_shapes({"model": "gemma3_tiny"})[0]
        ('layers/0/attn/q_proj', (32, 64))
    """
    return _layer_shapes(run["model"])


def lm_linears(model) -> dict[str, nnx.Linear]:
    """``{path: nnx.Linear}`` of every attention / MLP projection of a Gemma 3 model.

    Example:
        >>> len(lm_linears(lm_model("gemma3_tiny")[0]))
        42
    """
    return {f"layers/{i}/{blk}/{n}": getattr(getattr(layer, blk), n)
            for i, layer in enumerate(model.layers) for blk, names in _PROJ for n in names}


def _check(run) -> None:
    methods.check_rules(run.rules, layer_shapes(run), run.method.name)


def _text(name: str) -> str:
    return TINY_TEXT if name == "tiny_text" else load_austen("prideprejudice" if name == "austen" else name)


@functools.lru_cache(maxsize=8)
def _eval_ids(model: str, data: str, eval_tokens: int):
    _, tok = lm_model(model)
    return jnp.asarray([tok.encode(_text(data)).ids[:eval_tokens]], jnp.int32)


@functools.lru_cache(maxsize=8)
def _float_ppl(model: str, data: str, eval_tokens: int) -> tuple[float, float, float]:
    t = time.perf_counter()
    ppl, se = perplexity_with_error(lm_model(model)[0], _eval_ids(model, data, eval_tokens))
    return ppl, se, time.perf_counter() - t


def _calibration(model: str, calibration: str, seqs: int, length: int) -> np.ndarray:
    """``seqs`` windows of ``length`` tokens (BOS + text) at fixed random offsets (seed 0) of the text."""
    m, tok = lm_model(model)
    ids = np.asarray(tok.encode(_text(calibration)).ids[1:], np.int32)
    if len(ids) <= length:
        raise ValueError(f"calibration text {calibration!r} has {len(ids)} tokens: too short for calibration_len = {length}")
    starts = np.random.default_rng(0).integers(0, len(ids) - length, seqs)
    return np.stack([np.concatenate([[m.config.bos_id], ids[s:s + length - 1]]) for s in starts]).astype(np.int32)


_stats_cache: dict[tuple, Any] = {}


def _float_pass_stats(model_name: str, calibration: str, seqs: int, length: int):
    """Calibration statistics of every projection's input, captured once (one float pass) per process."""
    key = (model_name, calibration, seqs, length)
    if key not in _stats_cache:
        _stats_cache.clear()  # large (Hessians): keep one set
        model = lm_model(model_name)[0]
        calib = _calibration(*key)
        proj = "|".join(map(re.escape, lm_linears(model)))
        qm0 = qnn.quantize_model(model, (qnn.Rule("embed"), qnn.Rule(proj, weight="int8/ch")), allow_unmatched=True)
        _stats_cache[key] = qnn.capture(qm0, [jnp.asarray(calib[i:i + 4]) for i in range(0, len(calib), 4)],
                                        forward=lambda m, b: m.features(b),
                                        stats=("hessian", "mean_abs", "absmax", "inputs"), max_input_rows=512)
    return _stats_cache[key]


def _effective_kernels(qmodel) -> dict[str, jax.Array]:
    """``{path: dequantize(q) / s}`` of every converted layer (``s``: an AWQ input scale)."""
    out = {}
    for path, layer in qnn.quantized_layers(qmodel).items():
        w = jnp.asarray(layer.weight_value())
        if getattr(layer, "input_scale", None) is not None:
            w = w / jnp.asarray(layer.input_scale[...]).reshape(-1, 1)
        out[path] = w
    return out


def _calibration_args(run) -> tuple[dict, dict]:
    """GPTQ / AWQ calibration arguments, and the metrics they add: ``calib_tokens`` and ``shared_s`` (the time
    of a one-pass capture shared by the runs, which ``quant_s`` leaves out)."""
    key = (run["model"], run["calibration"], int(run["calibration_seqs"]), int(run["calibration_len"]))
    extra = {"calib_tokens": key[2] * key[3], "shared_s": 0.0}
    if run["sequential"]:  # block by block: statistics depend on the run's own quantization
        calib = _calibration(*key)
        return dict(calibration_batches=[jnp.asarray(calib[i:i + 4]) for i in range(0, len(calib), 4)],
                    forward=lambda m, b: m.features(b), sequential=True), extra
    t = time.perf_counter()
    stats = _float_pass_stats(*key)
    extra["shared_s"] = time.perf_counter() - t
    return dict(calibration_batches=None, calibration_stats=stats), extra


def _comparison_metrics(c, vocab_size: int) -> dict:
    """The paired figures against the float model, and ``collapsed``: perplexity above the vocabulary size
    (worse than a uniform guess), which tables and plots show as collapsed rather than as a number."""
    return {"ppl_ratio": c.ppl_ratio, "ppl_ratio_se": c.ppl_ratio_se, "kl": c.kl, "kl_se": c.kl_se,
            "top1": c.top1, "top1_se": c.top1_se, "collapsed": bool(c.ppl > vocab_size)}


def _evaluate(run, quantize) -> tuple[dict, Any]:
    """Quantize the shared model's projections with ``quantize(model, rules) -> (qmodel, extra metrics)``
    and evaluate the result through the float model with the effective (fake-quantized) kernels swapped
    in, so every spec shares one compiled evaluation."""
    t0 = time.perf_counter()
    model, _ = lm_model(run["model"])
    key = (run["model"], run["data"], int(run["eval_tokens"]))
    fppl, fse, _ = _float_ppl(*key)
    linears = lm_linears(model)
    order = list(linears)
    rules = (qnn.Rule("embed"), qnn.Rule(_CALL_SITES)) + qnn.resolve_positions(run.rules, order)
    tq = time.perf_counter()
    qm, extra = quantize(model, rules)
    quant_s = time.perf_counter() - tq - extra.pop("shared_s", 0.0)
    kernels = _effective_kernels(qm)
    originals = {p: linears[p].kernel[...] for p in kernels}
    reference = nnx.clone(model)  # the float model, in variables of its own (merge would share them)
    te = time.perf_counter()
    try:
        for p, w in kernels.items():
            linears[p].kernel.value = w
        c = compare_to_reference(model, reference, _eval_ids(*key))
    finally:
        for p, w in originals.items():
            linears[p].kernel.value = w
    metrics = {"perplexity": c.ppl, "perplexity_se": c.ppl_se, "float_perplexity": fppl, "float_perplexity_se": fse,
               "perplexity_increase": c.ppl - fppl, **_comparison_metrics(c, model.config.vocab_size), **size_metrics(qm),
               "quant_s": quant_s, "eval_s": time.perf_counter() - te, **extra}
    metrics["method_s"] = time.perf_counter() - t0
    return metrics, layer_table(qm, order)


@register("float", family="lm")
def run_float(run, progress=False):
    """The float model's perplexity on the evaluation text."""
    model, _ = lm_model(run["model"])
    fppl, fse, eval_s = _float_ppl(run["model"], run["data"], int(run["eval_tokens"]))
    return {"perplexity": fppl, "perplexity_se": fse, "float_perplexity": fppl, "float_perplexity_se": fse,
            "perplexity_increase": 0.0, "ppl_ratio": 1.0, "ppl_ratio_se": 0.0, "kl": 0.0, "kl_se": 0.0, "top1": 1.0,
            "top1_se": 0.0, "collapsed": bool(fppl > model.config.vocab_size),
            **size_metrics(qnn.quantize_model(model, (), allow_unmatched=True)), "eval_s": eval_s}, None


@register("ptq_rtn", family="lm", reads=SPEC_KEYS, check=_check)
def run_ptq_rtn(run, progress=False):
    """Round-to-nearest quantization of the projections."""
    return _evaluate(run, lambda model, rules: (ptq.rtn(model, rules), {"calib_tokens": 0}))


@register("ptq_hqq", family="lm", reads=SPEC_KEYS, check=_check)
def run_ptq_hqq(run, progress=False):
    """HQQ (half-quadratic zero point and scale search, no calibration data) of the projections."""
    return _evaluate(run, lambda model, rules: (ptq.hqq(model, rules), {"calib_tokens": 0}))


_CALIBRATION_KEYS = ("calibration", "calibration_seqs", "calibration_len", "sequential")


@register("ptq_gptq", family="lm", reads=(*SPEC_KEYS, *_CALIBRATION_KEYS, "act_order"), check=_check)
def run_ptq_gptq(run, progress=False):
    """GPTQ of the projections (``act_order``), calibrated on the ``calibration`` text."""

    def quantize(model, rules):
        cal, extra = _calibration_args(run)
        return ptq.gptq(model, rules, act_order=bool(run["act_order"]), **cal), extra

    return _evaluate(run, quantize)


@register("ptq_awq", family="lm", reads=(*SPEC_KEYS, *_CALIBRATION_KEYS), check=_check)
def run_ptq_awq(run, progress=False):
    """AWQ of the projections, calibrated on the ``calibration`` text."""

    def quantize(model, rules):
        cal, extra = _calibration_args(run)
        return ptq.awq(model, rules, max_input_rows=512, **cal), extra

    return _evaluate(run, quantize)
