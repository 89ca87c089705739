"""AWQ: activation-aware weight quantization (Lin et al. 2023, arXiv:2306.00978) for one ``(in, out)`` kernel.

Salient input channels (large mean ``|x|``) are protected by scaling them up before quantization and
folding the inverse scale into the activation: the layer computes ``(x / s) @ Q(diag(s) W)``, which
equals ``x @ W`` exactly in float. Two searches, both minimising the *layer output* error on
calibration inputs:

1. scale search: ``s = mean|x|^alpha``, normalised by ``sqrt(max(s) * min(s))``, for ``alpha`` on a grid of
   ``n_grid`` values ``0, 1/n, ..., (n-1)/n`` (``alpha = 0`` is plain RTN, so AWQ never does worse than RTN
   on the calibration set); the error ``||X W - (X/s) Q(W s)||^2`` is computed as ``tr(D^T H D)`` from the
   Hessian ``H = X^T X`` of all calibration rows when it is given (the model-level driver passes the captured
   one), else from the rows of ``X`` or ``X^T X``, whichever is cheaper;
2. clip search (``clip_search=True``): per scale group and output column, the range is shrunk by
   ``1, 1 - 1/n_grid, ...`` down to ``1 - max_shrink`` and the ratio with the least output error of that
   group's partial product (on up to ``clip_rows`` input rows) is kept; the clipped kernel is then quantized
   with the spec as is (absmax of a clipped group = the shrunk range).

The original implementation folds ``1/s`` into the previous op (a norm or linear) and shares ``s`` among
layers reading the same input. By default qlab layers divide their input by ``s`` at run time instead
(``qlab.nn.set_input_scale``), so each layer gets its own ``s``; this is exact, costs one elementwise
division per layer, and keeps the model untouched. :func:`awq_shared_scale_search` searches one ``s`` for
several kernels reading one input (the summed output error), as ``qlab.ptq.awq(..., share_scales=True)``
does so that the scales fold away (:mod:`qlab.ptq.fold`).

Example:
    >>> import jax, jax.numpy as jnp
    >>> X = jax.random.normal(jax.random.key(0), (256, 64)) * jnp.linspace(0.1, 4, 64)
    >>> W = jax.random.normal(jax.random.key(1), (64, 8))
    >>> q, s = awq(W, X, "int4/g32")
    >>> q.shape, s.shape
    ((64, 8), (64,))
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qlab.numerics.granularity import PerGroup
from qlab.numerics.quantize import fake_quant, quantize
from qlab.numerics.ranges import base_range, best_clip_ratio, code_params, grid_values, reconstruct, scale_and_zero_point
from qlab.ptq.rtn import group_size, resolve_weight_spec, tensor_scale_of

__all__ = ["awq", "awq_scales", "awq_scale_search", "awq_shared_scale_search", "awq_clip_search"]

_F32 = jnp.float32


def awq_scales(x_mean_abs, alpha):
    """``s = mean|x|^alpha`` (clamped at 1e-4), normalised so that ``max(s) * min(s) = 1``.

    Example:
        >>> import jax.numpy as jnp
        >>> awq_scales(jnp.array([1.0, 16.0]), 0.5).tolist()
        [0.5, 2.0]
    """
    s = jnp.maximum(jnp.asarray(x_mean_abs, _F32) ** alpha, 1e-4)
    return s / jnp.sqrt(jnp.max(s) * jnp.min(s))


@functools.partial(jax.jit, static_argnames=("spec", "n_grid", "use_x"))
def _scale_losses(W, X, H, x_mean, *, spec, n_grid, use_x):
    alphas = jnp.arange(n_grid, dtype=_F32) / n_grid
    err = (lambda D: jnp.sum((X @ D) ** 2)) if use_x else (lambda D: jnp.sum(D * (H @ D)))

    def loss(a):
        s = awq_scales(x_mean, a)
        Wq = fake_quant(W * s[:, None], spec) / s[:, None]
        return err(Wq - W)

    return alphas, jax.lax.map(loss, alphas)


def awq_scale_search(W, spec, *, X=None, H=None, x_mean_abs=None, n_grid: int = 20):
    """Best ``alpha`` and ``s`` for kernel ``W`` (see the module docstring); returns
    ``(s, alpha, losses)`` where ``losses[i]`` is the output error for ``alpha = i / n_grid``."""
    spec = resolve_weight_spec(spec)
    W = jnp.asarray(W, _F32)
    if X is None and H is None:
        raise ValueError("awq: needs calibration inputs X (or their Hessian H and mean |x|)")
    if X is not None:
        X = jnp.asarray(X, _F32).reshape(-1, W.shape[0])
        if X.shape[0] == 0:
            raise ValueError("awq: X has no rows (a calibration that saw no data)")
        if x_mean_abs is None:
            x_mean_abs = jnp.mean(jnp.abs(X), axis=0)
    if x_mean_abs is None:
        raise ValueError("awq: x_mean_abs is needed when only H is given")
    use_x = H is None and X.shape[0] <= X.shape[1]  # H (all calibration rows) when given
    if not use_x and H is None:
        H = X.T @ X
    alphas, losses = _scale_losses(W, X if use_x else None, None if use_x else jnp.asarray(H, _F32),
                                   jnp.asarray(x_mean_abs, _F32), spec=spec, n_grid=n_grid, use_x=use_x)
    i = int(jnp.argmin(losses))
    a = float(alphas[i])
    return awq_scales(x_mean_abs, a), a, np.asarray(losses)


def awq_shared_scale_search(kernels, specs, H, x_mean_abs, *, n_grid: int = 20):
    """One ``s`` for several kernels ``(in, out_i)`` that read the same input (e.g. q/k/v after one norm):
    the ``alpha`` minimising the SUM of their output errors ``tr(D_i^T H D_i)``, each kernel quantized with
    its own spec. Returns ``(s, alpha, losses)`` as :func:`awq_scale_search`; with one kernel it is that
    search. (A caller that needs tied scales, e.g. GQA heads sharing a value head, ties ``x_mean_abs``.)

    Example:
        >>> import jax, jax.numpy as jnp
        >>> X = jax.random.normal(jax.random.key(0), (128, 64)) * jnp.linspace(0.1, 4, 64)
        >>> Ws = [jax.random.normal(jax.random.key(i), (64, 8)) for i in (1, 2)]
        >>> s, a, losses = awq_shared_scale_search(Ws, ["int4/g32"] * 2, X.T @ X, jnp.mean(jnp.abs(X), 0))
        >>> s.shape, bool(losses[int(a * 20)] == losses.min())
        ((64,), True)
    """
    if len(kernels) != len(specs) or not kernels:
        raise ValueError(f"awq_shared_scale_search: {len(kernels)} kernels but {len(specs)} specs (need one each)")
    H = jnp.asarray(H, _F32)
    x_mean_abs = jnp.asarray(x_mean_abs, _F32)
    total = None
    for W, spec in zip(kernels, specs):
        W = jnp.asarray(W, _F32)
        if W.shape[0] != H.shape[0]:
            raise ValueError(f"awq_shared_scale_search: kernel with {W.shape[0]} inputs, H is {H.shape}")
        alphas, losses = _scale_losses(W, None, H, x_mean_abs, spec=resolve_weight_spec(spec), n_grid=n_grid,
                                       use_x=False)
        total = losses if total is None else total + losses
    i = int(jnp.argmin(total))
    a = float(alphas[i])
    return awq_scales(x_mean_abs, a), a, np.asarray(total)


@functools.partial(jax.jit, static_argnames=("spec", "G", "n_grid", "max_shrink"))
def _clip(Ws, Xs, *, spec, G, n_grid, max_shrink):
    n_in, n_out = Ws.shape
    ng = n_in // G
    Wv = Ws.reshape(ng, G, n_out)
    Xv = Xs.reshape(Xs.shape[0], ng, G)
    lo, hi = base_range(Wv, (1,), spec)
    tscale = tensor_scale_of(Ws, spec)
    n_steps = max(1, int(round(max_shrink * n_grid)))
    ratios = 1.0 - jnp.arange(n_steps, dtype=_F32) / n_grid

    def err_for(r):
        s, z = scale_and_zero_point(lo * r, hi * r, spec, tscale)
        inv, cz = code_params(lo * r, hi * r, spec) if spec.code_scale == "f32" else (None, z)
        q = reconstruct(grid_values(Wv, s, cz, tscale, spec, inv=inv), s, z, tscale, spec.zero_point)
        d = jnp.einsum("tng,ngo->tno", Xv, q - Wv)
        return jnp.sum(d * d, axis=0)  # (ng, out)

    best_r = best_clip_ratio(err_for, ratios)[:, None, :]
    Wc = jnp.clip(Wv, lo * best_r, hi * best_r).reshape(n_in, n_out)
    return Wc, best_r.reshape(ng, n_out)


def awq_clip_search(Ws, Xs, spec, *, n_grid: int = 20, max_shrink: float = 0.5, clip_rows: int = 512):
    """Clip the (already scaled) kernel ``Ws`` per group and output column to the shrink ratio with the
    least output error on ``Xs`` (the matching scaled inputs ``X / s``); returns ``(W_clipped, ratios)``."""
    spec = resolve_weight_spec(spec)
    Ws = jnp.asarray(Ws, _F32)
    Xs = jnp.asarray(Xs, _F32).reshape(-1, Ws.shape[0])
    if Xs.shape[0] > clip_rows:
        Xs = Xs[np.linspace(0, Xs.shape[0] - 1, clip_rows).astype(int)]
    G = group_size(spec, Ws.shape[0]) if isinstance(spec.granularity, PerGroup) else Ws.shape[0]
    return _clip(Ws, Xs, spec=spec, G=G, n_grid=n_grid, max_shrink=max_shrink)


def awq(W, X, spec, *, n_grid: int = 20, clip_search: bool = True, max_shrink: float = 0.5,
        clip_rows: int = 512, H=None, x_mean_abs=None, s=None, return_info: bool = False):
    """AWQ-quantize kernel ``W (in, out)`` with calibration inputs ``X (tokens, in)``.

    Returns ``(qtensor, s)``: ``qtensor`` quantizes ``W * s[:, None]`` (clipped if ``clip_search``) and the
    layer must compute ``(x / s) @ dequantize(qtensor)``. ``H = X^T X`` and ``x_mean_abs`` may be passed when
    already known (e.g. from ``qlab.nn.capture``); X is still used for the clip search (first ``clip_rows``
    spread rows). Given scales ``s`` (e.g. from :func:`awq_shared_scale_search`) skip the scale search
    (``alpha`` and ``losses`` are then None). With ``return_info=True`` a third element
    ``{"alpha", "losses", "clip_ratios"}`` is added.
    """
    spec = resolve_weight_spec(spec, require_rows=True)
    W = jnp.asarray(W, _F32)
    X = jnp.asarray(X, _F32).reshape(-1, W.shape[0])
    if X.shape[0] == 0:
        raise ValueError("awq: X has no rows (a calibration that saw no data)")
    if s is None:
        s, alpha, losses = awq_scale_search(W, spec, X=X, H=H, x_mean_abs=x_mean_abs, n_grid=n_grid)
    else:
        s, alpha, losses = jnp.asarray(s, _F32), None, None
        if s.shape != (W.shape[0],):
            raise ValueError(f"awq: s has shape {tuple(s.shape)}, the kernel has {W.shape[0]} inputs")
    Ws = W * s[:, None]
    ratios = None
    if clip_search:
        Ws, ratios = awq_clip_search(Ws, X / s[None, :], spec, n_grid=n_grid, max_shrink=max_shrink,
                                     clip_rows=clip_rows)
    q = quantize(Ws, spec)
    if return_info:
        return q, s, {"alpha": alpha, "losses": losses, "clip_ratios": ratios}
    return q, s

