"""The language-model family: Gemma 3 (``model = "gemma3"``: Gemma 3 270M; ``"gemma3_tiny"``: a random toy for
tests) and its methods ``float``, ``ptq_rtn``, ``ptq_gptq`` (``act_order``), ``ptq_awq``, ``ptq_hqq`` and ``qat``
(weight QAT of the projections from RTN or GPTQ, trained on the ``calibration`` text); the ablation methods
``ptq_smoothquant``, ``rtn_salient`` and ``zero_outliers`` are in :mod:`qlab.experiments.lm_ablations`.

The model is loaded once per process. The built-in rule sets (``all``, ``first_last_*``: ``@first`` / ``@last``
are projections) apply to the attention and MLP projections, and the tied embedding stays float; a study's own
``[rule_sets]`` are matched against the embedding too (path ``embed``, first match wins as in Python, so a ``.*``
rule quantizes it; ``{pattern = "embed", weight = "int8/ch"}`` names it), and what no rule matches stays float.
An embedding's spec resolves per token row (``int8/ch`` = one scale per row, ``int4/g32`` = groups along the row);
GPTQ / AWQ calibrate it as the tied output head, on the final hidden states. The attention's own products
(q.k^T, p.v) stay float. Weight-only runs are evaluated through the float model with their effective kernels
swapped in (one compiled evaluation for every spec); runs that quantize inputs (``act``; ``ptq_rtn``'s
``outlier_threshold``: LLM.int8's decomposition) evaluate the quantized model itself. Each run reports ``perplexity``
on the first ``eval_tokens`` tokens of the ``data`` text with its standard error over tokens (``perplexity_se``;
up to 1,024 tokens one sequence, beyond that rows of 1,024: BOS + the next 1,023 text tokens each, a few rows per
compiled call, their per-token figures pooled),
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

import contextlib
import functools
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import pandas as pd

from qlab import analysis, ptq
from qlab import nn as qnn
from qlab.data.text import AUSTEN_NOVELS, load_austen, load_text
from qlab.evaluate import bos_rows, compare_to_reference, perplexity_with_error
from qlab.models import gemma3 as G
from qlab.train import lm_loss, train

from . import methods, search
from .methods import SEARCH_KEYS, SPEC_KEYS, Family, layer_table, register, register_family, size_metrics
from .study import BUILTIN_RULE_SETS

__all__ = ["lm_model", "lm_linears", "layer_shapes", "search_costs", "calibration_windows", "TINY_TEXT", "evaluate_run",
           "float_pass_stats", "check_run", "check_eval_tokens", "eval_ids", "eval_kwargs", "float_perplexity",
           "comparison_metrics"]

#: A short text for ``data`` / ``calibration`` = "tiny_text" (tests).
TINY_TEXT = ("the cat sat at the inn. the heat in the attic was a trial, and the cat ran. "
             "then the tenant came in. a cat, the cat, at that hour: there it sat, content. ") * 6
#: Projection layers (quantized by the study's rules; the tied embedding by a study's own rule sets only).
_PROJ = (("attn", ("q_proj", "k_proj", "v_proj", "o_proj")), ("mlp", ("gate_proj", "up_proj", "down_proj")))
#: Call sites (jnp.einsum / dot / matmul inside the attention) of a language model: always float.
_CALL_SITES = r"(.*/)?(einsum|dot|matmul|dot_general)_\d+"


def _check_data(name: str) -> None:
    if name == "austen":
        load_austen("prideprejudice")


FAMILY = register_family(Family(
    "lm", models=("gemma3", "gemma3_tiny"), datasets=("austen", "tiny_text"),
    reads=("model", "data", "eval_tokens", "seed"),
    choices={"calibration": (*AUSTEN_NOVELS, "kjv", "fortunes", "tiny_text"), "qat_init": ("rtn", "gptq"),
             "smooth": ("norm_inputs", "all", "none"), "act_scales": ("dynamic", "static"),
             "saliency": ("activation", "weight", "random"), "zero_dims": ("systematic", "random")},
    check_data=_check_data,
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


def _config(name: str):
    return G.Gemma3Config() if name == "gemma3" else G.Gemma3Config.tiny()


@functools.lru_cache(maxsize=16)
def _candidate_costs(name: str, candidates: tuple[str, ...], spec: str | None, embed: bool = False):
    shapes = _layer_shapes(name) + ((_embed_shape(name),) if embed else ())
    per_shape = {}
    for shape in dict.fromkeys(s for _, s in shapes):  # a throwaway Linear per distinct shape: bytes need shapes only
        lin = nnx.Linear(*shape, use_bias=False, kernel_init=nnx.initializers.zeros, rngs=nnx.Rngs(0))
        per_shape[shape] = (analysis.candidate_table(lin, candidates),
                            None if spec is None else analysis.candidate_table(lin, [spec]))

    def table(i):
        return pd.concat([per_shape[s][i].assign(layer=p) for p, s in shapes], ignore_index=True)

    abstract = nnx.eval_shape(lambda: G.Gemma3(_config(name), rngs=nnx.Rngs(0)))
    total = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    searched = sum(int(np.prod(s)) for _, s in shapes)
    return table(0), 4 * (total - searched), None if spec is None else table(1)


def search_costs(run):
    """``(candidate table, bytes outside the searched weights, table of a spec-string budget or None)`` of a
    searched run: the projections the study's rules apply to, and the tied embedding (as its output head's
    ``(d_model, vocab)`` kernel) with ``search_embed`` (no model loaded: shapes only).

    Example:
        >>> from qlab.experiments import expand
        >>> run = expand({"base": {"model": "gemma3_tiny", "data": "tiny_text", "budget_bpw": "int4/ch"}})[0]
        >>> t, other, spec_table = search_costs(run)
        >>> len(t) == 42 * 4, int(spec_table["bytes"].sum()) == search.check_search(run.search, t, other, spec_table)
        (True, True)
    """
    s = run.search
    return _candidate_costs(run["model"], s.candidates, s.budget if isinstance(s.budget, str) else None,
                            bool(run["search_embed"]))


def check_run(run) -> None:
    """The study-load checks of an lm run that quantizes: ``eval_tokens``, ``outlier_threshold`` (needs ``act``), its
    rules against the model's layers (or its search); raises ValueError (the study reports it as a ConfigError).

    Example:
        >>> from qlab.experiments import expand
        >>> check_run(expand({"base": {"model": "gemma3_tiny", "data": "tiny_text", "eval_tokens": 64,
        ...                            "weight": "int4/g16"}})[0])
    """
    check_eval_tokens(run)
    if run.get("outlier_threshold") is not None and run.act is None:
        raise ValueError(f"outlier_threshold = {run['outlier_threshold']} decomposes the quantized inputs: set act "
                         "(e.g. act = \"int8/ch\", LLM.int8's per-token int8)")
    if run.search is not None:
        search.check_search(run.search, *search_costs(run))
        return
    rules = qnn.resolve_positions(run.rules, [p for p, _ in layer_shapes(run)])
    shapes = layer_shapes(run) + ((_embed_shape(run["model"]),) if _rules_see_embed(run) else ())
    methods.check_rules(rules, shapes, run.method.name)


def _embed_shape(name: str) -> tuple[str, tuple[int, int]]:
    """The tied embedding as its output head's ``(d_model, vocab)`` kernel: groups run along d_model, as they do
    in the ``(vocab, d_model)`` table's rows."""
    c = _config(name)
    return "embed", (c.d_model, c.vocab_size)


