"""The language-model ablation methods (issue #15's paper-style ablations, each a ``qlab sweep`` study):
``ptq_smoothquant`` (SmoothQuant's migration strength ``alpha``, ``smooth``, static or dynamic activation
scales), ``rtn_salient`` (AWQ's salient channels kept float or scaled) and ``zero_outliers`` (LLM.int8's outlier
features zeroed, against random dimensions). LLM.int8's activation schemes and decomposition are ``ptq_rtn`` runs
with ``act`` and ``outlier_threshold`` (:mod:`qlab.experiments.lm`).

Calibration statistics come from one float pass per calibration setting, shared by the runs of a process
(``lm.float_pass_stats``); the outlier features of ``zero_outliers`` from one float pass over the evaluation
tokens. Every run reports the lm family's metrics (perplexity with its se, the paired ratio to float, KL, top-1).

Example:
    >>> from qlab.experiments import expand
    >>> run = expand({"base": {"model": "gemma3_tiny", "data": "tiny_text", "eval_tokens": 32,
    ...                        "calibration": "tiny_text", "calibration_len": 16, "method": "rtn_salient",
    ...                        "weight": "int3/g16/asym", "salient_fraction": 0.1}})[0]
    >>> metrics, layers = run.method.run(run)
    >>> metrics["perplexity"] > 1, 0 < metrics["float_weight_share"] < 0.2
    (True, True)
"""

from __future__ import annotations

import functools
import re
import time

import numpy as np
import pandas as pd

from qlab import nn as qnn
from qlab import ptq
from qlab.evaluate import compare_to_reference
from qlab.numerics import PerTensor

from . import lm
from .methods import SPEC_KEYS, register

__all__ = ["SMOOTH_LAYERS", "SITES", "salient_rows", "smoothing_rows", "zero_features", "hidden_inputs"]

_CALIB = ("calibration", "calibration_seqs", "calibration_len")
#: ``smooth`` values -> the projections SmoothQuant smooths (None: none, the W8A8 baseline)
SMOOTH_LAYERS = {"norm_inputs": r"layers/\d+/(attn/(q|k|v)_proj|mlp/(gate|up)_proj)",
                 "all": r"layers/\d+/(attn|mlp)/\w+_proj", "none": None}
#: the input site of each projection: q/k/v read the normed block input, gate/up the normed MLP input
SITES = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
         "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_hidden"}


def _stats(run):
    return lm.float_pass_stats(run["model"], run["calibration"], int(run["calibration_seqs"]),
                                int(run["calibration_len"]))


# --------------------------------------------------------------------------- SmoothQuant


def smoothing_rows(stats: dict, kernels: dict, alpha: float, smooth: str | None) -> pd.DataFrame:
    """Per smoothed layer: the activation absmax (largest and median channel) before and after SmoothQuant's
    ``s`` at ``alpha``, their max / median ratios, and the same for the weight rows.

    Example:
        >>> st = {"layers/0/attn/q_proj": {"absmax": np.array([1.0, 1.0, 16.0])}}
        >>> r = smoothing_rows(st, {"layers/0/attn/q_proj": np.ones((3, 2))}, 0.5, ".*").iloc[0]
        >>> float(r["act_ratio"]), float(r["act_ratio_smoothed"])
        (16.0, 4.0)
    """
    rows = []
    for p, s in stats.items():
        if smooth is None or p not in kernels or not re.fullmatch(smooth, p):
            continue
        a = np.asarray(s["absmax"], np.float64)
        W = np.asarray(kernels[p], np.float64)
        sc = np.asarray(ptq.smoothquant_scales(a, W, alpha), np.float64)
        b, wa, ws = a / sc, np.abs(W).max(1), np.abs(W * sc[:, None]).max(1)
        rows.append(dict(layer=p, act_absmax=a.max(), act_median=np.median(a), act_ratio=a.max() / np.median(a),
                         act_absmax_smoothed=b.max(), act_median_smoothed=np.median(b),
                         act_ratio_smoothed=b.max() / np.median(b), weight_absmax=wa.max(),
                         weight_ratio=wa.max() / np.median(wa), weight_absmax_smoothed=ws.max(),
                         weight_ratio_smoothed=ws.max() / np.median(ws)))
    return pd.DataFrame(rows)


def _check_smoothquant(run) -> None:
    lm.check_run(run)
    if run["act_scales"] != "static":
        return
    if run.act is None:
        raise ValueError("act_scales = \"static\" calibrates activation ranges: set act (e.g. act = \"int8\")")
    if not isinstance(run.act.granularity, PerTensor) or not run.act.symmetric:
        raise ValueError(f"act_scales = \"static\" needs a symmetric per-tensor act spec (e.g. \"int8\"); act = "
                         f"{str(run.act)!r} has dynamic scales by nature (use act_scales = \"dynamic\")")


