"""The language-model family: Gemma 3 (``model = "gemma3"``: Gemma 3 270M; ``"gemma3_tiny"``: a random toy for
tests) and its methods ``float``, ``ptq_rtn``, ``ptq_gptq`` (``act_order``), ``ptq_awq``, ``ptq_hqq`` and ``qat``
(weight QAT of the projections from RTN or GPTQ, trained on the ``calibration`` text).

The model is loaded once per process. The study's rules apply to the attention and MLP projections; the
tied embedding and the attention's own products (q.k^T, p.v) stay float. Each run reports ``perplexity``
on the first ``eval_tokens`` tokens of the ``data`` text with its standard error over tokens (``perplexity_se``),
``float_perplexity`` (and ``float_perplexity_se``), ``perplexity_increase`` and the size metrics. GPTQ / AWQ calibrate on ``calibration_seqs`` x ``calibration_len`` tokens of the
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
from qlab.evaluate import perplexity_with_error
from qlab.models import gemma3 as G
from qlab.train import train

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
    choices={"calibration": (*AUSTEN_NOVELS, "tiny_text"), "qat_init": ("rtn", "gptq")}, check_data=_check_data,
    metric="perplexity"))

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


@functools.lru_cache(maxsize=4)
def _text_ids(model: str, name: str) -> np.ndarray:
    """The text's token ids without the tokenizer's BOS."""
    return np.asarray(lm_model(model)[1].encode(_text(name)).ids[1:], np.int32)


def _windows(model: str, name: str, length: int, starts) -> np.ndarray:
    """``(len(starts), length)`` int32: BOS + the text's ``length - 1`` tokens from each start."""
    ids, bos = _text_ids(model, name), lm_model(model)[0].config.bos_id
    return np.stack([np.concatenate([[bos], ids[s:s + length - 1]]) for s in starts]).astype(np.int32)


def _random_starts(model: str, name: str, length: int, setting: str, rng, n: int) -> np.ndarray:
    """``n`` random starts of ``length``-token windows of the text; ``setting`` (``"key = value"``) names what
    asked for that length in the error for a text too short."""
    n_ids = len(_text_ids(model, name))
    if n_ids <= length:
        raise ValueError(f"calibration text {name!r} has {n_ids} tokens: too short for {setting}")
    return rng.integers(0, n_ids - length, n)


def _calibration(model: str, calibration: str, seqs: int, length: int) -> np.ndarray:
    """``seqs`` windows of ``length`` tokens (BOS + text) at fixed random offsets (seed 0) of the text."""
    rng = np.random.default_rng(0)
    starts = _random_starts(model, calibration, length, f"calibration_len = {length}", rng, seqs)
    return _windows(model, calibration, length, starts)


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


def _perplexity_with(run, kernels: dict) -> tuple[float, float]:
    """Perplexity (and its standard error) of the shared float model with ``kernels`` swapped in (then restored).
    Kernels are fetched to the host first: they may live on a training mesh."""
    model, _ = lm_model(run["model"])
    linears = lm_linears(model)
    originals = {p: linears[p].kernel[...] for p in kernels}
    try:
        for p, w in kernels.items():
            linears[p].kernel.value = jnp.asarray(jax.device_get(w))
        return perplexity_with_error(model, _eval_ids(run["model"], run["data"], int(run["eval_tokens"])))
    finally:
        for p, w in originals.items():
            linears[p].kernel.value = w


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
    te = time.perf_counter()
    ppl, se = _perplexity_with(run, _effective_kernels(qm))
    metrics = {"perplexity": ppl, "perplexity_se": se, "float_perplexity": fppl, "float_perplexity_se": fse,
               "perplexity_increase": ppl - fppl, **size_metrics(qm),
               "quant_s": quant_s, "eval_s": time.perf_counter() - te, **extra}
    metrics["method_s"] = time.perf_counter() - t0
    return metrics, layer_table(qm, order)


