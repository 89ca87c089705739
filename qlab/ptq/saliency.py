"""AWQ's saliency ablation (Lin et al. 2024, Tables 1 and 2) for one ``(in, out)`` kernel.

AWQ's premise: a small fraction of a layer's input channels, those with large *activations*, matter most to the
weight quantization error. Table 1 keeps a fraction of input channels (rows of the kernel) in float under RTN,
chosen by activation magnitude, by weight magnitude or at random; Table 2 instead multiplies the salient rows by
``s`` before quantizing and divides the activations by ``s`` (exact in float), which for ``s`` up to about 2
lowers their relative rounding error and beyond that coarsens the other channels of their scale groups.

* :func:`salient_channels`: the top ``fraction`` of input channels by a score (or a random draw);
* :func:`rtn_keep_float`: RTN's fake-quantized kernel with the given rows restored to float;
* :func:`rtn_scaled`: the effective kernel ``Q(diag(s) W) / s`` of scaling the given rows by ``s``.

Example:
    >>> import jax, jax.numpy as jnp
    >>> W = jax.random.normal(jax.random.key(0), (256, 8))
    >>> ch = salient_channels(jnp.arange(256.0), 0.01)
    >>> ch.tolist(), bool((rtn_keep_float(W, "int3/g128", ch)[ch] == W[ch]).all())
    ([253, 254, 255], True)
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from qlab.numerics.quantize import fake_quant
from qlab.ptq.rtn import resolve_weight_spec

__all__ = ["salient_channels", "rtn_keep_float", "rtn_scaled"]


def salient_channels(score, fraction: float, *, seed: int | None = None, n: int | None = None) -> np.ndarray:
    """The ``max(1, round(fraction * len(score)))`` channels with the largest ``score`` (sorted indices, int64);
    ties go to the lower index; with ``seed``, that many channels drawn at random instead (``score`` then gives
    only the count). ``n`` overrides the count.

    Example:
        >>> salient_channels([0.1, 5.0, 0.3, 9.0], 0.5).tolist(), salient_channels([0.0] * 1000, 0.001).tolist()
        ([1, 3], [0])
        >>> len(salient_channels(np.ones(640), 0.03, seed=0)), salient_channels(np.ones(4), 0.5, seed=0, n=3).size
        (19, 3)
    """
    s = np.asarray(score, np.float64).reshape(-1)
    if not 0 < fraction <= 1:
        raise ValueError(f"salient_channels: fraction must be in (0, 1], got {fraction}")
    k = n if n is not None else max(1, int(round(fraction * s.size)))
    if seed is not None:
        return np.sort(np.random.default_rng(seed).choice(s.size, size=k, replace=False)).astype(np.int64)
    return np.sort(np.argsort(-s, kind="stable")[:k]).astype(np.int64)


def rtn_keep_float(W, spec, channels):
    """RTN's fake-quantized ``(in, out)`` kernel (groups along the input axis), with the input ``channels`` (rows)
    kept at their float values. The scales are those of the whole kernel, as RTN computes them; only the kept
    rows' values are restored (AWQ's Table 1: "keep 1% of the channels in FP16").

    Example:
        >>> W = jnp.array([[0.1, -0.2], [4.0, 0.3], [0.25, 0.05], [-0.3, 0.2]])
        >>> q = rtn_keep_float(W, "int2/ch", [1])
        >>> q[1].tolist() == W[1].tolist(), bool((q[0] != W[0]).any())
        (True, True)
    """
    W = jnp.asarray(W, jnp.float32)
    q = fake_quant(W, resolve_weight_spec(spec))
    keep = np.zeros(W.shape[0], bool)
    keep[np.asarray(channels, np.int64)] = True
    return jnp.where(jnp.asarray(keep)[:, None], W, q)


def rtn_scaled(W, spec, channels, s: float):
    """The effective kernel of scaling the input ``channels`` (rows) of ``W`` by ``s`` before RTN and the
    activations by ``1 / s`` (AWQ's Table 2): ``Q(diag(S) W) / S`` with ``S = s`` on ``channels`` and 1 elsewhere,
    so that ``(x / S) @ Q(S W) = x @ rtn_scaled(W)``. ``s = 1`` is plain RTN.

    Example:
        >>> W = jnp.array([[0.1, -0.2], [0.9, 0.3], [0.25, 0.05], [-0.3, 0.2]])
        >>> bool((rtn_scaled(W, "int3/ch", [0], 1.0) == fake_quant(W, resolve_weight_spec("int3/ch"))).all())
        True
        >>> x = jnp.array([[1.0, 2.0, 3.0, 4.0]]); S = jnp.array([2.0, 1, 1, 1])
        >>> bool(jnp.allclose(x @ rtn_scaled(W, "int3/ch", [0], 2.0),
        ...                   (x / S) @ fake_quant(W * S[:, None], resolve_weight_spec("int3/ch"))))
        True
    """
    W = jnp.asarray(W, jnp.float32)
    S = np.ones(W.shape[0], np.float32)
    S[np.asarray(channels, np.int64)] = s
    S = jnp.asarray(S)[:, None]
    return fake_quant(W * S, resolve_weight_spec(spec)) / S
