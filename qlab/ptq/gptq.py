"""GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, arXiv:2210.17323) for one ``(in, out)`` kernel.

Given the layer-input Hessian ``H = X^T X`` (``in x in``), input rows of the kernel are quantized one at a
time and the rounding error of each row is pushed onto the rows not yet quantized, weighted by the Cholesky
factor of ``H^-1``, so the *layer output* error ``||X W - X Q||^2`` rather than the weight error is minimised.

What this implementation does, step by step (the reference code's order):

1. dead inputs (``H_ii == 0``) get ``H_ii = 1`` and a zero weight row;
2. ``act_order``: rows are processed in order of decreasing ``H_ii`` and un-permuted at the end;
3. dampening: ``H += damp * mean(diag H) * I`` (``damp=0.01``: 1 %); if the Cholesky still fails the
   dampening is multiplied by 10 (at most 4 times) and a warning says so;
4. ``U = chol(H^-1)`` (upper), then a sweep over blocks of ``block_size`` rows: inside a block rows are
   quantized one by one (a jitted ``lax.fori_loop``) with eager updates of the block; the rest of the kernel
   gets one lazy matrix update per block (``W[i2:] -= U[i1:i2, i2:]^T E``);
5. scales: per-channel / per-tensor scales come from the whole kernel up front (as the reference); group
   scales are computed when the sweep reaches the group, from the *updated* rows (the block size is
   adjusted so each group starts a block); ``static_groups`` computes all group scales from the original
   kernel up front, which act-order with groups needs (otherwise groups would be of permuted rows and the
   result would not be representable as ordinary ``g<G>`` groups: that combination is an error).

Every row is rounded with ``spec.fmt.round`` against the stored (dtype-rounded) scales, so the result is a
QTensor whose ``dequantize`` is exactly the weights GPTQ used when propagating errors.

Example:
    >>> import jax, jax.numpy as jnp
    >>> X = jax.random.normal(jax.random.key(0), (512, 64))
    >>> W = jax.random.normal(jax.random.key(1), (64, 16))
    >>> q = gptq(W, X.T @ X, "int4/g32")
    >>> q.codes.shape, q.scale.shape
    ((64, 16), (2, 1, 16))
"""

from __future__ import annotations

import functools
import math
import warnings

import jax
import jax.numpy as jnp

from qlab.numerics.granularity import PerGroup, PerTensor
from qlab.numerics.qtensor import QTensor
from qlab.numerics.spec import QuantSpec
from qlab.ptq.rtn import (
    grid_round,
    group_params,
    group_size,
    qtensor_from_grid,
    resolve_weight_spec,
    tensor_scale_of,
)

__all__ = ["gptq", "gptq_block_size", "inverse_hessian_cholesky"]

_F32 = jnp.float32


def gptq_block_size(block_size: int, group: int | None) -> int:
    """Block size actually used: with dynamic groups, every group must start a block.

    Example:
        >>> gptq_block_size(128, 64), gptq_block_size(128, 256), gptq_block_size(128, None)
        (64, 128, 128)
    """
    if group is None:
        return block_size
    if group <= block_size:
        return group
    return math.gcd(group, block_size)


def _inv_chol_retry(H, damp, tries: int = 5):
    """(U, damp used): upper Cholesky factor of the damped inverse Hessian; the dampening grows 10x per try
    (at most ``tries``) while the factorisation has non-finite entries. Traceable."""
    n = H.shape[0]
    mean_diag = jnp.mean(jnp.diag(H))
    eye = jnp.eye(n, dtype=H.dtype)

    def factor(d):
        L = jnp.linalg.cholesky(H + d * mean_diag * eye)
        Hinv = jax.scipy.linalg.cho_solve((L, True), eye)
        return jnp.linalg.cholesky(0.5 * (Hinv + Hinv.T)).T  # upper: Hinv = U^T U

    def cond(st):
        U, d, k = st
        return (k < tries) & ~jnp.all(jnp.isfinite(U))

    def body(st):
        _, d, k = st
        d = d * 10.0
        return factor(d), d, k + 1

    d0 = jnp.asarray(damp, jnp.float32)
    U, d, _ = jax.lax.while_loop(cond, body, (factor(d0), d0, jnp.int32(1)))
    return U, d


def inverse_hessian_cholesky(H, damp: float = 0.01):
    """Upper Cholesky factor ``U`` of ``(H + damp*mean(diag H)*I)^-1`` (``U^T U = H^-1``), raising the
    dampening 10x (up to 4 times) when the factorisation fails. Returns ``(U, damp_used)``."""
    U, d = jax.jit(_inv_chol_retry)(jnp.asarray(H, _F32), damp)
    if not bool(jnp.all(jnp.isfinite(U))):
        raise FloatingPointError(f"GPTQ: Cholesky of the damped Hessian failed even with damp={float(d):g}")
    return U, float(d)


