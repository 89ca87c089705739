"""Model-level PTQ drivers: rules in, quantized NNX model (with real codes + scales) out.

Each driver quantizes a copy of ``model`` with :func:`qlab.nn.quantize_model` (rules are ordered regexes on
layer paths; a quantizing rule that matches no layer is an error), runs the algorithm on every layer that has
a weight spec, and loads the resulting QTensors with :func:`qlab.nn.load_quantized_weights`, so each layer
uses ``dequantize(qtensor)`` exactly and :func:`qlab.nn.layer_report` / :func:`qlab.nn.model_size` count the
packed bytes. Activation specs of the rules (e.g. ``act="int8"`` for W8A8) stay active in the result.

Calibration (GPTQ, AWQ, SmoothQuant) uses :func:`qlab.nn.capture`: statistics of every layer's input are
collected in ONE pass of the float model over ``calibration_batches`` (not block by block on the partially
quantized model as the GPTQ/AWQ reference code does). One pass costs one forward per batch instead of one
per block and keeps the CPU time of a 270M-parameter model in minutes; the price is that later layers are
calibrated on float rather than already-quantized inputs (GPTQ's paper reports the sequential variant to be
slightly better at 3 bits and below). A calibration that saw no data, or a weight-quantized layer that
received no input during calibration, is an error: there is no silent fall back to RTN.

``calibration_stats`` (the dict :func:`qlab.nn.capture` returns, e.g. captured once for a sweep over specs)
may replace ``calibration_batches``; it must cover every weight-quantized layer.

Per-layer details of the last run (seconds, AWQ's alpha, LLM.int8 outlier features in the calibration
inputs, ...) are kept on the model: :func:`ptq_info` returns them as a DataFrame.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from qlab.models import MLP
    >>> from qlab.nn import Rule
    >>> m = MLP(64, hidden=(32,), out=4, rngs=nnx.Rngs(0))
    >>> batches = [jax.random.normal(jax.random.key(i), (16, 8, 8, 1)) for i in range(2)]
    >>> qm = gptq(m, [Rule("layers/.*", weight="int4/g32")], batches)
    >>> ptq_info(qm)[["layer", "method"]].values.tolist()
    [['layers/0', 'gptq']]
"""

from __future__ import annotations

import time
from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np

from qlab.ptq.awq import awq as _awq_weight
from qlab.ptq.gptq import gptq as _gptq_weight
from qlab.ptq.hqq import hqq as _hqq_weight
from qlab.ptq.rtn import rtn as _rtn_weight
from qlab.ptq.outliers import outlier_columns
from qlab.ptq.smoothquant import smoothquant_scales

__all__ = ["rtn", "gptq", "awq", "hqq", "smoothquant", "ptq_info", "weight_layers"]


def _nn():
    import qlab.nn as qnn

    return qnn


def weight_layers(qmodel) -> dict:
    """``{path: QuantizedLayer}`` of the layers that have a weight spec (in path order)."""
    qnn = _nn()
    return {p: L for p, L in qnn.quantized_layers(qmodel).items() if L.weight_quant is not None}


def _kernel(L, method: str):
    """The float kernel of ``L`` in ``(in, out)`` layout (calibrated algorithms need it)."""
    w = jnp.asarray(L.weight[...], jnp.float32)
    if L.kind != "linear" or w.ndim != 2 or (L.contract_axis, L.channel_axis) != (0, 1):
        raise ValueError(
            f"{L.path}: {method} handles 2-D (in, out) kernels of nnx.Linear layers; this is a {L.kind} layer "
            f"with weight shape {tuple(w.shape)}. Keep it float or give it its own rule and use qlab.ptq.rtn"
        )
    return w


def _start(model, rules):
    qnn = _nn()
    qmodel = qnn.quantize_model(model, rules)  # raises for rules that match no layer
    layers = weight_layers(qmodel)
    if not layers:
        raise ValueError("PTQ: no layer has a weight spec under these rules (nothing to quantize)")
    return qmodel, layers


