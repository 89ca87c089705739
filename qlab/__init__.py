"""qlab: a quantization research workbench for JAX and Flax.

The numerics (formats, specs, quantize/dequantize/fake_quant, packing) load eagerly; the Flax
integration, PTQ, sweeps and plots load on first use (``qlab.quantize_model``, ``qlab.ptq``,
``qlab.sweep``, ``qlab.plot``).

Example:
    >>> import jax.numpy as jnp, qlab
    >>> y = qlab.fake_quant(jnp.linspace(-1, 1, 256).reshape(2, 128), "int4/g128")
    >>> qlab.bits_per_weight("int4/g128", (4096, 4096))
    4.125
"""

import importlib

from qlab.numerics import *  # noqa: F401,F403
from qlab.numerics import __all__ as _NUMERICS_ALL

__version__ = "0.1.0"

# name -> module that defines it; loaded lazily so `import qlab` stays light
_LAZY_NAMES = {
    "Rule": "qlab.nn",
    "quantize_model": "qlab.nn",
    "quantize_linen": "qlab.nn",
    "layer_report": "qlab.nn",
    "model_size": "qlab.nn",
    "resident_bytes": "qlab.nn",
    "convert": "qlab.nn",
    "capture": "qlab.nn",
    "QuantParam": "qlab.nn",
    "QuantStat": "qlab.nn",
    "sweep": "qlab.experiments",
    "load_results": "qlab.experiments",
}
_SUBMODULES = {"analysis", "distributed", "nn", "ptq", "experiments", "plot", "models", "data", "train", "evaluate", "cli", "numerics"}

__all__ = list(_NUMERICS_ALL) + list(_LAZY_NAMES) + sorted(_SUBMODULES)


def __getattr__(name):
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        module = importlib.import_module(f"qlab.{name}")
        globals()[name] = module
        return module
    raise AttributeError(f"module 'qlab' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