@register("ptq_smoothquant", family="lm", reads=(*SPEC_KEYS, *_CALIB, "alpha", "smooth", "act_scales"),
          check=_check_smoothquant, int_matmul=False)
def run_ptq_smoothquant(run, progress=False):
    """SmoothQuant (``alpha``, ``smooth``) of the projections, RTN weights, ``act`` with ``act_scales``."""
    smooth = SMOOTH_LAYERS[run["smooth"]]

    def quantize(model, rules):
        t = time.perf_counter()
        stats = _stats(run)
        shared = time.perf_counter() - t
        if smooth is None:
            qm = ptq.rtn(model, rules)
        else:
            qm = ptq.smoothquant(model, rules, None, alpha=float(run["alpha"]), calibration_stats=stats, smooth=smooth)
        extra = {"calib_tokens": int(run["calibration_seqs"]) * int(run["calibration_len"]), "shared_s": shared}
        if run["act_scales"] == "static":
            qm = ptq.calibrate_activations(qm, calibration_stats=stats)
            extra["static_range_max"] = max(float(L.act_quant.hi[...]) for L in qnn.quantized_layers(qm).values()
                                            if L.act_quant is not None)
        return qm, extra

    metrics, layers = lm.evaluate_run(run, quantize)
    model = lm.lm_model(run["model"])[0]
    kernels = {p: np.asarray(lin.kernel[...]) for p, lin in lm.lm_linears(model).items()}
    rows = smoothing_rows(_stats(run), kernels, float(run["alpha"]), smooth)
    return metrics, layers if rows.empty else layers.merge(rows, on="layer", how="left")


# --------------------------------------------------------------------------- AWQ's salient channels


def salient_rows(saliency: str, fraction: float, kernel, act_mean_abs, seed: int) -> np.ndarray:
    """The input channels (kernel rows) of one projection that ``rtn_salient`` keeps float or scales:
    ``max(1, round(fraction x inputs))`` by ``activation`` (mean |x|), by ``weight`` (the row's L2 norm) or at
    ``random`` (drawn with ``seed``).

    Example:
        >>> W = np.eye(4, 2) * [[1.0], [3.0], [2.0], [0.5]]
        >>> a = np.array([5.0, 0.1, 0.2, 0.3])
        >>> salient_rows("activation", 0.25, W, a, 0).tolist(), salient_rows("weight", 0.25, W, a, 0).tolist()
        ([0], [1])
        >>> len(salient_rows("random", 0.5, W, a, 3))
        2
    """
    if saliency == "activation":
        return ptq.salient_channels(act_mean_abs, fraction)
    if saliency == "weight":
        return ptq.salient_channels(np.linalg.norm(np.asarray(kernel), axis=1), fraction)
    return ptq.salient_channels(np.zeros(np.shape(kernel)[0]), fraction, seed=seed)


def _check_salient(run) -> None:
    lm.check_run(run)
    if not 0 < run["salient_fraction"] < 1:
        raise ValueError(f"salient_fraction = {run['salient_fraction']} must be in (0, 1)")
    if run["rules"] != "all" or run.act is not None:
        raise ValueError("rtn_salient quantizes every projection's weights with one spec: rules = \"all\", act = "
                         "\"none\"")


@register("rtn_salient", family="lm", reads=(*SPEC_KEYS, *_CALIB, "saliency", "salient_fraction", "salient_scale"),
          check=_check_salient)
def run_rtn_salient(run, progress=False):
    """RTN with each projection's salient input channels kept float or scaled by ``salient_scale`` (AWQ)."""

    def quantize(model, rules):
        t = time.perf_counter()
        stats = _stats(run) if run["saliency"] == "activation" else {}
        shared = time.perf_counter() - t
        spec, s = str(run.weight), run["salient_scale"]
        kernels, kept, total = {}, 0, 0
        for i, (p, lin) in enumerate(lm.lm_linears(model).items()):
            W = np.asarray(lin.kernel[...])
            rows = salient_rows(run["saliency"], float(run["salient_fraction"]), W,
                                np.asarray(stats[p]["mean_abs"]) if stats else None, int(run["seed"]) * 1000 + i)
            kernels[p] = ptq.rtn_keep_float(W, spec, rows) if s is None else ptq.rtn_scaled(W, spec, rows, float(s))
            kept += len(rows) * W.shape[1] * (s is None)
            total += W.size
        calib = int(run["calibration_seqs"]) * int(run["calibration_len"]) if stats else 0
        return ptq.rtn(model, rules), {"kernels": kernels, "float_weight_share": kept / total, "calib_tokens": calib,
                                       "shared_s": shared}

    return lm.evaluate_run(run, quantize)