def _calibrate(qmodel, layers, batches, forward, stats, max_input_rows, given=None):
    qnn = _nn()
    if given is not None:
        st = given
        for p in layers:
            lack = [k for k in stats if k != "inputs" and p in st and k not in st[p]]
            if lack:
                raise ValueError(f"PTQ: calibration_stats[{p!r}] lacks {lack} (capture them with qlab.nn.capture)")
    else:
        if batches is None:
            raise ValueError("PTQ: calibration_batches is None; this method needs calibration data")
        st = qnn.capture(qmodel, batches, forward=forward, stats=stats, max_input_rows=max_input_rows)
    missing = [p for p in layers if p not in st or st[p].get("count", 0) == 0]
    if missing:
        raise ValueError(
            f"PTQ: calibration saw no input for layers {missing[:10]}{' ...' if len(missing) > 10 else ''}: "
            "check calibration_batches and forward (no fallback to RTN)"
        )
    return st


def _finish(qmodel, qts: dict, scales: dict, info: list, method: str):
    qnn = _nn()
    for path, s in scales.items():
        qnn.set_input_scale(qmodel, path, s)
    qnn.load_quantized_weights(qmodel, qts)
    # a static NNX attribute must be hashable (jit keys on it): rows as sorted item tuples
    qmodel._qlab_ptq_info = tuple(
        tuple(sorted((k, _hashable(v)) for k, v in dict(method=method, **row).items())) for row in info
    )
    return qmodel


def _outlier_count(st, threshold=6.0):
    a = st.get("absmax")
    return None if a is None else int(len(outlier_columns(a, threshold)))


def ptq_info(qmodel):
    """DataFrame, one row per quantized layer of the last PTQ run on ``qmodel``: ``layer, method, spec,
    seconds`` and method-specific columns (``rows`` of calibration input, ``outlier_features`` = input
    features with calibration absmax > 6 as LLM.int8() would split them, ``alpha`` for AWQ, ...)."""
    import pandas as pd

    return pd.DataFrame([dict(row) for row in getattr(qmodel, "_qlab_ptq_info", ())])


def _hashable(v):
    if isinstance(v, (list, np.ndarray)):
        return tuple(np.asarray(v).reshape(-1).tolist())
    if isinstance(v, np.generic):
        return v.item()
    return v


# ----------------------------------------------------------------------------------------------------------


def rtn(model, rules):
    """Round-to-nearest every weight-quantized layer (any layer kind): codes + scales via ``qlab.quantize``.

    Example:
        >>> from flax import nnx
        >>> from qlab.nn import Rule, layer_report
        >>> qm = rtn(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), [Rule(".*", weight="int4/g32")])
        >>> bool(layer_report(qm)["converted"].all())
        True
    """
    qmodel, layers = _start(model, rules)
    qts, info = {}, []
    for path, L in layers.items():
        t = time.perf_counter()
        wq = L.weight_quant
        if wq.method == "ste":  # resolved spec, any layout (embed, conv, ...); jitted
            qts[path] = _rtn_weight(L.weight[...], wq.spec)
        else:  # LSQ: the learned steps
            qts[path] = wq.quantize(L.weight[...])
        info.append(dict(layer=path, spec=str(L.weight_quant.spec), seconds=time.perf_counter() - t))
    return _finish(qmodel, qts, {}, info, "rtn")


def gptq(model, rules, calibration_batches: Iterable, forward: Callable | None = None, *, act_order: bool = False,
         damp: float = 0.01, block_size: int = 128, static_groups: bool | None = None, calibration_stats=None):
    """GPTQ every weight-quantized Linear layer with Hessians ``X^T X`` captured in one float pass over
    ``calibration_batches`` (``forward(model, batch)``, default ``model(batch)``). See
    :func:`qlab.ptq.gptq.gptq` for the per-layer algorithm and its arguments."""
    qmodel, layers = _start(model, rules)
    Ws = {p: _kernel(L, "gptq") for p, L in layers.items()}
    st = _calibrate(qmodel, layers, calibration_batches, forward, ("hessian", "absmax"), 1, calibration_stats)
    qts, info = {}, []
    for path, L in layers.items():
        t = time.perf_counter()
        qts[path] = _gptq_weight(Ws[path], st[path]["hessian"], L.weight_quant.spec, damp=damp,
                               block_size=block_size, act_order=act_order, static_groups=static_groups)
        qts[path].codes.block_until_ready()
        info.append(dict(layer=path, spec=str(L.weight_quant.spec), seconds=time.perf_counter() - t,
                         rows=st[path]["count"], act_order=act_order, outlier_features=_outlier_count(st[path])))
    return _finish(qmodel, qts, {}, info, "gptq")


