"""qlab.nn: quantization-aware Flax models (NNX and Linen), driven by ordered regex rules.

Layer paths are module attribute paths joined by ``"/"`` (``"layers/0"``, ``"blocks/1/attn/query"``);
call sites of ``jnp.einsum``/``dot``/``matmul``/``lax.dot_general`` inside a user module are
``"<module path>/einsum_0"`` etc. Rules use ``re.fullmatch``; the first match wins; a rule with
no specs keeps the layer float.

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

from qlab.nn.convert import CAPTURE_STATS, capture, convert, load_quantized_weights
from qlab.nn.linen_quant import quantize_linen
from qlab.nn.nnx_quant import (
    LAYER_KINDS,
    QuantizedLayer,
    call_scope,
    find_layer,
    float_layers,
    quantize_model,
    quantized_layers,
    set_input_scale,
    traced_variant,
)
from qlab.nn.quantizers import ActQuantizer, QuantOverride, QuantParam, QuantStat, WeightQuantizer
from qlab.nn.report import layer_report, model_size, unmatched_rules
from qlab.nn.rules import Rule, as_rules, first_match

__all__ = [
    "Rule",
    "as_rules",
    "first_match",
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
    "unmatched_rules",
    "quantized_layers",
    "float_layers",
    "find_layer",
    "call_scope",
    "LAYER_KINDS",
]
