"""qlab: a quantization research workbench for JAX and Flax.

Example:
    >>> import jax.numpy as jnp, qlab
    >>> y = qlab.fake_quant(jnp.linspace(-1, 1, 256).reshape(2, 128), "int4/g128")
    >>> qlab.bits_per_weight("int4/g128", (4096, 4096))
    4.125
"""

from qlab.numerics import *  # noqa: F401,F403

__version__ = "0.1.0"
