"""qlab.nn: quantization-aware Flax models (NNX and Linen), driven by ordered regex rules.

Layer paths are module attribute paths joined by ``"/"`` (``"layers/0"``, ``"blocks/1/attn/query"``);
call sites of ``jnp.einsum``/``dot``/``matmul``/``lax.dot_general`` inside a user module are
``"<module path>/einsum_0"`` etc. Rules use ``re.fullmatch``; the first match wins; a rule with
no specs keeps the layer float; ``@first`` / ``@last`` name the first / last weight layer in call order.
An ``nnx.Embed`` is a layer like any other: specs resolve per token row (``int8/ch`` one scale per row,
``int4/g32`` groups along the row), lookups dequantize only the gathered rows, ``attend`` (a tied head)
uses the same codes. A call site that multiplies a user module's own ``nnx.Param`` under a weight rule
becomes a layer too (found by tracing ``quantize_model(..., example=...)``), counted and PTQ-quantized.

Modules (each imports only those listed before it):
    rules       Rule, first_match, @first/@last tokens (resolve_positions)
    axes        channel / contraction axes of weights and matmul operands
    quantizers  WeightQuantizer, ActQuantizer and their Variable types
    call_sites  interception of jnp.einsum/dot/matmul/lax.dot_general in user modules
    layer       QuantizedLayer: the wrapper that stands in for one Flax layer
    surgery     finding, copying, replacing layers; effective_model, traced_variant
    transform   quantize_model, set_input_scale
    convert     convert, load_quantized_weights, capture (calibration statistics)
    report      layer_report, model_size, resident_bytes
    linen_quant quantize_linen (Flax Linen)

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qlab.models import MLP
    >>> from qlab import nn as qnn
    >>> model = MLP(16, hidden=(32,), out=4, rngs=nnx.Rngs(0))
    >>> qm = qnn.quantize_model(model, [qnn.Rule("head"), qnn.Rule(".*", weight="int4/g8", act="int8")])
    >>> qnn.layer_report(qm)[["layer", "rule", "weight_spec"]].values.tolist()
    [['head', 'head', None], ['layers/0', '.*', 'int4/g8a0']]
"""

from qlab.nn.call_sites import call_scope
from qlab.nn.convert import CAPTURE_STATS, capture, convert, load_quantized_weights
from qlab.nn.layer import LAYER_KINDS, QuantizedLayer
from qlab.nn.linen_quant import quantize_linen
from qlab.nn.quantizers import ActQuantizer, QuantOverride, QuantParam, QuantStat, WeightQuantizer
from qlab.nn.report import layer_report, model_size, resident_bytes
from qlab.nn.rules import Rule, as_rules, first_match, resolve_positions
from qlab.nn.surgery import (
    copy_model,
    effective_model,
    find_layer,
    float_layers,
    quantizable_layers,
    quantized_layers,
    traced_variant,
)
from qlab.nn.transform import applied_rules, quantize_model, set_input_scale, unmatched_rules

__all__ = [
    "Rule",
    "as_rules",
    "first_match",
    "resolve_positions",
    "quantize_model",
    "quantize_linen",
    "QuantizedLayer",
    "QuantParam",
    "QuantStat",
    "QuantOverride",
    "traced_variant",
    "WeightQuantizer",
    "ActQuantizer",
    "set_input_scale",
    "load_quantized_weights",
    "convert",
    "capture",
    "CAPTURE_STATS",
    "layer_report",
    "model_size",
    "resident_bytes",
    "unmatched_rules",
    "applied_rules",
    "quantized_layers",
    "float_layers",
    "find_layer",
    "quantizable_layers",
    "copy_model",
    "effective_model",
    "call_scope",
    "LAYER_KINDS",
]