@functools.partial(jax.jit, static_argnames=("spec", "B", "G", "dynamic_groups", "per_tensor"))
def _sweep(W, U, S, Z, tscale, *, spec: QuantSpec, B: int, G: int, dynamic_groups: bool, per_tensor: bool):
    """The blocked GPTQ sweep on (already permuted, padded) ``W (n, out)``; returns grid values and the
    per-row scales/zero points actually used."""
    n, n_out = W.shape
    nb = n // B
    has_zp = Z is not None
    cols = jnp.arange(n)

    def block(carry, b):
        W, S, Z, R = carry
        i1 = b * B
        if dynamic_groups:
            def new_group(args):
                W, S, Z = args
                rows = jax.lax.dynamic_slice(W, (i1, 0), (G, n_out))
                s, z = group_params(rows, spec, tscale)
                S = jax.lax.dynamic_update_slice(S, jnp.broadcast_to(s, (G, n_out)), (i1, 0))
                if has_zp:
                    Z = jax.lax.dynamic_update_slice(Z, jnp.broadcast_to(z, (G, n_out)), (i1, 0))
                return W, S, Z

            W, S, Z = jax.lax.cond(i1 % G == 0, new_group, lambda a: a, (W, S, Z))
        W1 = jax.lax.dynamic_slice(W, (i1, 0), (B, n_out))
        S1 = jax.lax.dynamic_slice(S, (i1, 0), (B, n_out))
        Z1 = jax.lax.dynamic_slice(Z, (i1, 0), (B, n_out)) if has_zp else None
        U1 = jax.lax.dynamic_slice(U, (i1, 0), (B, n))          # this block's rows of U
        Ub = jax.lax.dynamic_slice(U1, (0, i1), (B, B))         # upper triangular block

        def row(i, st):
            W1, R1, E1 = st
            w = W1[i]
            r, q = grid_round(w, S1[i], None if Z1 is None else Z1[i], tscale, spec)
            e = (w - q) / Ub[i, i]
            W1 = W1 - Ub[i][:, None] * e[None, :]  # Ub[i, j] == 0 for j < i
            return W1, R1.at[i].set(r), E1.at[i].set(e)

        zeros = jnp.zeros((B, n_out), _F32)
        _, R1, E1 = jax.lax.fori_loop(0, B, row, (W1, zeros, zeros))
        U_rest = jnp.where(cols[None, :] >= i1 + B, U1, 0.0)  # only rows after this block
        W = W - U_rest.T @ E1
        R = jax.lax.dynamic_update_slice(R, R1, (i1, 0))
        return (W, S, Z, R), None

    R0 = jnp.zeros_like(W)
    (_, S, Z, R), _ = jax.lax.scan(block, (W, S, Z, R0), jnp.arange(nb))
    return R, S, Z


