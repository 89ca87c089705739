"""SmoothQuant (Xiao et al. 2022, arXiv:2211.10438): migrate activation outliers into the weights for W8A8.

Per input channel ``j`` of a kernel ``W (in, out)``::

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)        (max|W_j| over the output columns of row j)

and the layer computes ``(x / s) @ (diag(s) W)``: identical in float, but the activations are flatter (easier
to quantize per tensor) and the weights take a little of their range. ``alpha = 0.5`` is the paper's default;
larger alpha moves more difficulty onto the weights. Channels that never fire (``max|X_j| = 0``) or have zero
weights get ``s_j = 1``.

Example:
    >>> import jax.numpy as jnp
    >>> s = smoothquant_scales(jnp.array([16.0, 1.0]), jnp.array([[1.0], [1.0]]))
    >>> s.tolist()
    [4.0, 1.0]
"""

from __future__ import annotations

import jax.numpy as jnp

__all__ = ["smoothquant_scales", "apply_input_scale"]

_F32 = jnp.float32


def smoothquant_scales(act_absmax, W, alpha: float = 0.5, eps: float = 1e-5):
    """Per-input-channel smoothing factors ``s`` (shape ``(in,)``) for kernel ``W (in, out)``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha must be in [0, 1], got {alpha}")
    a = jnp.asarray(act_absmax, _F32).reshape(-1)
    W = jnp.asarray(W, _F32)
    if a.shape[0] != W.shape[0]:
        raise ValueError(f"smoothquant: act_absmax has {a.shape[0]} channels, W has {W.shape[0]} input rows")
    w = jnp.max(jnp.abs(W), axis=1)
    ok = (a > 0) & (w > 0) & jnp.isfinite(a)
    s = jnp.power(jnp.maximum(a, eps), alpha) / jnp.power(jnp.maximum(w, eps), 1.0 - alpha)
    return jnp.where(ok, jnp.clip(s, eps, 1.0 / eps), 1.0)


def apply_input_scale(X, W, s):
    """``(X / s, W * s[:, None])``: the rescaled pair with ``(X / s) @ (W * s) == X @ W`` in float."""
    s = jnp.asarray(s, _F32)
    return jnp.asarray(X) / s, jnp.asarray(W) * s[:, None]
