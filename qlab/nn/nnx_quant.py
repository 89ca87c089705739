"""Compatibility shim: the names ``qlab.nn.nnx_quant`` used to define, re-exported from where they
live now. New code imports them from :mod:`qlab.nn` (or the module named beside each).

* :mod:`qlab.nn.layer`: ``QuantizedLayer``, ``LAYER_KINDS``
* :mod:`qlab.nn.call_sites`: ``call_scope``, ``SEEN_CALL_SITES``
* :mod:`qlab.nn.transform`: ``quantize_model``, ``set_input_scale``
* :mod:`qlab.nn.surgery`: ``quantized_layers``, ``float_layers``, ``find_layer``, ``traced_variant``
* :mod:`qlab.nn.convert`: ``CaptureStats``

Example:
    >>> from qlab.nn import nnx_quant, surgery
    >>> nnx_quant.traced_variant is surgery.traced_variant
    True
"""

from qlab.nn.call_sites import SEEN_CALL_SITES, call_scope
from qlab.nn.convert import CaptureStats
from qlab.nn.layer import LAYER_KINDS, QuantizedLayer
from qlab.nn.surgery import find_layer, float_layers, quantized_layers, traced_variant
from qlab.nn.transform import quantize_model, set_input_scale

__all__ = [
    "QuantizedLayer",
    "quantize_model",
    "set_input_scale",
    "quantized_layers",
    "float_layers",
    "find_layer",
    "LAYER_KINDS",
    "traced_variant",
    "call_scope",
    "SEEN_CALL_SITES",
    "CaptureStats",
]
