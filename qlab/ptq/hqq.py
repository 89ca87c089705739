"""HQQ: half-quadratic quantization (Badri & Shaji 2023, "Half-Quadratic Quantization of Large Machine
Learning Models"), calibration-free, for one ``(in, out)`` kernel.

HQQ keeps the min-max scale and optimises the (float) zero point of every group so that the weight error
is small in an ``l_p`` sense with ``p < 1`` (robust to the few large errors that matter little), by
alternating, for ``iters`` steps (half-quadratic splitting):

    r   = clip(round(W / s + z))                       # codes with the current zero point
    W_e = shrink_p(W - (r - z) s, beta)                 # sparse "outlier" part of the error, l_p prox
    z   = mean_group(r - (W - W_e) / s)                 # closed-form zero point
    beta *= kappa

with ``shrink_p(x, beta) = sign(x) relu(|x| - |x|^(p-1) / beta)`` and HQQ's defaults ``p = 0.7``,
``beta = 10``, ``kappa = 1.01``, ``iters = 20``; the loop stops when the mean absolute weight error stops
improving and keeps the best zero point (the reference keeps the one after the failing step).
``optimize_scale=True`` also refits the group scale by least squares each step (``s = <r-z, W-W_e> /
||r-z||^2``), an extension; the paper's released code optimises the zero point only.

Specs must be asymmetric integer ones; ``zp=float`` (HQQ's float zero point, stored like the scale) is the
natural choice, ``zp=int`` rounds the zero point each step. Scale and zero point are rounded to their
storage dtype before the final codes are computed, so ``dequantize`` is exact.

Example:
    >>> import jax, jax.numpy as jnp
    >>> W = jax.random.normal(jax.random.key(0), (128, 16))
    >>> q = hqq(W, "int4/g64/asym/zp=float")
    >>> q.zero_point.shape
    (2, 1, 16)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qlab.numerics.formats import IntFormat
from qlab.numerics.granularity import PerChannel, PerGroup
from qlab.numerics.qtensor import QTensor
from qlab.numerics.ranges import minmax, scale_and_zero_point, store_scale
from qlab.numerics.spec import QuantSpec
from qlab.ptq.rtn import group_size, resolve_weight_spec

__all__ = ["hqq", "shrink_lp"]

_F32 = jnp.float32


def shrink_lp(x, beta, p: float = 0.7):
    """Generalised soft-thresholding, the proximal step of the ``l_p`` norm (p < 1) used by HQQ.

    Example:
        >>> import jax.numpy as jnp
        >>> shrink_lp(jnp.array([0.0, 0.01, 1.0]), 10.0).tolist()[0]
        0.0
    """
    ax = jnp.abs(x)
    if p == 1:
        return jnp.sign(x) * jax.nn.relu(ax - 1.0 / beta)
    return jnp.sign(x) * jax.nn.relu(ax - (1.0 / beta) * jnp.power(jnp.where(ax > 0, ax, 1.0), p - 1))


def _store_zp(z, spec: QuantSpec):
    fmt = spec.fmt
    if spec.zero_point == "int":
        return jnp.clip(jnp.round(z), fmt.qmin, fmt.qmax)
    if spec.scale_dtype == "f16":
        return z.astype(jnp.float16).astype(_F32)
    if spec.scale_dtype == "bf16":
        return z.astype(jnp.bfloat16).astype(_F32)
    return z


@functools.partial(jax.jit, static_argnames=("spec", "iters", "p", "optimize_scale"))
def _hqq_view(Wv, *, spec, iters, p, beta, kappa, optimize_scale):
    fmt = spec.fmt
    qmin, qmax = float(fmt.qmin), float(fmt.qmax)
    lo, hi = minmax(Wv, (1,))
    s0, z0 = scale_and_zero_point(lo, hi, spec)

    def codes(s, z):
        return jnp.clip(jnp.round(Wv / s + z), qmin, qmax)

    def err(s, z):
        return jnp.mean(jnp.abs(Wv - (codes(s, z) - z) * s))

    def step(i, st):
        s, z, beta, best_s, best_z, best_e, stopped = st
        r = codes(s, z)
        Wr = (r - z) * s
        e_now = jnp.mean(jnp.abs(Wv - Wr))
        improved = e_now < best_e
        stopped = stopped | ~improved
        best_s = jnp.where(stopped, best_s, s)
        best_z = jnp.where(stopped, best_z, z)
        best_e = jnp.where(stopped, best_e, e_now)
        We = shrink_lp(Wv - Wr, beta, p)
        T = Wv - We
        if optimize_scale:
            c = r - z
            num = jnp.sum(c * T, axis=1, keepdims=True)
            den = jnp.sum(c * c, axis=1, keepdims=True)
            s = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), s)
            s = jnp.where(s > 0, s, best_s)
        z = jnp.mean(r - T / s, axis=1, keepdims=True)
        if spec.zero_point == "int":
            z = jnp.clip(jnp.round(z), qmin, qmax)
        return s, z, beta * kappa, best_s, best_z, best_e, stopped

    init = (s0, z0, jnp.float32(beta), s0, z0, jnp.float32(jnp.inf), jnp.bool_(False))
    s, z, _, best_s, best_z, best_e, stopped = jax.lax.fori_loop(0, iters, step, init)
    e_last = err(s, z)
    use_last = (~stopped) & (e_last < best_e)
    s = jnp.where(use_last, s, best_s)
    z = jnp.where(use_last, z, best_z)
    s = store_scale(s, spec, qmax - qmin)
    z = _store_zp(z, spec)
    r = codes(s, z)
    return r, s, z


def hqq(W, spec, *, iters: int = 20, lp_norm: float = 0.7, beta: float = 10.0, kappa: float = 1.01,
        optimize_scale: bool = False) -> QTensor:
    """HQQ-quantize kernel ``W (in, out)`` (no calibration data); ``spec`` must be an asymmetric integer
    spec, per-channel or grouped along the input axis, typically ``"int4/g64/asym/zp=float"``.

    Returns a QTensor (``zero_point`` holds HQQ's float zero points) whose ``dequantize`` is the HQQ weight.
    """
    spec = resolve_weight_spec(spec, require_rows=True)
    if not isinstance(spec.fmt, IntFormat) or spec.symmetric:
        raise ValueError(f"hqq: needs an asymmetric integer spec (e.g. 'int4/g64/asym/zp=float'), got {str(spec)!r}")
    if spec.zero_point == "min":
        raise ValueError(f"hqq: spec {str(spec)!r}: zero_point='min' (a minimum in value units, as q4_1/q5_1) is "
                         "not HQQ's parametrisation; use zp=float or zp=int")
    if spec.tensor_scale:
        raise ValueError("hqq: specs with a second-level tensor scale ('ts') are not supported")
    W = jnp.asarray(W, _F32)
    n_in, n_out = W.shape
    grouped = isinstance(spec.granularity, PerGroup)
    G = group_size(spec, n_in) if grouped else n_in
    if not grouped and not isinstance(spec.granularity, PerChannel):
        raise ValueError("hqq: per-tensor specs are not supported; use per-channel or groups")
    Wv = W.reshape(n_in // G, G, n_out)
    r, s, z = _hqq_view(Wv, spec=spec, iters=iters, p=lp_norm, beta=beta, kappa=kappa,
                        optimize_scale=optimize_scale)
    codes = spec.fmt.encode(r.reshape(n_in, n_out))
    if grouped:
        scale, zp = s, z  # (ng, 1, out): the grouped view's scale shape
    else:
        scale, zp = s.reshape(1, n_out), z.reshape(1, n_out)
    return QTensor(codes, scale, zp, None, spec, (n_in, n_out), np.dtype(np.float32))