def awq(model, rules, calibration_batches: Iterable, forward: Callable | None = None, *, n_grid: int = 20,
        clip_search: bool = True, max_shrink: float = 0.5, max_input_rows: int = 4096, calibration_stats=None):
    """AWQ every weight-quantized Linear layer: per-layer input scales ``s`` (searched on the captured
    Hessian and mean |x|; clip search on up to 512 of the first ``max_input_rows`` captured input rows),
    weights quantized as ``W * s`` and ``qlab.nn.set_input_scale(path, s)`` so the layer computes
    ``(x / s) @ Q(W s)``. See :mod:`qlab.ptq.awq`."""
    qmodel, layers = _start(model, rules)
    Ws = {p: _kernel(L, "awq") for p, L in layers.items()}
    st = _calibrate(qmodel, layers, calibration_batches, forward, ("hessian", "mean_abs", "absmax", "inputs"),
                    max_input_rows, calibration_stats)
    qts, scales, info = {}, {}, []
    for path, L in layers.items():
        t = time.perf_counter()
        s_ = st[path]
        if "inputs" not in s_:
            raise ValueError(f"PTQ: awq needs captured 'inputs' for {path!r} (clip search)")
        q, s, extra = _awq_weight(Ws[path], s_["inputs"], L.weight_quant.spec, n_grid=n_grid, clip_search=clip_search,
                               max_shrink=max_shrink, H=s_["hessian"], x_mean_abs=s_["mean_abs"], return_info=True)
        qts[path], scales[path] = q, s
        info.append(dict(layer=path, spec=str(L.weight_quant.spec), seconds=time.perf_counter() - t,
                         rows=s_["count"], alpha=extra["alpha"], outlier_features=_outlier_count(s_)))
    return _finish(qmodel, qts, scales, info, "awq")


def hqq(model, rules, *, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
        optimize_scale: bool = False):
    """HQQ (calibration-free) every weight-quantized Linear layer; the rules' weight specs must be asymmetric
    integer ones, e.g. ``"int4/g64/asym/zp=float"``. See :mod:`qlab.ptq.hqq`."""
    qmodel, layers = _start(model, rules)
    qts, info = {}, []
    for path, L in layers.items():
        t = time.perf_counter()
        qts[path] = _hqq_weight(_kernel(L, "hqq"), L.weight_quant.spec, iters=iters, lp_norm=lp_norm, beta=beta,
                             kappa=kappa, optimize_scale=optimize_scale)
        info.append(dict(layer=path, spec=str(L.weight_quant.spec), seconds=time.perf_counter() - t))
    return _finish(qmodel, qts, {}, info, "hqq")


def smoothquant(model, rules, calibration_batches: Iterable, forward: Callable | None = None, *,
                alpha: float = 0.5, calibration_stats=None):
    """SmoothQuant: per-layer smoothing ``s = max|X|^alpha / max|W|^(1-alpha)`` from captured activation
    absmax, weights quantized (RTN) as ``W * s``, and ``set_input_scale(path, s)``; the rules' ``act`` specs
    (e.g. ``Rule(".*", weight="int8/ch", act="int8")`` for W8A8) then quantize the smoothed activations."""
    qmodel, layers = _start(model, rules)
    Ws = {p: _kernel(L, "smoothquant") for p, L in layers.items()}
    st = _calibrate(qmodel, layers, calibration_batches, forward, ("absmax",), 1, calibration_stats)
    qts, scales, info = {}, {}, []
    for path, L in layers.items():
        t = time.perf_counter()
        a = st[path]["absmax"]
        s = smoothquant_scales(a, Ws[path], alpha)
        qts[path] = _rtn_weight(Ws[path] * s[:, None], L.weight_quant.spec)
        scales[path] = s
        info.append(dict(layer=path, spec=str(L.weight_quant.spec), seconds=time.perf_counter() - t,
                         rows=st[path]["count"], act_absmax=float(np.max(a)),
                         act_absmax_smoothed=float(np.max(np.asarray(a) / np.asarray(s))),
                         outlier_features=_outlier_count(st[path])))
    return _finish(qmodel, qts, scales, info, "smoothquant")
