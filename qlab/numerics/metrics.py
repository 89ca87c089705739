"""How far a quantized tensor is from the original: mean squared error and SQNR.

Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.linspace(-1.0, 1.0, 64)
    >>> bool(sqnr_db(x, fake_quant(x, "int8")) > sqnr_db(x, fake_quant(x, "int4")))
    True
"""

from __future__ import annotations

import jax.numpy as jnp

from qlab.numerics.quantize import fake_quant

__all__ = ["quant_error", "sqnr_db"]

_F32 = jnp.float32


def quant_error(x, spec, *, key=None):
    """Mean squared error of ``fake_quant(x, spec)`` against ``x`` (finite entries).

    Example:
        >>> import jax.numpy as jnp
        >>> float(quant_error(jnp.zeros(8), "int4"))
        0.0
    """
    x = jnp.asarray(x)
    y = fake_quant(x, spec, key=key)
    d = jnp.where(jnp.isfinite(x), (y.astype(_F32) - x.astype(_F32)) ** 2, 0.0)
    return jnp.mean(d)


def sqnr_db(x, y):
    """Signal-to-quantization-noise ratio of ``y`` against reference ``x``, in dB.

    Example:
        >>> import jax.numpy as jnp
        >>> round(float(sqnr_db(jnp.ones(4), jnp.ones(4) * 1.01)), 1)
        40.0
    """
    x = jnp.asarray(x, _F32)
    y = jnp.asarray(y, _F32)
    sig = jnp.sum(x**2)
    noise = jnp.sum((x - y) ** 2)
    return 10 * jnp.log10(sig / jnp.maximum(noise, 1e-30))
