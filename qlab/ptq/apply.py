"""Model-level PTQ drivers: rules in, quantized NNX model (with real codes + scales) out.

Each driver quantizes a copy of ``model`` with :func:`qlab.nn.quantize_model` (rules are ordered regexes on
layer paths; a quantizing rule that matches no layer is an error), runs the algorithm on every layer that has
a weight spec, and loads the resulting QTensors with :func:`qlab.nn.load_quantized_weights`, so each layer
uses ``dequantize(qtensor)`` exactly and :func:`qlab.nn.layer_report` / :func:`qlab.nn.model_size` count the
packed bytes. Activation specs of the rules (e.g. ``act="int8"`` for W8A8) stay active in the result.

Calibration (GPTQ, AWQ, SmoothQuant) collects statistics of every layer's input (:func:`qlab.nn.capture`)
over ``calibration_batches``, in one of two ways:

* ``sequential=False`` (default): ONE pass of the float model; every layer is calibrated on float inputs.
  Cheapest, and the statistics can be captured once and shared (``calibration_stats``).
* ``sequential=True`` (or the path of the blocks list, e.g. ``"layers"``): block by block, as the GPTQ and
  AWQ reference code does. The inputs of the first block are caught once per batch, then for each block:
  capture its layers' inputs, quantize them, and run the now quantized block to get the next block's
  inputs; so each block is calibrated on the outputs of its already-quantized predecessors (within a block
  the layers compute in float during capture). This needs a chain ``x -> block_0 -> block_1 -> ...`` whose
  other arguments (masks, positions) are shared; it is checked on the first batch, and anything else is an
  error. Weight layers outside the blocks (e.g. an output head) are calibrated last, in one pass of the model
  with every block quantized. The cost is about one forward pass, plus a compile per block.

A calibration that saw no data, or a weight-quantized layer that received no input during calibration,
is an error: there is no silent fall back to RTN. :func:`ptq_info` records the mode (``calibration``).

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

import dataclasses
import re
import time
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from qlab import nn as qnn
from qlab.nn.convert import default_forward
from qlab.numerics.granularity import PerChannel, PerGroup, PerTensor
from qlab.numerics.qtensor import QTensor
from qlab.ptq.awq import awq as _awq_weight
from qlab.ptq.awq import awq_shared_scale_search
from qlab.ptq.fold import ScaleGroup, divide_output, fold_target_kind, module_at, scale_groups, tie_heads
from qlab.ptq.gptq import gptq as _gptq_weight
from qlab.ptq.hqq import hqq as _hqq_weight
from qlab.ptq.rtn import rtn as _rtn_weight
from qlab.ptq.outliers import outlier_columns
from qlab.ptq.smoothquant import smoothquant_scales

__all__ = ["rtn", "gptq", "awq", "hqq", "smoothquant", "calibrate_activations", "ptq_info", "weight_layers"]


def weight_layers(qmodel) -> dict:
    """``{path: QuantizedLayer}`` of the layers that have a weight spec (in path order)."""
    return {p: L for p, L in qnn.quantized_layers(qmodel).items() if L.weight_quant is not None}


#: layers with an input scale (AWQ, SmoothQuant) must divide their input along its last axis
_SCALED_KINDS = ("linear", "embed")


def _is_call_site(L) -> bool:
    return getattr(L, "call_site", None) is not None


def _kernel(L, method: str):
    """``(kernel, spec, to_layer)``: the float weight of ``L`` in ``(in, out)`` layout (what the calibrated
    algorithms take), its weight spec in that layout, and the map of a QTensor in that layout back to the
    layer's own layout. nnx.Linear kernels are ``(in, out)`` already; an nnx.Embed table ``(vocab, d)`` is
    the tied output head's ``(d, vocab)`` kernel transposed (per-token scales = per output channel, groups
    along d = groups along the head's input); a 2-D weight used by ``jnp.einsum`` / ``dot`` / ``matmul`` in a
    user module is read from its contraction and channel axes."""
    w = jnp.asarray(L.weight[...], jnp.float32)
    spec = L.weight_quant.spec
    ok_kind = L.kind in ("linear", "embed") or _is_call_site(L)
    axes = (L.contract_axis, L.channel_axis)
    if not ok_kind or w.ndim != 2 or axes not in ((0, 1), (1, 0)):
        raise ValueError(
            f"{L.path}: {method} handles 2-D weights of nnx.Linear and nnx.Embed layers and of call sites "
            f"(jnp.einsum ... in a user module); this is a {L.kind} layer with weight shape {tuple(w.shape)}. "
            "Keep it float or give it its own rule and use qlab.ptq.rtn"
        )
    if method in ("awq", "smoothquant") and (L.kind not in _SCALED_KINDS or _is_call_site(L)):
        raise ValueError(f"{L.path}: {method} stores an input scale, which call sites (jnp.einsum ... in a user "
                         "module) cannot apply; use qlab.ptq.gptq or qlab.ptq.rtn for them")
    if axes == (0, 1):
        return w, spec, lambda q: q
    return w.T, _transposed_spec(spec, L.path), lambda q: _transposed_qtensor(q, spec)


def _transposed_spec(spec, path: str = ""):
    """``spec`` for the transpose of a 2-D weight (scale axes swapped)."""
    g = spec.granularity
    if isinstance(g, PerTensor):
        return spec
    if isinstance(g, (PerChannel, PerGroup)):
        return dataclasses.replace(spec, granularity=dataclasses.replace(g, axis=1 - g.axis % 2))
    raise ValueError(f"{path}: calibrated PTQ of a transposed weight (embedding / call site) needs a per-tensor, "
                     f"per-channel or per-group spec, got {str(spec)!r}")


def _transposed_qtensor(q, spec):
    """A QTensor of a 2-D ``(in, out)`` kernel as the QTensor of its transpose, with ``spec`` (the layer's)."""
    def t(a):
        if a is None:
            return None
        return jnp.transpose(a, (2, 0, 1)) if a.ndim == 3 else a.T  # groups (in/G, 1, out) -> (out, in/G, 1)

    return QTensor(q.codes.T, t(q.scale), t(q.zero_point), q.tensor_scale, spec, tuple(q.shape[::-1]), q.dtype)


def _start(model, rules, example=None, forward=None):
    # raises for rules that match no layer; example: finds the Params multiplied at call sites (jnp.einsum ...)
    qmodel = qnn.quantize_model(model, rules, example=example, forward=forward)
    layers = weight_layers(qmodel)
    if not layers:
        raise ValueError("PTQ: no layer has a weight spec under these rules (nothing to quantize)")
    return qmodel, layers


def _calibrate(qmodel, layers, batches, forward, stats, max_input_rows, given=None):
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
    _check_seen(st, list(layers), layers)
    return st


def _check_seen(st, paths, layers):
    """ValueError naming the weight layers of ``paths`` that saw no calibration input (no fallback to RTN)."""
    missing = [p for p in paths if p not in st or st[p].get("count", 0) == 0]
    if not missing:
        return
    embeds = [p for p in missing if layers[p].kind == "embed"]
    hint = (f" Embedding layers {embeds} are calibrated on the inputs of their tied output head "
            "(embed.attend(h)): a forward that only looks tokens up (or stops before the head) gives them none; "
            "run the head in forward, or quantize the embedding with its own rule and qlab.ptq.rtn / hqq.") if embeds else ""
    raise ValueError(
        f"PTQ: calibration saw no input for layers {missing[:10]}{' ...' if len(missing) > 10 else ''}: "
        "check calibration_batches and forward (no fallback to RTN)." + hint
    )


def _calibration_input(L) -> str:
    """What a calibrated layer's statistics are of (the ``calibration_input`` column of :func:`ptq_info`)."""
    if L.kind == "embed":
        return "tied head input (attend)"
    return "call-site activation" if _is_call_site(L) else "layer input"


def _finish(qmodel, info: list, method: str, calibration: str | None = None):
    # a static NNX attribute must be hashable (jit keys on it): rows as sorted item tuples
    extra = {} if calibration is None else {"calibration": calibration}
    qmodel._qlab_ptq_info = tuple(
        tuple(sorted((k, _hashable(v)) for k, v in dict(method=method, **extra, **row).items())) for row in info
    )
    return qmodel


def _outlier_count(st, threshold=6.0):
    a = st.get("absmax")
    return None if a is None else int(len(outlier_columns(a, threshold)))


def ptq_info(qmodel):
    """DataFrame, one row per quantized layer of the last PTQ run on ``qmodel``: ``layer, method, spec,
    seconds`` and method-specific columns (``rows`` of calibration input, ``outlier_features`` = input
    features with calibration absmax > 6 as LLM.int8() would split them, ``alpha`` for AWQ, ...)."""
    return pd.DataFrame([dict(row) for row in getattr(qmodel, "_qlab_ptq_info", ())])


def _hashable(v):
    if isinstance(v, (list, np.ndarray)):
        return tuple(np.asarray(v).reshape(-1).tolist())
    if isinstance(v, np.generic):
        return v.item()
    return v


# ----------------------------------------------------------------------------------------------------------
# calibration: one float pass, or block by block (sequential)


def _resolve(root, path: str):
    m = root
    for k in path.split("/") if path else []:
        m = m[int(k)] if k.isdigit() else getattr(m, k)
    return m


def _blocks_path(layers) -> str:
    """The list of blocks that holds most weight layers: the path before the first numeric component."""
    counts: dict[str, int] = {}
    for p in layers:
        parts = p.split("/")
        i = next((i for i, k in enumerate(parts) if k.isdigit() and i > 0), None)
        if i is not None and i < len(parts) - 1:
            counts["/".join(parts[:i])] = counts.get("/".join(parts[:i]), 0) + 1
    if not counts:
        raise ValueError("PTQ sequential=True: found no list of blocks holding the weight layers (paths like "
                         "'layers/3/attn/q_proj'); pass sequential='<path of the blocks list>' or sequential=False")
    return max(counts, key=counts.get)


class _Caught(Exception):
    pass


def _block_inputs(qmodel, blocks, batches, forward):
    """``(args, kwargs)`` of the first block's call for every batch (the forward stops there), after a
    check on the first batch that every block's first argument is the previous block's output and its
    other arguments are the first block's (what block-by-block propagation assumes)."""
    fwd = forward if forward is not None else default_forward
    classes = {type(b) for b in blocks}
    originals = {c: c.__call__ for c in classes}
    first, calls, record_all = blocks[0], [], [False]

    def patched(self, *args, **kwargs):
        if record_all[0]:
            out = originals[type(self)](self, *args, **kwargs)
            calls.append((self, args, kwargs, out))
            return out
        if self is first:
            raise _Caught(args, kwargs)
        return originals[type(self)](self, *args, **kwargs)

    inputs = []
    try:
        for c in classes:
            c.__call__ = patched
        for i, batch in enumerate(batches):
            if i == 0:
                record_all[0] = True
                fwd(qmodel, batch)
                record_all[0] = False
                _check_chain(calls, blocks)
            try:
                fwd(qmodel, batch)
            except _Caught as e:
                inputs.append(e.args)
                continue
            raise ValueError("PTQ sequential: the forward never called the first block")
    finally:
        for c, f in originals.items():
            c.__call__ = f
    return inputs


def _check_chain(calls, blocks):
    order = [next((j for j, b in enumerate(blocks) if b is c[0]), None) for c in calls]
    if order != list(range(len(blocks))):
        raise ValueError(f"PTQ sequential: the blocks were called in order {order}, not once each in list order; "
                         "sequential calibration needs x -> block_0 -> block_1 -> ... (use sequential=False)")
    a0 = calls[0]
    for k in range(1, len(calls)):
        _, args, kwargs, _ = calls[k]
        prev_out = calls[k - 1][3]
        same_rest = len(args) == len(a0[1]) and all(x is y for x, y in zip(args[1:], a0[1][1:])) and \
            kwargs.keys() == a0[2].keys() and all(kwargs[n] is a0[2][n] for n in kwargs)
        if not (same_rest and np.shape(args[0]) == np.shape(prev_out)
                and np.array_equal(np.asarray(args[0]), np.asarray(prev_out))):
            raise ValueError(f"PTQ sequential: block {k}'s input is not block {k - 1}'s output with the same other "
                             "arguments (something runs between blocks); use sequential=False")


def _run_block(block):
    graphdef, state = nnx.split(block)

    @jax.jit
    def run(state, args, kwargs):
        return nnx.merge(graphdef, state)(*args, **kwargs)

    return lambda args, kwargs: run(state, args, kwargs)


def _quantize_layers(paths, layers, stats_of, quantize_layer, prepare=None):
    if prepare is not None:
        prepare(paths, stats_of)
    qts, scales, info = {}, {}, []
    for path in paths:
        t = time.perf_counter()
        q, s, extra = quantize_layer(path, layers[path], stats_of[path])
        jax.block_until_ready(q.codes)
        qts[path] = q
        if s is not None:
            scales[path] = s
        info.append(dict(layer=path, spec=str(layers[path].weight_quant.spec), seconds=time.perf_counter() - t,
                         rows=stats_of[path]["count"], outlier_features=_outlier_count(stats_of[path]),
                         calibration_input=_calibration_input(layers[path]), **extra))
    return qts, scales, info


def _load(qmodel, qts, scales):
    for path, s in scales.items():
        qnn.set_input_scale(qmodel, path, s)
    qnn.load_quantized_weights(qmodel, qts)


def _calibrated(model, rules, method, batches, forward, stats, max_rows, given, sequential, quantize_layer,
                example=None, setup=None):
    """Quantize every weight layer with ``quantize_layer(path, layer, stats) -> (QTensor, input scale or None,
    info)`` on statistics of its calibration inputs (see the module docstring for ``sequential``).
    ``setup(qmodel, layers)``, when given, returns ``prepare(paths, stats)``, called before each set of
    layers is quantized (AWQ's shared scales)."""
    qmodel, layers = _start(model, rules, example, forward)
    for L in layers.values():
        _kernel(L, method)  # fail before calibrating
    prepare = None if setup is None else setup(qmodel, layers)
    if not sequential:
        st = _calibrate(qmodel, layers, batches, forward, stats, max_rows, given)
        qts, scales, info = _quantize_layers(list(layers), layers, st, quantize_layer, prepare)
        _load(qmodel, qts, scales)
        return _finish(qmodel, info, method, "one float pass")
    if given is not None:
        raise ValueError("PTQ: calibration_stats (captured once, in float) cannot be used with sequential "
                         "calibration, which recaptures each block's inputs after quantizing its predecessors")
    if batches is None:
        raise ValueError("PTQ: calibration_batches is None; this method needs calibration data")
    bpath = _blocks_path(layers) if sequential is True else str(sequential)
    blocks = _resolve(qmodel, bpath)
    if not isinstance(blocks, (nnx.List, list, tuple)) or not len(blocks):
        raise ValueError(f"PTQ sequential={sequential!r}: {bpath!r} is not a non-empty list of blocks")
    batches = list(batches)
    xs = _block_inputs(qmodel, blocks, batches, forward)
    if not xs:
        raise ValueError("PTQ: calibration saw no data (calibration_batches is empty; no fallback to RTN)")
    def quantize_part(paths, module, data, fwd, prefix="", **kw):
        st = qnn.capture(module, data, forward=fwd, stats=stats, max_input_rows=max_rows, **kw)
        st = {prefix + p: v for p, v in st.items()}
        _check_seen(st, paths, layers)
        qts, scales, info = _quantize_layers(paths, layers, st, quantize_layer, prepare)
        _load(qmodel, qts, scales)
        return info

    all_info = []
    for k, block in enumerate(blocks):
        prefix = f"{bpath}/{k}/"
        paths = [p for p in layers if p.startswith(prefix)]
        if paths:
            all_info += quantize_part(paths, block, xs, lambda m, b: m(*b[0], **b[1]), prefix)
        if k + 1 < len(blocks):
            run = _run_block(block)
            xs = [((run(a, kw),) + tuple(a[1:]), kw) for a, kw in xs]
    rest = [p for p in layers if not any(p.startswith(f"{bpath}/{k}/") for k in range(len(blocks)))]
    if rest:  # layers outside the blocks: one pass of the model with every block already quantized
        all_info += quantize_part(rest, qmodel, batches, forward, quantized=True)
    order = {p: i for i, p in enumerate(layers)}
    return _finish(qmodel, sorted(all_info, key=lambda r: order[r["layer"]]), method, f"sequential over {bpath}")


# ----------------------------------------------------------------------------------------------------------


def rtn(model, rules, *, example=None):
    """Round-to-nearest every weight-quantized layer (any layer kind): codes + scales via ``qlab.quantize``.
    ``example``: an input batch, needed when weight rules match call sites that multiply a user module's own
    Params (:func:`qlab.nn.quantize_model`).

    Example:
        >>> from flax import nnx
        >>> from qlab.nn import Rule, layer_report
        >>> qm = rtn(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), [Rule(".*", weight="int4/g32")])
        >>> bool(layer_report(qm)["converted"].all())
        True
    """
    qmodel, layers = _start(model, rules, example)
    qts, info = {}, []
    for path, L in layers.items():
        t = time.perf_counter()
        wq = L.weight_quant
        if wq.method == "ste":  # resolved spec, any layout (embed, conv, ...); jitted
            qts[path] = _rtn_weight(L.weight[...], wq.spec)
        else:  # LSQ: the learned steps
            qts[path] = wq.quantize(L.weight[...])
        info.append(dict(layer=path, spec=str(L.weight_quant.spec), seconds=time.perf_counter() - t))
    _load(qmodel, qts, {})
    return _finish(qmodel, info, "rtn")


def gptq(model, rules, calibration_batches: Iterable, forward: Callable | None = None, *, act_order: bool = False,
         damp: float = 0.01, block_size: int = 128, static_groups: bool | None = None, calibration_stats=None,
         sequential: bool | str = False, example=None):
    """GPTQ every weight-quantized Linear layer, embedding (as its tied head, on the inputs of ``attend``) and
    call-site Param (``example``: a batch, to find them, see :func:`qlab.nn.quantize_model`) with Hessians
    ``X^T X`` of its inputs over
    ``calibration_batches`` (``forward(model, batch)``, default ``model(batch)``): captured in one float
    pass, or block by block on the partially quantized model with ``sequential`` (module docstring).
    See :func:`qlab.ptq.gptq.gptq` for the per-layer algorithm and its arguments.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlab.models import Transformer, TransformerConfig
        >>> from qlab.nn import Rule
        >>> cfg = TransformerConfig(vocab_size=16, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_len=8)
        >>> m = Transformer(cfg, rngs=nnx.Rngs(0))
        >>> toks = [jax.random.randint(jax.random.key(i), (4, 8), 0, 16) for i in range(2)]
        >>> qm = gptq(m, [Rule("blocks/.*/(query|key|value|out|up|down)", weight="int4/g32")], toks,
        ...           sequential=True)
        >>> ptq_info(qm)["calibration"].iloc[0]
        'sequential over blocks'
    """
    def layer(path, L, s):
        w, spec, to_layer = _kernel(L, "gptq")
        q = _gptq_weight(w, s["hessian"], spec, damp=damp, block_size=block_size, act_order=act_order,
                         static_groups=static_groups)
        return to_layer(q), None, dict(act_order=act_order)

    return _calibrated(model, rules, "gptq", calibration_batches, forward, ("hessian", "absmax"), 1,
                       calibration_stats, sequential, layer, example)


def awq(model, rules, calibration_batches: Iterable, forward: Callable | None = None, *, n_grid: int = 20,
        clip_search: bool = True, max_shrink: float = 0.5, max_input_rows: int = 4096, calibration_stats=None,
        sequential: bool | str = False, example=None, share_scales=False):
    """AWQ every weight-quantized Linear layer: per-layer input scales ``s`` (searched on the captured
    Hessian and mean |x|; clip search on up to 512 of the first ``max_input_rows`` captured input rows),
    weights quantized as ``W * s`` and ``qlab.nn.set_input_scale(path, s)`` so the layer computes
    ``(x / s) @ Q(W s)``. ``sequential`` as for :func:`gptq`. See :mod:`qlab.ptq.awq`.

    ``share_scales=True`` (Gemma 3; or a list of :class:`qlab.ptq.fold.ScaleGroup`) does what the AWQ
    reference code does, so that no runtime divide is left after :func:`qlab.ptq.fold.fold_input_scales`:
    layers reading one input share one ``s`` (searched on their summed output error: q/k/v, gate/up);
    a scale whose input comes from a Linear (``o_proj`` from ``v_proj``, tied across the query heads of a
    GQA value head; ``down_proj`` from ``up_proj``) is folded at once into the float weights (``W_v / s``,
    ``W_o * s``; the model's function is unchanged) before they are quantized, so those layers get no
    input scale; a scale whose input comes from a norm stays a runtime input scale until folded. Every
    layer of a group must be weight-quantized, or none.

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> from qlab.nn import Rule
        >>> m = MLP(64, hidden=(32,), out=4, rngs=nnx.Rngs(0))
        >>> qm = awq(m, [Rule("layers/.*", weight="int4/g32")], [jax.random.normal(jax.random.key(0), (16, 64))])
        >>> ptq_info(qm)["layer"].tolist()
        ['layers/0']
    """
    plan: dict = {}

    def layer(path, L, s):
        if "inputs" not in s:
            raise ValueError(f"PTQ: awq needs captured 'inputs' for {path!r} (clip search)")
        w, spec, to_layer = _kernel(L, "awq")
        if path in plan:
            W, sc, alpha, runtime, into = plan[path]
            q, scale = _awq_weight(W, s["inputs"], spec, n_grid=n_grid, clip_search=clip_search,
                                   max_shrink=max_shrink, s=sc)
            return to_layer(q), (scale if runtime else None), dict(alpha=alpha, scale_into=into)
        q, scale, extra = _awq_weight(w, s["inputs"], spec, n_grid=n_grid,
                                      clip_search=clip_search, max_shrink=max_shrink, H=s["hessian"],
                                      x_mean_abs=s["mean_abs"], return_info=True)
        return to_layer(q), scale, dict(alpha=extra["alpha"])

    def setup(qmodel, layers):
        return _shared_scales(qmodel, layers, share_scales, n_grid, plan)

    return _calibrated(model, rules, "awq", calibration_batches, forward, ("hessian", "mean_abs", "absmax", "inputs"),
                       max_input_rows, calibration_stats, sequential, layer, example,
                       setup if share_scales else None)


def _shared_scales(qmodel, layers, share_scales, n_grid, plan):
    """Check the scale groups against the quantized layers and return ``prepare(paths, stats)``, which
    searches each group's scale, folds Linear-into-Linear ones into the float weights and fills ``plan``
    (path -> kernel, s, alpha, runtime?, into)."""
    groups = scale_groups(qmodel) if share_scales is True else tuple(share_scales)
    active, owner = [], {}
    for g in groups:
        if not isinstance(g, ScaleGroup):
            raise ValueError(f"share_scales: expected True or a list of ScaleGroup, got an item {g!r}")
        quantized = [p for p in g.layers if p in layers]
        if not quantized:
            continue
        if len(quantized) != len(g.layers):
            raise ValueError(f"share_scales: {list(g.layers)} read one input and share one scale, but only {quantized} "
                             "are weight-quantized; give all of them a weight spec (or none), or share_scales=False")
        for p in g.layers:
            if p in owner:
                raise ValueError(f"share_scales: layer {p!r} is in two scale groups")
            owner[p] = g
        fold_target_kind(module_at(qmodel, g.into))  # a norm or a Linear, else an error naming it
        active.append(g)
    ordered = []  # a group folding into a layer of another group is searched first (that layer's kernel changes)
    while len(ordered) < len(active):
        ready = [g for g in active if g not in ordered and not any(
            h not in ordered and h is not g and h.into in g.layers for h in active)]
        if not ready:
            raise ValueError("share_scales: the scale groups fold into each other in a cycle")
        ordered += ready

    def prepare(paths, st):
        inside = set(paths)
        for g in ordered:
            if g.layers[0] not in inside:
                continue
            if not inside.issuperset(g.layers):
                raise ValueError(f"share_scales: {list(g.layers)} are calibrated in different blocks")
            first = st[g.layers[0]]
            kernels = [_kernel(layers[p], "awq")[0] for p in g.layers]
            s, alpha, _ = awq_shared_scale_search(kernels, [layers[p].weight_quant.spec for p in g.layers],
                                                  first["hessian"], tie_heads(g, first["mean_abs"]), n_grid=n_grid)
            runtime = fold_target_kind(module_at(qmodel, g.into)) == "norm"
            if not runtime:  # W_into / s and W * s: the float model's function is unchanged
                divide_output(module_at(qmodel, g.into), g.to_output(s))
                for p, W in zip(g.layers, kernels):
                    layers[p].weight[...] = (W * s[:, None]).astype(layers[p].weight[...].dtype)
            for p, W in zip(g.layers, kernels):
                plan[p] = (W, s, alpha, runtime, g.into)

    return prepare


def hqq(model, rules, *, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
        optimize_scale: bool = False, example=None):
    """HQQ (calibration-free) every weight-quantized Linear layer; the rules' weight specs must be asymmetric
    integer ones, e.g. ``"int4/g64/asym/zp=float"``. See :mod:`qlab.ptq.hqq`.

    Example:
        >>> from flax import nnx
        >>> from qlab.nn import Rule
        >>> qm = hqq(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), [Rule(".*", weight="int4/g32/asym/zp=float")])
        >>> ptq_info(qm)["method"].tolist()
        ['hqq']
    """
    qmodel, layers = _start(model, rules, example)
    qts, info = {}, []
    for path, L in layers.items():
        t = time.perf_counter()
        w, spec, to_layer = _kernel(L, "hqq")
        qts[path] = to_layer(_hqq_weight(w, spec, iters=iters, lp_norm=lp_norm, beta=beta, kappa=kappa,
                                         optimize_scale=optimize_scale))
        info.append(dict(layer=path, spec=str(L.weight_quant.spec), seconds=time.perf_counter() - t))
    _load(qmodel, qts, {})
    return _finish(qmodel, info, "hqq")


def smoothquant(model, rules, calibration_batches: Iterable, forward: Callable | None = None, *,
                alpha: float = 0.5, calibration_stats=None, sequential: bool | str = False, example=None,
                smooth: str | None = None):
    """SmoothQuant: per-layer smoothing ``s = max|X|^alpha / max|W|^(1-alpha)`` from captured activation
    absmax, weights quantized (RTN) as ``W * s``, and ``set_input_scale(path, s)``; the rules' ``act`` specs
    (e.g. ``Rule(".*", weight="int8/ch", act="int8")`` for W8A8) then quantize the smoothed activations.
    ``sequential`` as for :func:`gptq`. The activation scales are the rules' (dynamic by default); make them
    static with :func:`calibrate_activations`.

    ``smooth``: a regex (``re.fullmatch`` on layer paths) of the layers to smooth; the other weight-quantized
    layers are quantized as RTN with their specs and no input scale. The paper smooths the inputs of the
    q/k/v and first MLP projections (after a norm, where outliers live) and not those of the attention output
    and second MLP projections: ``smooth=r".*/(q|k|v|up|gate)_proj"``. Default: every layer.

    Example:
        >>> import jax
        >>> from flax import nnx
        >>> from qlab.nn import Rule
        >>> x = [jax.random.normal(jax.random.key(0), (16, 64))]
        >>> qm = smoothquant(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), [Rule(".*", weight="int8/ch", act="int8")], x)
        >>> bool(ptq_info(qm)["act_absmax_smoothed"].iloc[0] < ptq_info(qm)["act_absmax"].iloc[0])
        True
    """
    if smooth is not None:
        try:
            pattern = re.compile(smooth)
        except re.error as e:
            raise ValueError(f"smoothquant: smooth={smooth!r} is not a valid regex: {e}") from None

    def layer(path, L, s):
        a = s["absmax"]
        w, spec, to_layer = _kernel(L, "smoothquant")
        if smooth is not None and not pattern.fullmatch(path):
            return to_layer(_rtn_weight(w, spec)), None, dict(act_absmax=float(np.max(a)),
                                                              act_absmax_smoothed=float(np.max(a)))
        sc = smoothquant_scales(a, w, alpha)
        q = to_layer(_rtn_weight(w * sc[:, None], spec))
        return q, sc, dict(act_absmax=float(np.max(a)), act_absmax_smoothed=float(np.max(np.asarray(a) / np.asarray(sc))))

    return _calibrated(model, rules, "smoothquant", calibration_batches, forward, ("absmax",), 1, calibration_stats,
                       sequential, layer, example)


def calibrate_activations(qmodel, calibration_batches: Iterable | None = None, forward: Callable | None = None, *,
                          calibration_stats=None):
    """Static activation scales: a copy of ``qmodel`` whose per-tensor activation quantizers use one fixed range
    each, ``max |x|`` of the layer's input over the calibration data (after the layer's ``input_scale``, i.e. of
    the smoothed input for SmoothQuant), instead of each batch's own range (the rules' default, dynamic). This
    is SmoothQuant's O3 setting (static per-tensor) and what an integer kernel with a precomputed input scale
    runs; inputs beyond the calibrated range are clipped.

    The range comes from ``calibration_batches`` (``forward(model, batch)``; one pass of ``qmodel`` computing
    in float activations, with whatever weights it holds) or from ``calibration_stats``: the dict of
    :func:`qlab.nn.capture` as the PTQ functions take it, captured on the model *before* any input scale (e.g.
    the float model's), per layer ``"absmax"``; the layer's ``input_scale`` is divided out here.

    Every layer with an activation spec gets a static range; the spec must be a symmetric per-tensor one with
    the ``"ste"`` quantizer (``act="int8"``): per-token or per-group activation scales are dynamic by nature,
    and an asymmetric range would need minima that capture does not keep. The quantizers are frozen
    (``use_running_average = True``); ``model.train()`` would let them track an EMA of the range again.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlab.nn import Rule
        >>> x = [jax.random.normal(jax.random.key(0), (16, 64))]
        >>> qm = rtn(nnx.Linear(64, 8, rngs=nnx.Rngs(0)), [Rule(".*", weight="int8/ch", act="int8")])
        >>> sm = calibrate_activations(qm, x)
        >>> float(sm.act_quant.hi[...]) == float(jnp.max(jnp.abs(x[0])))
        True
        >>> big = 100 * x[0]                               # beyond the calibrated range: clipped, not rescaled
        >>> bool(jnp.abs(sm(big) - qm(big)).max() > 1)
        True
    """
    layers = {p: L for p, L in qnn.quantized_layers(qmodel).items() if L.act_quant is not None}
    if not layers:
        raise ValueError("calibrate_activations: no layer quantizes its input (give the rules an act spec, e.g. "
                         "act=\"int8\")")
    for p, L in layers.items():
        aq = L.act_quant
        if aq.method != "ste" or not isinstance(aq.spec.granularity, PerTensor) or not aq.spec.symmetric:
            raise ValueError(f"calibrate_activations: {p or '<root>'} has activation spec {str(aq.spec)!r} "
                             f"({aq.method}); a static range needs a symmetric per-tensor spec with the ste "
                             "quantizer (e.g. act=\"int8\"); per-token scales (\"int8/ch\") are dynamic by nature")
    if calibration_stats is None:
        if calibration_batches is None:
            raise ValueError("calibrate_activations: give calibration_batches or calibration_stats")
        st = qnn.capture(qmodel, calibration_batches, forward=forward, stats=("absmax",), max_input_rows=1)
        amax = {p: np.asarray(st[p]["absmax"]) for p in layers if p in st}
    else:
        amax = {}
        for p, L in layers.items():
            if p in calibration_stats and "absmax" in calibration_stats[p]:
                a = np.asarray(calibration_stats[p]["absmax"], np.float32)
                amax[p] = a if L.input_scale is None else a / np.asarray(L.input_scale[...], np.float32)
    _check_seen({p: {"count": 1} for p in amax}, list(layers), layers)
    out = qnn.copy_model(qmodel)
    for p, L in qnn.quantized_layers(out).items():
        if p not in layers:
            continue
        hi = float(np.max(amax[p]))
        aq = qnn.ActQuantizer(L.act_quant.spec, method="ste", range="ema")
        aq.lo[...] = jnp.float32(-hi)
        aq.hi[...] = jnp.float32(hi)
        aq.count[...] = jnp.int32(1)
        aq.use_running_average = True
        L.act_quant = aq
    return out