# --------------------------------------------------------------------------- LLM.int8's outlier features


@functools.lru_cache(maxsize=1)
def hidden_inputs(model_name: str, data: str, eval_tokens: int) -> dict:
    """``{projection path: its input on the evaluation tokens}`` (``[positions, features]`` float32) of the
    float model: what LLM.int8's outlier features are counted on."""
    model = lm.lm_model(model_name)[0]
    ids = lm.eval_ids(model_name, data, eval_tokens)
    qm0 = qnn.quantize_model(model, [qnn.Rule("|".join(map(re.escape, lm.lm_linears(model))), weight="int8/ch")],
                             allow_unmatched=True)
    stats = qnn.capture(qm0, [ids], forward=lambda m, b: m.features(b), stats=("inputs",),
                        max_input_rows=int(ids.size))
    return {p: np.asarray(s["inputs"], np.float32) for p, s in stats.items()}


def zero_features(paths, width: int, systematic_dims, seed: int | None = None) -> dict[str, np.ndarray]:
    """``{projection path: input features to zero}``: the systematic hidden dimensions in the input of every
    q/k/v/gate/up projection among ``paths`` (o_proj and down_proj read other feature spaces); with ``seed``, as
    many random dimensions drawn once from the ``width - len(systematic_dims)`` others.

    Example:
        >>> ps = ["layers/0/attn/q_proj", "layers/0/attn/o_proj", "layers/0/mlp/up_proj"]
        >>> z = zero_features(ps, 8, [2, 5]); sorted(z), z["layers/0/mlp/up_proj"].tolist()
        (['layers/0/attn/q_proj', 'layers/0/mlp/up_proj'], [2, 5])
        >>> r = zero_features(ps, 8, [2, 5], seed=0)["layers/0/attn/q_proj"].tolist(); len(r), {2, 5} & set(r)
        (2, set())
    """
    dims = np.asarray(systematic_dims, np.int64)
    if seed is not None:
        pool = np.setdiff1d(np.arange(width), dims)
        dims = np.sort(np.random.default_rng(seed).choice(pool, size=len(dims), replace=False))
    return {p: dims for p in paths if SITES[p.rsplit("/", 1)[-1]] in ("attn_in", "mlp_in") and len(dims)}


def systematic_hidden_dims(inputs: dict) -> np.ndarray:
    """The systematic outlier dimensions of the hidden state: LLM.int8's definition over the inputs of every
    q (normed block input) and gate (normed MLP input) projection (:func:`qlab.ptq.systematic_outliers`)."""
    hidden = {p: x for p, x in inputs.items() if p.endswith(("/attn/q_proj", "/mlp/gate_proj"))}
    return ptq.systematic_outliers(hidden)[0]


@register("zero_outliers", family="lm", reads=("zero_dims",), check=lm.check_eval_tokens)
def run_zero_outliers(run, progress=False):
    """The systematic outlier features (or as many random dimensions, ``zero_dims``) zeroed in every q/k/v and
    gate/up projection's input: LLM.int8's "remove the outliers" test."""
    t0 = time.perf_counter()
    name, key = run["model"], (run["model"], run["data"], int(run["eval_tokens"]))
    model = lm.lm_model(name)[0]
    inputs = hidden_inputs(*key)
    dims = systematic_hidden_dims(inputs)
    width = next(iter(inputs.values())).shape[1]
    feats = zero_features(list(inputs), width, dims, int(run["seed"]) if run["zero_dims"] == "random" else None)
    qm = ptq.zero_input_features(model, feats)
    te = time.perf_counter()
    ids = lm.eval_ids(*key)
    c = compare_to_reference(qm, model, ids, any_structure=True, **lm.eval_kwargs(ids, quantized_inputs=True))
    fppl, fse, _ = lm.float_perplexity(*key)
    zeroed = next(iter(feats.values())) if feats else np.zeros(0, np.int64)
    metrics = {"perplexity": c.ppl, "perplexity_se": c.ppl_se, "float_perplexity": fppl, "float_perplexity_se": fse,
               "perplexity_increase": c.ppl - fppl, **lm.comparison_metrics(c, model.config.vocab_size),
               "zeroed_features": len(zeroed), "zeroed_dims": " ".join(map(str, zeroed)),
               "systematic_dims": " ".join(map(str, dims)), "eval_s": time.perf_counter() - te,
               "method_s": time.perf_counter() - t0}
    layers = pd.DataFrame([dict(layer=p, width=width, zeroed=len(d)) for p, d in feats.items()])
    return metrics, layers if len(layers) else None