def gptq(W, H, spec, *, damp: float = 0.01, block_size: int = 128, act_order: bool = False,
         static_groups: bool | None = None) -> QTensor:
    """GPTQ-quantize kernel ``W (in, out)`` given the input Hessian ``H = X^T X (in, in)``.

    Args:
        W: float kernel in Flax layout ``(in, out)``.
        H: ``X^T X`` of the layer inputs (any positive multiple works: GPTQ is scale-invariant in H).
        spec: weight QuantSpec or string (``"int4/g128"``, ``"int3/g128/asym"``, ``"int8/ch"``, ...):
            per-tensor, per-channel or groups along the input axis; integer, minifloat or codebook formats.
        damp: dampening as a fraction of ``mean(diag H)``.
        block_size: rows per lazy-update block (reduced so that every group starts a block).
        act_order: quantize rows in order of decreasing ``H_ii`` (the "desc_act" heuristic).
        static_groups: compute all group scales from the unquantized kernel up front. Default: True with
            ``act_order`` and groups (required then), False otherwise.

    Returns:
        A QTensor with the resolved spec; ``qlab.dequantize`` of it is the GPTQ weight. Traceable: under
        ``jax.jit`` / ``jax.export`` the host-side checks (finite Hessian, a Cholesky that succeeded, the
        warning about a raised dampening) are skipped.
    """
    spec = resolve_weight_spec(spec, require_rows=True)
    W = jnp.asarray(W, _F32)
    H = jnp.asarray(H, _F32)
    if W.ndim != 2:
        raise ValueError(f"gptq: W must be a 2-D (in, out) kernel, got shape {W.shape}")
    n_in, n_out = W.shape
    if H.shape != (n_in, n_in):
        raise ValueError(f"gptq: H must be ({n_in}, {n_in}) for W of shape {W.shape}, got {H.shape}")
    traced = isinstance(H, jax.core.Tracer) or isinstance(W, jax.core.Tracer)  # inside jit / export: no host checks
    if not traced and not bool(jnp.all(jnp.isfinite(H))):
        raise ValueError("gptq: the Hessian has non-finite entries")
    grouped = isinstance(spec.granularity, PerGroup)
    per_tensor = isinstance(spec.granularity, PerTensor)
    G = group_size(spec, n_in)
    if static_groups is None:
        static_groups = act_order and grouped
    if act_order and grouped and not static_groups:
        raise ValueError(
            "gptq: act_order with per-group scales needs static_groups=True (dynamic groups of permuted "
            "rows would not be contiguous g<G> groups of the stored format)"
        )

    dynamic = grouped and not static_groups
    B = gptq_block_size(block_size, G if dynamic else None)
    R, S, Z, tscale, d_used = _gptq_core(W, H, jnp.float32(damp), spec=spec, G=G, B=B, grouped=grouped,
                                         static_groups=bool(static_groups), act_order=bool(act_order),
                                         per_tensor=per_tensor)
    if traced:
        return qtensor_from_grid(R, S, Z, tscale, spec)
    if not bool(jnp.all(jnp.isfinite(R))):
        raise FloatingPointError(f"gptq: Cholesky of the damped Hessian failed even with damp={float(d_used):g}")
    if float(d_used) != float(jnp.float32(damp)):
        warnings.warn(f"gptq: Hessian not positive definite with damp={damp}; used damp={float(d_used):g}")
    return qtensor_from_grid(R, S, Z, tscale, spec)


@functools.partial(jax.jit, static_argnames=("spec", "G", "B", "grouped", "static_groups", "act_order", "per_tensor"))
def _gptq_core(W, H, damp, *, spec, G, B, grouped, static_groups, act_order, per_tensor):
    n_in, n_out = W.shape
    # 1. dead inputs
    diag = jnp.diag(H)
    dead = diag == 0
    H = H + jnp.diag(jnp.where(dead, 1.0, 0.0))
    W = jnp.where(dead[:, None], 0.0, W)
    tscale = tensor_scale_of(W, spec)

    # scales known up front: per-channel / per-tensor from the whole kernel, static groups per group
    dynamic = grouped and not static_groups
    if grouped:
        if static_groups:
            s, z = jax.vmap(lambda rows: group_params(rows, spec, tscale))(W.reshape(n_in // G, G, n_out))
            S = jnp.repeat(s.reshape(n_in // G, n_out), G, axis=0)
            Z = None if z is None else jnp.repeat(z.reshape(n_in // G, n_out), G, axis=0)
        else:
            S = jnp.ones((n_in, n_out), _F32)
            Z = None if spec.symmetric else jnp.zeros((n_in, n_out), _F32)
    else:
        s, z = group_params(W, spec, tscale, per_tensor=per_tensor)
        S = jnp.broadcast_to(s, (n_in, n_out))
        Z = None if z is None else jnp.broadcast_to(z, (n_in, n_out))

    # 2. act order
    perm = None
    if act_order:
        perm = jnp.argsort(-jnp.diag(H), stable=True)
        W, H, S = W[perm], H[perm][:, perm], S[perm]
        Z = None if Z is None else Z[perm]

    # 3./4. inverse Hessian factor and the sweep
    U, d_used = _inv_chol_retry(H, damp)
    n_pad = -(-n_in // B) * B
    if n_pad != n_in:  # only without dynamic groups (B divides G divides n_in otherwise)
        p = n_pad - n_in
        W = jnp.pad(W, ((0, p), (0, 0)))
        S = jnp.pad(S, ((0, p), (0, 0)), constant_values=1.0)
        Z = None if Z is None else jnp.pad(Z, ((0, p), (0, 0)))
        U = jnp.pad(U, ((0, p), (0, p))) + jnp.diag(jnp.concatenate([jnp.zeros(n_in), jnp.ones(p)]))
    R, S, Z = _sweep(W, U, S, Z, tscale, spec=spec, B=B, G=G if dynamic else n_pad,
                     dynamic_groups=dynamic, per_tensor=per_tensor)
    R, S = R[:n_in], S[:n_in]
    Z = None if Z is None else Z[:n_in]
    if perm is not None:
        inv = jnp.argsort(perm)
        R, S = R[inv], S[inv]
        Z = None if Z is None else Z[inv]
    return R, S, Z, tscale, d_used
