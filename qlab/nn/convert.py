"""From QAT to real codes: :func:`convert`, :func:`load_quantized_weights`; and :func:`capture`
(calibration statistics for PTQ).

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qlab.nn import Rule, quantize_model
    >>> qm = quantize_model(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), [Rule(".*", weight="int4/g4")])
    >>> cm = convert(qm)
    >>> bool((cm(jnp.ones((2, 8))) == qm(jnp.ones((2, 8)))).all())
    True
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlab.numerics.quantize import QTensor
from qlab.nn.quantizers import ActQuantizer, QuantStat
from qlab.nn.surgery import copy_model, find_layer, quantized_layers

__all__ = ["convert", "load_quantized_weights", "capture", "CAPTURE_STATS", "CaptureStats", "default_forward"]

CAPTURE_STATS = ("hessian", "absmax", "mean_abs", "inputs")


class CaptureStats(nnx.Module):
    """Calibration statistics of one layer's input (QuantStats, updated by forward passes).

    :func:`capture` gives each quantized layer one (``layer.capture_stats``); the layer's forward
    calls it with its input viewed as ``[rows, in_features]``.

    Example:
        >>> import jax.numpy as jnp
        >>> c = CaptureStats(3, ("absmax",), max_rows=8)
        >>> c(jnp.array([[1.0, -2.0, 0.5]]))
        >>> c.absmax[...].tolist(), int(c.count[...])
        ([1.0, 2.0, 0.5], 1)
    """

    def __init__(self, in_features: int, stats, max_rows: int, dtype=jnp.float32):
        self.stats = tuple(stats)
        self.max_rows = int(max_rows)
        self.count = QuantStat(jnp.zeros((), jnp.int32))
        self.hessian = QuantStat(jnp.zeros((in_features, in_features), jnp.float32)) if "hessian" in stats else None
        self.absmax = QuantStat(jnp.zeros((in_features,), jnp.float32)) if "absmax" in stats else None
        self.sum_abs = QuantStat(jnp.zeros((in_features,), jnp.float32)) if "mean_abs" in stats else None
        self.inputs = QuantStat(jnp.zeros((max_rows, in_features), dtype)) if "inputs" in stats else None

    def __call__(self, x2):
        x2f = jax.lax.stop_gradient(x2).astype(jnp.float32)
        n = self.count[...]
        if self.hessian is not None:
            self.hessian[...] = self.hessian[...] + jnp.matmul(x2f.T, x2f, precision=jax.lax.Precision.HIGHEST)
        if self.absmax is not None:
            self.absmax[...] = jnp.maximum(self.absmax[...], jnp.max(jnp.abs(x2f), axis=0))
        if self.sum_abs is not None:
            self.sum_abs[...] = self.sum_abs[...] + jnp.sum(jnp.abs(x2f), axis=0)
        if self.inputs is not None:
            k = min(x2.shape[0], self.max_rows)
            buf = jnp.concatenate([self.inputs[...], jnp.zeros((k, x2.shape[1]), self.inputs.dtype)])
            pos = jnp.minimum(n, self.max_rows)
            buf = jax.lax.dynamic_update_slice(buf, x2[:k].astype(buf.dtype), (pos, 0))
            self.inputs[...] = buf[: self.max_rows]
        self.count[...] = n + x2.shape[0]


def load_quantized_weights(qmodel, qtensors: Mapping[str, QTensor], *, keep_float: bool = True) -> None:
    """Make the layers at the given paths use ``qlab.dequantize(qtensor)`` (exact) as their weight.

    Those layers become "converted": their weight fake-quantizer is no longer used, and
    :func:`~qlab.nn.layer_report` counts the QTensor's packed bytes. With ``keep_float`` the float
    weight stays in the model (the report then also gives the SQNR against it). In place.

    Example:
        >>> import qlab
        >>> from flax import nnx
        >>> from qlab.nn import Rule, quantize_model
        >>> qm = quantize_model(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), [Rule(".*", weight="int8")])
        >>> load_quantized_weights(qm, {"": qlab.quantize(qm.kernel[...], "int4/ch1")})
        >>> qm.converted
        True
    """
    for path, q in qtensors.items():
        if not isinstance(q, QTensor):
            raise TypeError(f"{path}: expected a QTensor, got {type(q).__name__}")
        find_layer(qmodel, path).set_qtensor(q, keep_float=keep_float)


def convert(qmodel, *, keep_float: bool = False):
    """A copy of a QAT model whose weight-quantized layers hold real codes + scales (QTensor).

    Each weight-quantized layer's current fake-quantized weight becomes ``quantize(w)`` (STE) or
    the LSQ codes and learned steps, so the converted model computes the same outputs as the
    QAT model (bit-identical: ``fake_quant == dequantize(quantize)``). Activation quantizers are
    kept, with statistics frozen (eval mode). The float weights are dropped unless
    ``keep_float``. The QAT model is not changed.

    Example:
        >>> from flax import nnx
        >>> from qlab.nn import Rule, quantize_model
        >>> qm = quantize_model(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), [Rule(".*", weight="int4/ch")])
        >>> cm = convert(qm)
        >>> cm.converted, cm.qtensor().codes.shape, qm.converted
        (True, (8, 4), False)
    """
    cm = copy_model(qmodel)
    for path, layer in quantized_layers(cm).items():
        if layer.weight_quant is not None and not layer.converted:
            layer.set_qtensor(layer.weight_quant.quantize(layer.weight[...]), keep_float=keep_float)
            layer.weight_quant = None
    for _, m in nnx.iter_modules(cm):
        if isinstance(m, ActQuantizer):
            m.use_running_average = True
    return cm


def default_forward(model, batch):
    """How calibration runs a model on a batch by default: ``model(x)`` for an ``(x, y)`` tuple or list,
    else ``model(batch)``.

    Example:
        >>> default_forward(lambda x: 2 * x, (3, "label"))
        6
    """
    return model(batch[0]) if isinstance(batch, (tuple, list)) else model(batch)


def capture(
    qmodel,
    batches: Iterable,
    forward: Callable | None = None,
    stats=CAPTURE_STATS,
    max_input_rows: int = 4096,
    *,
    quantized: bool = False,
) -> dict[str, dict[str, np.ndarray]]:
    """Calibration statistics of the input of every quantized layer.

    Runs ``forward(model, batch)`` (default ``model(batch)``, or ``model(batch[0])`` for an
    ``(x, y)`` tuple) jitted over ``batches`` on a copy of
    ``qmodel`` and returns, per layer path (inputs viewed as ``[rows, in_features]``, i.e. per
    token for Linear/Einsum, per pixel for Conv, after any ``input_scale`` division and before
    activation quantization):

    * ``"hessian"``: sum of ``x^T x`` over all rows (float32, ``[in, in]``); ``"count"``: rows seen;
    * ``"absmax"`` / ``"mean_abs"``: per input feature;
    * ``"inputs"``: the first ``max_input_rows`` rows (fewer if fewer were seen).

    With ``quantized=False`` (default) the layers compute in float during capture (calibrating
    on the float model's activations); with True, they run quantized (sequential PTQ).
    Embedding lookups have no float input and are skipped (``attend`` calls are captured).
    Raises ValueError when no layer saw any data.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> from qlab.nn import Rule, quantize_model
        >>> qm = quantize_model(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), [Rule(".*", weight="int8")])
        >>> st = capture(qm, [jnp.ones((4, 3))])
        >>> st[""]["hessian"].tolist(), st[""]["count"]
        ([[4.0, 4.0, 4.0], [4.0, 4.0, 4.0], [4.0, 4.0, 4.0]], 4)
    """
    unknown = set(stats) - set(CAPTURE_STATS)
    if unknown:
        raise ValueError(f"capture: unknown stats {sorted(unknown)}; known: {CAPTURE_STATS}")
    cm = nnx.clone(qmodel)
    layers = quantized_layers(cm)
    if not layers:
        raise ValueError("capture: the model has no quantized layers (quantize_model it with rules first)")
    for layer in layers.values():
        layer.capture_stats = CaptureStats(layer.in_features, stats, max_input_rows, jnp.float32)
        layer.capture_float = not quantized
    for _, m in nnx.iter_modules(cm):
        if isinstance(m, ActQuantizer):
            m.use_running_average = True
    fwd = forward if forward is not None else default_forward
    graphdef, state = nnx.split(cm)

    @jax.jit
    def step(state, batch):
        m = nnx.merge(graphdef, state)
        fwd(m, batch)
        return nnx.state(m)

    n = 0
    for batch in batches:
        state = step(state, batch)
        n += 1
    nnx.update(cm, state)
    out = {}
    for path, layer in quantized_layers(cm).items():
        c = layer.capture_stats
        count = int(c.count[...])
        if count == 0:
            continue
        d = {"count": count}
        if c.hessian is not None:
            d["hessian"] = np.asarray(c.hessian[...])
        if c.absmax is not None:
            d["absmax"] = np.asarray(c.absmax[...])
        if c.sum_abs is not None:
            d["mean_abs"] = np.asarray(c.sum_abs[...]) / count
        if c.inputs is not None:
            d["inputs"] = np.asarray(c.inputs[...])[: min(count, c.max_rows)]
        out[path] = d
    if n == 0 or not out:
        embeds = [p for p, L in layers.items() if L.kind == "embed"]
        raise ValueError(
            f"capture saw no data ({n} batches; no quantized layer was called): check `batches` and `forward`"
            + (f"; embedding layers {embeds} only see data through their tied output head (attend)" if embeds else "")
        )
    return out