def _rules_see_embed(run) -> bool:
    """True when the run's rules are matched against the embedding: a study's own rule set (not a built-in one),
    or a searched allocation with ``search_embed``."""
    if run.search is not None:
        return bool(run["search_embed"])
    return run.rule_set not in BUILTIN_RULE_SETS


def _run_rules(run, own, order) -> tuple:
    """The rules a run quantizes with: call sites float, its own rules (the study's or a searched allocation's;
    ``@first`` / ``@last`` resolved over the projections), the embedding float unless the study's own rule set
    matched it first."""
    rules = qnn.resolve_positions(own, order)
    if _rules_see_embed(run):
        return (qnn.Rule(_CALL_SITES),) + rules + (qnn.Rule("embed"),)
    return (qnn.Rule("embed"), qnn.Rule(_CALL_SITES)) + rules


def _quantizes_embed(rules) -> bool:
    r = qnn.first_match(rules, "embed")
    return r is not None and r.weight is not None


def _search_rules(run, model):
    """``(rules, extra metrics, (allocation, sensitivity table))`` of a searched run: sensitivity of the float projections (once per
    (model, method, candidates, calibration) in a process; data-driven methods use the next-token loss on the
    calibration windows), then the least predicted damage within the budget."""
    s = run.search
    table, other, spec_table = search_costs(run)
    budget = search.check_search(s, table, other, spec_table)
    cal_key = (run["model"], run["calibration"], int(run["calibration_seqs"]), int(run["calibration_len"]))

    def compute():
        data = None
        if s.sensitivity != "sqnr":
            calib = _calibration(*cal_key)
            data = (lm_loss, [jnp.asarray(calib[i:i + 4]) for i in range(0, len(calib), 4)])
        return analysis.sensitivity(model, table, s.sensitivity, data=data)

    key = ((*cal_key, s.sensitivity) if s.sensitivity != "sqnr" else (run["model"], "sqnr")) + (
        s.candidates, bool(run["search_embed"]))
    scores, sens_s = search.sensitivity_table(key, compute)
    rules, alloc, extra = search.searched_rules(s, scores, budget, run.act)
    return rules, {**extra, "sensitivity_s": sens_s}, (alloc, scores)