@register("float", family="lm")
def run_float(run, progress=False):
    """The float model's perplexity on the evaluation text."""
    model, _ = lm_model(run["model"])
    fppl, fse, eval_s = _float_ppl(run["model"], run["data"], int(run["eval_tokens"]))
    return {"perplexity": fppl, "perplexity_se": fse, "float_perplexity": fppl, "float_perplexity_se": fse,
            "perplexity_increase": 0.0,
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


_gptq_cache: dict[tuple, tuple[Any, dict]] = {}


def _gptq(run, model, rules) -> tuple[Any, dict]:
    """GPTQ of the shared model under ``rules``, with its extra metrics; the last result is kept, so a ``qat``
    run from GPTQ right after ``ptq_gptq`` at the same settings reuses it (``gptq_reused`` = 1)."""
    key = (run["model"], repr(rules), *(run[k] for k in (*_CALIBRATION_KEYS, "act_order")))
    if key in _gptq_cache:
        qm, extra = _gptq_cache[key]
        return qm, {**extra, "shared_s": 0.0, "gptq_reused": 1}
    _gptq_cache.clear()  # a quantized copy of the model: keep one
    cal, extra = _calibration_args(run)
    qm = ptq.gptq(model, rules, act_order=bool(run["act_order"]), **cal)
    _gptq_cache[key] = (qm, extra)
    return qm, {**extra, "gptq_reused": 0}


@register("ptq_gptq", family="lm", reads=(*SPEC_KEYS, *_CALIBRATION_KEYS, "act_order"), check=_check)
def run_ptq_gptq(run, progress=False):
    """GPTQ of the projections (``act_order``), calibrated on the ``calibration`` text."""
    return _evaluate(run, lambda model, rules: _gptq(run, model, rules))


@register("ptq_awq", family="lm", reads=(*SPEC_KEYS, *_CALIBRATION_KEYS), check=_check)
def run_ptq_awq(run, progress=False):
    """AWQ of the projections, calibrated on the ``calibration`` text."""

    def quantize(model, rules):
        cal, extra = _calibration_args(run)
        return ptq.awq(model, rules, max_input_rows=512, **cal), extra

    return _evaluate(run, quantize)


def _is_projection_kernel(path, _value) -> bool:
    return path[-1] == "kernel"


#: What lm QAT trains: the projections' kernels (the tied embedding and the norms stay as loaded).
QAT_TRAINS = nnx.All(nnx.Param, _is_projection_kernel)


def qat_batches(run) -> np.ndarray:
    """``(qat_steps, batch_size, qat_seq_len + 1)`` int32 training batches: BOS + text windows at random offsets
    (seeded by ``seed``) of the ``calibration`` text; the model reads ``qat_seq_len`` tokens, predicts the next.

    Example:
        >>> from qlab.experiments import expand
        >>> run = expand({"base": {"method": "qat", "model": "gemma3_tiny", "data": "tiny_text",
        ...                        "calibration": "tiny_text", "qat_steps": 3, "batch_size": 2, "qat_seq_len": 8}})[0]
        >>> b = qat_batches(run)
        >>> b.shape, bool((b[:, :, 0] == lm_model("gemma3_tiny")[0].config.bos_id).all())
        ((3, 2, 9), True)
    """
    steps, batch, length = int(run["qat_steps"]), int(run["batch_size"]), int(run["qat_seq_len"]) + 1
    starts = _random_starts(run["model"], run["calibration"], length, f"qat_seq_len = {length - 1}",
                            np.random.default_rng(run.seed), steps * batch)
    return _windows(run["model"], run["calibration"], length, starts).reshape(steps, batch, length)


@register("qat", family="lm", reads=(*SPEC_KEYS, *_CALIBRATION_KEYS, "act_order", "qat_init", "qat_steps",
                                     "qat_learning_rate", "batch_size", "qat_seq_len"), check=_check)
def run_qat(run, progress=False):
    """Weight QAT (STE, Adam) of the projections' kernels from RTN or GPTQ (``qat_init``) on the ``calibration``
    text; the calibration keys and ``act_order`` set up the GPTQ start."""

    def quantize(model, rules):
        if run["qat_init"] == "gptq":
            gq, extra = _gptq(run, model, rules)
            start = _effective_kernels(gq)
        else:
            start, extra = {}, {"calib_tokens": 0}
        student = qnn.copy_model(model)
        for path, w in start.items():
            lm_linears(student)[path].kernel.value = w
        qm = qnn.quantize_model(student, rules, allow_unmatched=True)
        init_ppl, _ = _perplexity_with(run, _effective_kernels(qm))
        batches = qat_batches(run)
        hist = train(qm, iter(batches), loss="lm", learning_rate=float(run["qat_learning_rate"]), wrt=QAT_TRAINS,
                     progress=progress)
        return qm, {**extra, "init_perplexity": init_ppl, "qat_first_loss": hist.loss[0],
                    "qat_final_loss": hist.final_loss, "qat_tokens": int(batches[:, :, 1:].size), "qat_s": hist.seconds}

    return _evaluate(run, quantize)