def _text(name: str) -> str:
    if name in ("kjv", "fortunes"):  # other-domain calibration text (King James Bible, Debian fortunes)
        return load_text(name)
    return TINY_TEXT if name == "tiny_text" else load_austen("prideprejudice" if name == "austen" else name)


#: Evaluations of more than this many tokens run in rows of this many: BOS + the next EVAL_ROW - 1 text tokens.
EVAL_ROW = 1024
#: Rows per compiled evaluation call; each row's logits are made 256 // rows positions at a time, so a call holds
#: about as many logits (256 x vocab per model) as a one-row evaluation.
_EVAL_ROWS_PER_STEP = 4


def _eval_rows(eval_tokens: int) -> tuple[int, int]:
    """``(row_len, n_rows)`` of an evaluation of ``eval_tokens`` tokens: one row up to ``EVAL_ROW``, beyond that
    ``eval_tokens / EVAL_ROW`` rows of ``EVAL_ROW`` (a multiple of it is required).

    Example:
        >>> _eval_rows(64), _eval_rows(1024), _eval_rows(86016)
        ((64, 1), (1024, 1), (1024, 84))
    """
    if eval_tokens <= EVAL_ROW:
        return eval_tokens, 1
    if eval_tokens % EVAL_ROW:
        raise ValueError(f"eval_tokens = {eval_tokens}: above {EVAL_ROW} it must be a multiple of {EVAL_ROW} (rows "
                         f"of BOS + {EVAL_ROW - 1} text tokens), e.g. {eval_tokens // EVAL_ROW * EVAL_ROW} or "
                         f"{(eval_tokens // EVAL_ROW + 1) * EVAL_ROW}")
    return EVAL_ROW, eval_tokens // EVAL_ROW


def check_eval_tokens(run) -> None:
    """Study-load check of ``eval_tokens`` (the text's length is checked when the run evaluates: that needs the
    tokenizer).

    Example:
        >>> from qlab.experiments import expand
        >>> check_eval_tokens(expand({"base": {"model": "gemma3_tiny", "data": "tiny_text", "method": "float",
        ...                                    "eval_tokens": 2048}})[0])
    """
    _eval_rows(int(run["eval_tokens"]))


@functools.lru_cache(maxsize=8)
def eval_ids(model: str, data: str, eval_tokens: int):
    """``[n_rows, row_len]`` int32: the evaluation rows (:func:`_eval_rows`, :func:`qlab.evaluate.bos_rows`).

    Example:
        >>> eval_ids("gemma3_tiny", "tiny_text", 64).shape
        (1, 64)
    """
    row_len, n_rows = _eval_rows(eval_tokens)
    ids = lm_model(model)[1].encode(_text(data)).ids
    if len(ids) < 1 + n_rows * (row_len - 1):
        room = (len(ids) - 1) // (EVAL_ROW - 1) * EVAL_ROW if len(ids) > EVAL_ROW else len(ids)
        raise ValueError(f"eval_tokens = {eval_tokens} is more than the data text {data!r} holds: it has {len(ids)} "
                         f"tokens (BOS + {len(ids) - 1}), room for eval_tokens <= {room}"
                         + (f" ({room // EVAL_ROW} rows of BOS + {EVAL_ROW - 1})" if room > EVAL_ROW else ""))
    return jnp.asarray(bos_rows(ids, row_len, n_rows))


def eval_kwargs(ids, quantized_inputs: bool = False) -> dict:
    """How :mod:`qlab.evaluate` runs the evaluation rows ``ids`` (:func:`eval_ids`; one row: as before rows existed,
    bit for bit): the logit ``chunk`` and ``rows_per_step``; half the chunk for a model that quantizes its inputs
    (its quantizers hold more).

    Example:
        >>> eval_kwargs(np.zeros((1, 1024))), eval_kwargs(np.zeros((8, 1024)), quantized_inputs=True)
        ({'chunk': 256, 'rows_per_step': 4}, {'chunk': 32, 'rows_per_step': 4})
    """
    chunk = 256 // min(len(ids), _EVAL_ROWS_PER_STEP)
    return {"chunk": max(1, chunk // 2) if quantized_inputs else chunk, "rows_per_step": _EVAL_ROWS_PER_STEP}


@functools.lru_cache(maxsize=8)
def float_perplexity(model: str, data: str, eval_tokens: int) -> tuple[float, float, float]:
    """``(perplexity, its standard error, seconds)`` of the float model on the evaluation rows (once per process).

    Example:
        >>> ppl, se, _ = float_perplexity("gemma3_tiny", "tiny_text", 64)
        >>> ppl > 1 and 0 < se < ppl
        True
    """
    ids = eval_ids(model, data, eval_tokens)
    t = time.perf_counter()
    ppl, se = perplexity_with_error(lm_model(model)[0], ids, **eval_kwargs(ids))
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


def calibration_windows(model: str, text: str, seqs: int = 32, length: int = 256) -> np.ndarray:
    """The calibration tokens of qlab's Gemma studies: ``(seqs, length)`` int32, ``seqs`` windows of the text
    (``"emma"``: Emma, ``"tiny_text"`` for ``gemma3_tiny``), each BOS + ``length - 1`` tokens from a random start
    (seed 0; the same windows as the ``calibration*`` keys of an ``lm`` study pick).

    Example:
        >>> w = calibration_windows("gemma3_tiny", "tiny_text", seqs=3, length=8)
        >>> w.shape, bool((w[:, 0] == lm_model("gemma3_tiny")[0].config.bos_id).all())
        ((3, 8), True)
    """
    return _calibration(model, text, seqs, length)


_stats_cache: dict[tuple, Any] = {}
_CALIBRATION_KEYS = ("calibration", "calibration_seqs", "calibration_len", "sequential")


def _calibration_forward(with_head: bool):
    """The calibration forward: hidden states only, or the logits too when the embedding (the tied head) is
    calibrated (its statistics are those of the head's input)."""
    return (lambda m, b: m(b)) if with_head else (lambda m, b: m.features(b))


def float_pass_stats(model_name: str, calibration: str, seqs: int, length: int, with_head: bool = False):
    """Calibration statistics of every projection's input (and of the tied head's, ``with_head``), captured once
    (one float pass) per process: per layer ``hessian``, ``mean_abs``, ``absmax``, up to 512 ``inputs`` rows and the token ``count``, as
    :func:`qlab.nn.capture` returns them. The runs of a process that share a calibration setting share them.

    Example:
        >>> st = float_pass_stats("gemma3_tiny", "tiny_text", 2, 16)
        >>> sorted(st["layers/0/attn/q_proj"])
        ['absmax', 'count', 'hessian', 'inputs', 'mean_abs']
    """
    key = (model_name, calibration, seqs, length, with_head)
    if key not in _stats_cache:
        _stats_cache.clear()  # large (Hessians): keep one set
        model = lm_model(model_name)[0]
        calib = _calibration(*key[:4])
        proj = "|".join(map(re.escape, lm_linears(model))) + ("|embed" if with_head else "")
        qm0 = qnn.quantize_model(model, (qnn.Rule(proj, weight="int8/ch"),), allow_unmatched=True)
        _stats_cache[key] = qnn.capture(qm0, [jnp.asarray(calib[i:i + 4]) for i in range(0, len(calib), 4)],
                                        forward=_calibration_forward(with_head),
                                        stats=("hessian", "mean_abs", "absmax", "inputs"), max_input_rows=512)
    return _stats_cache[key]


def _effective_kernels(qmodel) -> dict[str, jax.Array]:
    """``{path: dequantize(q) / s}`` of every converted layer (``s``: an AWQ input scale)."""
    out = {}
    for path, layer in qnn.quantized_layers(qmodel).items():
        w = jnp.asarray(layer.weight_value())
        if getattr(layer, "input_scale", None) is not None:  # along the contraction axis (rows of a table)
            shape = [1, 1]
            shape[layer.contract_axis] = -1
            w = w / jnp.asarray(layer.input_scale[...]).reshape(shape)
        out[path] = w
    return out


def _calibration_args(run, rules) -> tuple[dict, dict]:
    """GPTQ / AWQ calibration arguments, and the metrics they add: ``calib_tokens`` and ``shared_s`` (the time
    of a one-pass capture shared by the runs, which ``quant_s`` leaves out)."""
    key = (run["model"], run["calibration"], int(run["calibration_seqs"]), int(run["calibration_len"]))
    extra = {"calib_tokens": key[2] * key[3], "shared_s": 0.0}
    with_head = _quantizes_embed(rules)
    if run["sequential"]:  # block by block: statistics depend on the run's own quantization
        calib = _calibration(*key)
        return dict(calibration_batches=[jnp.asarray(calib[i:i + 4]) for i in range(0, len(calib), 4)],
                    forward=_calibration_forward(with_head), sequential=True), extra
    t = time.perf_counter()
    stats = float_pass_stats(*key, with_head)
    extra["shared_s"] = time.perf_counter() - t
    return dict(calibration_batches=None, calibration_stats=stats), extra


def comparison_metrics(c, vocab_size: int) -> dict:
    """The paired figures against the float model, and ``collapsed``: perplexity above the vocabulary size
    (worse than a uniform guess), which tables and plots show as collapsed rather than as a number.

    Example:
        >>> from qlab.evaluate import ReferenceComparison
        >>> comparison_metrics(ReferenceComparison(8, 12.0, 1.0, 10.0, 0.9, 1.2, 0.01, 0.05, 0.01, 0.9, 0.03), 10)["collapsed"]
        True
    """
    return {"ppl_ratio": c.ppl_ratio, "ppl_ratio_se": c.ppl_ratio_se, "kl": c.kl, "kl_se": c.kl_se,
            "top1": c.top1, "top1_se": c.top1_se, "collapsed": bool(c.ppl > vocab_size)}


@contextlib.contextmanager
def _weights_swapped(model, kernels: dict):
    """The shared float model with ``kernels`` ({projection path or "embed": weight}) swapped in, restored on
    exit. Weights are fetched to the host first: they may live on a training mesh."""
    weights = {**{p: lin.kernel for p, lin in lm_linears(model).items()}, "embed": model.embed.embedding}
    originals = {p: weights[p][...] for p in kernels}
    try:
        for p, w in kernels.items():
            weights[p].value = jnp.asarray(jax.device_get(w))
        yield model
    finally:
        for p, w in originals.items():
            weights[p].value = w


def _perplexity_with(run, kernels: dict) -> tuple[float, float]:
    """Perplexity (and its standard error) of the shared float model with ``kernels`` swapped in."""
    ids = eval_ids(run["model"], run["data"], int(run["eval_tokens"]))
    with _weights_swapped(lm_model(run["model"])[0], kernels) as model:
        return perplexity_with_error(model, ids, **eval_kwargs(ids))


def _quantizes_inputs(rules) -> bool:
    """Whether any rule quantizes a layer's input (an ``act`` spec, or LLM.int8's decomposition)."""
    return any(r.act is not None or r.outlier_threshold is not None for r in rules)


def evaluate_run(run, quantize) -> tuple[dict, Any]:
    """Quantize the shared model's projections with ``quantize(model, rules) -> (qmodel, extra metrics)``
    and evaluate the result through the float model with the effective (fake-quantized) kernels swapped
    in, so every spec shares one compiled evaluation; ``extra["kernels"]`` (popped) overrides those kernels
    (``{path: effective kernel}``). Runs that quantize activations evaluate the quantized model itself. Returns
    ``(metrics, per-layer table)``: the building block of the family's quantizing methods.

    Example:
        >>> from qlab import ptq
        >>> from qlab.experiments import expand
        >>> run = expand({"base": {"model": "gemma3_tiny", "data": "tiny_text", "eval_tokens": 64,
        ...                        "weight": "int8/ch"}})[0]
        >>> metrics, layers = evaluate_run(run, lambda model, rules: (ptq.rtn(model, rules), {}))
        >>> metrics["ppl_ratio"] > 0, len(layers) > 0
        (True, True)
    """
    t0 = time.perf_counter()
    model, _ = lm_model(run["model"])
    key = (run["model"], run["data"], int(run["eval_tokens"]))
    fppl, fse, _ = float_perplexity(*key)
    linears = lm_linears(model)
    order = list(linears)
    own, search_metrics, alloc = _search_rules(run, model) if run.search is not None else (run.rules, {}, None)
    rules = _run_rules(run, own, order)
    tq = time.perf_counter()
    qm, extra = quantize(model, rules)
    quant_s = time.perf_counter() - tq - extra.pop("shared_s", 0.0)
    kernels = extra.pop("kernels", None)
    te = time.perf_counter()
    ids = eval_ids(*key)
    if _quantizes_inputs(rules):  # activation quantizers (or outlier decomposition) run in the quantized model
        c = compare_to_reference(qm, model, ids, any_structure=True, **eval_kwargs(ids, quantized_inputs=True))
    else:
        reference = nnx.clone(model)  # the float model, in variables of its own (merge would share them)
        with _weights_swapped(model, _effective_kernels(qm) if kernels is None else kernels):
            c = compare_to_reference(model, reference, ids, **eval_kwargs(ids))
    metrics = {"perplexity": c.ppl, "perplexity_se": c.ppl_se, "float_perplexity": fppl, "float_perplexity_se": fse,
               "perplexity_increase": c.ppl - fppl, **comparison_metrics(c, model.config.vocab_size), **size_metrics(qm),
               "quant_s": quant_s, "eval_s": time.perf_counter() - te, **extra, **search_metrics}
    metrics["method_s"] = time.perf_counter() - t0
    layers = layer_table(qm, order)
    return metrics, layers if alloc is None else search.chosen_columns(layers, *alloc)


@register("float", family="lm", check=check_eval_tokens)
def run_float(run, progress=False):
    """The float model's perplexity on the evaluation text."""
    model, _ = lm_model(run["model"])
    fppl, fse, eval_s = float_perplexity(run["model"], run["data"], int(run["eval_tokens"]))
    return {"perplexity": fppl, "perplexity_se": fse, "float_perplexity": fppl, "float_perplexity_se": fse,
            "perplexity_increase": 0.0, "ppl_ratio": 1.0, "ppl_ratio_se": 0.0, "kl": 0.0, "kl_se": 0.0, "top1": 1.0,
            "top1_se": 0.0, "collapsed": bool(fppl > model.config.vocab_size),
            **size_metrics(qnn.quantize_model(model, (), allow_unmatched=True)), "eval_s": eval_s}, None


@register("ptq_rtn", family="lm", reads=(*SPEC_KEYS, *SEARCH_KEYS, "outlier_threshold"), check=check_run,
          search_reads=("calibration", "calibration_seqs", "calibration_len", "search_embed"),
          rule_keys=("outlier_threshold",), int_matmul=False)
def run_ptq_rtn(run, progress=False):
    """Round-to-nearest quantization of the projections (and their inputs: ``act``, ``outlier_threshold``)."""
    return evaluate_run(run, lambda model, rules: (ptq.rtn(model, rules), {"calib_tokens": 0}))


@register("ptq_hqq", family="lm", reads=SPEC_KEYS, check=check_run)
def run_ptq_hqq(run, progress=False):
    """HQQ (half-quadratic zero point and scale search, no calibration data) of the projections."""
    return evaluate_run(run, lambda model, rules: (ptq.hqq(model, rules), {"calib_tokens": 0}))



_gptq_cache: dict[tuple, tuple[Any, dict]] = {}


def _gptq(run, model, rules) -> tuple[Any, dict]:
    """GPTQ of the shared model under ``rules``, with its extra metrics; the last result is kept, so a ``qat``
    run from GPTQ right after ``ptq_gptq`` at the same settings reuses it (``gptq_reused`` = 1)."""
    key = (run["model"], repr(rules), *(run[k] for k in (*_CALIBRATION_KEYS, "act_order")))
    if key in _gptq_cache:
        qm, extra = _gptq_cache[key]
        return qm, {**extra, "shared_s": 0.0, "gptq_reused": 1}
    _gptq_cache.clear()  # a quantized copy of the model: keep one
    cal, extra = _calibration_args(run, rules)
    qm = ptq.gptq(model, rules, act_order=bool(run["act_order"]), **cal)
    _gptq_cache[key] = (qm, extra)
    return qm, {**extra, "gptq_reused": 0}


@register("ptq_gptq", family="lm", reads=(*SPEC_KEYS, *_CALIBRATION_KEYS, "act_order", *SEARCH_KEYS), check=check_run,
          search_reads=("search_embed",))
def run_ptq_gptq(run, progress=False):
    """GPTQ of the projections (``act_order``), calibrated on the ``calibration`` text."""
    return evaluate_run(run, lambda model, rules: _gptq(run, model, rules))


@register("ptq_awq", family="lm", reads=(*SPEC_KEYS, *_CALIBRATION_KEYS), check=check_run)
def run_ptq_awq(run, progress=False):
    """AWQ of the projections, calibrated on the ``calibration`` text."""

    def quantize(model, rules):
        cal, extra = _calibration_args(run, rules)
        return ptq.awq(model, rules, max_input_rows=512, **cal), extra

    return evaluate_run(run, quantize)


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
                                     "qat_learning_rate", "batch_size", "qat_seq_len"), check=check_run)
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
        targets = {**{p: lin.kernel for p, lin in lm_linears(student).items()}, "embed": student.embed.embedding}
        for path, w in start.items():
            targets[path].value = w
        qm = qnn.quantize_model(student, rules, allow_unmatched=True)
        init_ppl, _ = _perplexity_with(run, _effective_kernels(qm))
        batches = qat_batches(run)
        hist = train(qm, iter(batches), loss="lm", learning_rate=float(run["qat_learning_rate"]), wrt=QAT_TRAINS,
                     progress=progress)
        return qm, {**extra, "init_perplexity": init_ppl, "qat_first_loss": hist.loss[0],
                    "qat_final_loss": hist.final_loss, "qat_tokens": int(batches[:, :, 1:].size), "qat_s": hist.seconds}

    return evaluate_run(run, quantize)
