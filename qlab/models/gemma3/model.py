"""The Gemma 3 (text) decoder as a plain float32 Flax NNX model: config, layers, and the model itself.

Every weight multiply is a standard NNX module so quantization rules can find it by path::

    embed                                   nnx.Embed (also the tied output projection, via embed.attend)
    layers[i].attn.{q,k,v,o}_proj           nnx.Linear(use_bias=False)
    layers[i].mlp.{gate,up,down}_proj       nnx.Linear(use_bias=False)
    layers[i].{pre,post}_{attn,ffn}_norm, layers[i].attn.{q,k}_norm, final_norm     RMSNorm

Architecture (Gemma 3 270M's values are :class:`Gemma3Config`'s defaults): GQA attention with QK-norm,
GeGLU FFN (tanh GELU), sandwich RMSNorms, NeoX-style (half-split) RoPE with one base on local layers and
another on global ones, local layers attend to the last ``sliding_window`` positions (self included), every
``sliding_window_pattern``-th layer is global, queries scaled by ``query_pre_attn_scalar**-0.5``, embeddings
scaled by ``sqrt(d_model)`` and tied to the output projection.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0))(jnp.zeros((1, 5), jnp.int32)).shape
    (1, 5, 320)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

__all__ = [
    "Gemma3Config",
    "Gemma3",
    "RMSNorm",
    "Attention",
    "MLP",
    "Block",
    "apply_rope",
    "attention_mask",
    "sliding_window_period",
]


@dataclass(frozen=True)
class Gemma3Config:
    """Hyperparameters; the defaults are Gemma 3 270M's.

    Example:
        >>> cfg = Gemma3Config()
        >>> cfg.n_layers, [i for i in range(cfg.n_layers) if not cfg.is_local(i)]
        (18, [5, 11, 17])
    """

    vocab_size: int = 262_144
    d_model: int = 640
    n_layers: int = 18
    n_heads: int = 4
    n_kv_heads: int = 1
    head_dim: int = 256
    ffn_dim: int = 2048
    sliding_window: int = 512
    sliding_window_pattern: int = 6  # every 6th layer (index 5, 11, 17) is global, the others local
    rope_base_local: float = 10_000.0
    rope_base_global: float = 1_000_000.0
    rms_eps: float = 1e-6
    query_pre_attn_scalar: float = 256.0  # queries are multiplied by query_pre_attn_scalar**-0.5
    context_length: int = 32_768
    bos_id: int = 2
    eos_id: int = 1
    pad_id: int = 0
    # the dtype the weights were released in (qlab computes in float32): what qlab.nn.model_size counts the
    # float baseline in beside float32; Gemma 3 is released in bfloat16
    native_dtype: str = "bfloat16"
    remat: bool = False  # recompute each block in the backward pass (nnx.remat): less memory, same values

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

    def is_local(self, layer: int) -> bool:
        """Whether ``layer`` uses sliding-window attention (and the local RoPE base).

        Example:
            >>> Gemma3Config(sliding_window_pattern=2).is_local(0), Gemma3Config(sliding_window_pattern=2).is_local(1)
            (True, False)
        """
        return (layer + 1) % self.sliding_window_pattern != 0

    @property
    def query_scale(self) -> float:
        """The factor queries are multiplied by: ``query_pre_attn_scalar ** -0.5``.

        Example:
            >>> Gemma3Config().query_scale
            0.0625
        """
        return float(self.query_pre_attn_scalar) ** -0.5

    @classmethod
    def tiny(cls, **overrides) -> "Gemma3Config":
        """A Gemma-shaped toy config for tests: 6 layers (5 local, 1 global), GQA 4:2, window 4.

        Example:
            >>> Gemma3Config.tiny(n_layers=2).d_model
            32
        """
        kw = dict(vocab_size=320, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64,
                  sliding_window=4, query_pre_attn_scalar=16.0, context_length=128)
        kw.update(overrides)
        return cls(**kw)


def sliding_window_period(is_local: Sequence[bool]) -> int:
    """The ``sliding_window_pattern`` that gives this per-layer list (True = sliding-window layer).

    Files store the layer pattern as such a list; :class:`Gemma3Config` keeps its period (every period-th layer
    is global; a period longer than the model means all layers are local). Raises ValueError when no period fits.

    Example:
        >>> sliding_window_period([True] * 5 + [False] + [True] * 5 + [False])
        6
        >>> sliding_window_period([True, True, True])
        4
    """
    flags = [bool(s) for s in is_local]
    for period in range(1, len(flags) + 2):
        if all(s == ((i + 1) % period != 0) for i, s in enumerate(flags)):
            return period
    raise ValueError(f"unsupported sliding window layer pattern {flags}")


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, in float32. ``weight`` is used as stored (Gemma's ``1 + w`` is folded into it).

    Example:
        >>> import jax.numpy as jnp
        >>> jnp.round(RMSNorm(2)(jnp.asarray([[3.0, -3.0]])), 4).tolist()
        [[1.0, -1.0]]
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        self.weight = nnx.Param(jnp.ones((dim,), jnp.float32))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.weight[...]).astype(x.dtype)


def _linear(din: int, dout: int, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=False, rngs=rngs,
                      kernel_init=nnx.initializers.normal(stddev=din ** -0.5))


def apply_rope(x, positions, base: float):
    """NeoX-style rotary embedding (rotate halves), as Gemma and llama.cpp's gemma3 (ROPE_TYPE_NEOX) use.

    x: [B, T, H, D]; positions: [B, T] int. Position 0 is left unchanged.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.ones((1, 2, 1, 4))
        >>> y = apply_rope(x, jnp.asarray([[0, 3]]), 10_000.0)
        >>> bool(jnp.allclose(y[0, 0], x[0, 0])), bool(jnp.allclose(jnp.linalg.norm(y[0, 1]), 2.0))
        (True, True)
    """
    d = x.shape[-1]
    half = d // 2
    inv_freq = 1.0 / (base ** (jnp.arange(half, dtype=jnp.float32) * 2.0 / d))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(q_pos, k_pos, sliding_window: int | None):
    """Boolean [B, Tq, Tk]: causal, and when ``sliding_window`` is set, key within the last ``window`` positions
    (``q - window < k <= q``, so a query sees itself and window-1 earlier tokens, like HF and llama.cpp).

    Example:
        >>> import jax.numpy as jnp
        >>> pos = jnp.arange(4)[None]
        >>> attention_mask(pos, pos, 2)[0].astype(int).tolist()
        [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]
    """
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    mask = diff >= 0
    if sliding_window is not None:
        mask = mask & (diff < sliding_window)
    return mask


class Attention(nnx.Module):
    """Grouped-query attention with QK-norm and RoPE: query head h uses KV head h // (n_heads / n_kv_heads).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> pos = jnp.arange(3)[None]
        >>> attn = Attention(Gemma3Config.tiny(), rngs=nnx.Rngs(0))
        >>> attn(jnp.ones((1, 3, 32)), pos, attention_mask(pos, pos, None), 10_000.0).shape
        (1, 3, 32)
    """

    def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.query_scale
        self.q_proj = _linear(cfg.d_model, cfg.n_heads * cfg.head_dim, rngs)
        self.k_proj = _linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, rngs)
        self.v_proj = _linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, rngs)
        self.o_proj = _linear(cfg.n_heads * cfg.head_dim, cfg.d_model, rngs)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)

    def __call__(self, x, positions, mask, rope_base: float, kv=None):
        """Attention output [B, T, d_model]. With ``kv = (k_cache, v_cache, index)`` (caches [B, S, n_kv_heads,
        head_dim]), this call's keys and values are written at slots ``index .. index + T - 1`` first, the
        queries attend over all S slots (``mask``: [B, T, S]), and ``(output, (k_cache, v_cache))`` is returned."""
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        q = apply_rope(self.q_norm(q), positions, rope_base) * self.scale
        k = apply_rope(self.k_norm(k), positions, rope_base)
        if kv is not None:
            k_cache, v_cache, index = kv
            k = jax.lax.dynamic_update_slice_in_dim(k_cache, k.astype(k_cache.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(v_cache, v.astype(v_cache.dtype), index, axis=1)
        g = self.n_heads // self.n_kv_heads  # query heads per KV head (GQA); head h uses KV head h // g
        q = q.reshape(b, t, self.n_kv_heads, g, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out) if kv is None else (self.o_proj(out), (k, v))


class MLP(nnx.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x)).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> MLP(Gemma3Config.tiny(), rngs=nnx.Rngs(0))(jnp.ones((1, 3, 32))).shape
        (1, 3, 32)
    """

    def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg.d_model, cfg.ffn_dim, rngs)
        self.up_proj = _linear(cfg.d_model, cfg.ffn_dim, rngs)
        self.down_proj = _linear(cfg.ffn_dim, cfg.d_model, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))


class Block(nnx.Module):
    """Sandwich-norm block: x + post_norm(attn(pre_norm(x))), then the same around the MLP.

    Example:
        >>> from flax import nnx
        >>> cfg = Gemma3Config.tiny()
        >>> [(b.is_local, b.rope_base) for b in (Block(cfg, 0, rngs=nnx.Rngs(0)), Block(cfg, 5, rngs=nnx.Rngs(0)))]
        [(True, 10000.0), (False, 1000000.0)]
    """

    def __init__(self, cfg: Gemma3Config, layer: int, *, rngs: nnx.Rngs):
        self.is_local = cfg.is_local(layer)
        self.rope_base = cfg.rope_base_local if self.is_local else cfg.rope_base_global
        self.pre_attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.pre_ffn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = MLP(cfg, rngs=rngs)
        self.post_ffn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)

    def __call__(self, x, positions, local_mask, global_mask, kv=None):
        """The block's output; with ``kv`` (see :meth:`Attention.__call__`), ``(output, (k_cache, v_cache))``."""
        mask = local_mask if self.is_local else global_mask
        a = self.attn(self.pre_attn_norm(x), positions, mask, self.rope_base, kv)
        a, new_kv = (a, None) if kv is None else a
        x = x + self.post_attn_norm(a)
        x = x + self.post_ffn_norm(self.mlp(self.pre_ffn_norm(x)))
        return x if kv is None else (x, new_kv)


@nnx.remat
def _remat_block(block, x, positions, local_mask, global_mask):
    return block(x, positions, local_mask, global_mask)


class Gemma3(nnx.Module):
    """Gemma 3 decoder. ``model(tokens[int32 B, T]) -> logits[float32 B, T, vocab]``.

    ``features(tokens)`` gives the final-normed hidden states and ``unembed(h)`` the logits, so long
    sequences can be scored without materialising every logit at once (see ``qlab.evaluate.token_nll``).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> model = Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0))
        >>> h = model.features(jnp.zeros((1, 5), jnp.int32))
        >>> h.shape, model.unembed(h).shape
        ((1, 5, 32), (1, 5, 320))
    """

    def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                               embedding_init=nnx.initializers.normal(stddev=1.0 / math.sqrt(cfg.d_model)))
        self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_eps)

    def features(self, tokens, positions=None):
        """Final-normed hidden states [B, T, d_model] of ``tokens`` [B, T] (positions default to 0..T-1)."""
        tokens = jnp.asarray(tokens, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = self._embed(tokens)
        global_mask = attention_mask(positions, positions, None)
        local_mask = attention_mask(positions, positions, self.config.sliding_window)
        for layer in self.layers:
            if self.config.remat:
                x = _remat_block(layer, x, positions, local_mask, global_mask)
            else:
                x = layer(x, positions, local_mask, global_mask)
        return self.final_norm(x)

    def init_kv_cache(self, batch: int, length: int, dtype=jnp.float32) -> tuple:
        """Zeroed key/value caches for :meth:`features_cached`: one ``(k, v)`` pair per layer, each
        [batch, length, n_kv_heads, head_dim].

        Example:
            >>> from flax import nnx
            >>> cache = Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0)).init_kv_cache(1, 8)
            >>> len(cache), cache[0][0].shape
            (6, (1, 8, 2, 16))
        """
        cfg = self.config
        shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
        return tuple((jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers))

    def features_cached(self, tokens, index, cache):
        """Hidden states of ``tokens`` [B, T] at positions ``index .. index + T - 1``, attending to the
        cached keys and values of the earlier positions: ``(h [B, T, d_model], new_cache)``. Slots after
        the last written position are masked (causal), so a cache may be longer than what it holds.

        Example:
            >>> import jax.numpy as jnp
            >>> from flax import nnx
            >>> model = Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0))
            >>> ids = jnp.asarray([[2, 40, 41, 42]])
            >>> h0, cache = model.features_cached(ids[:, :3], 0, model.init_kv_cache(1, 8))
            >>> h1, cache = model.features_cached(ids[:, 3:], 3, cache)
            >>> bool(jnp.allclose(h1[0, 0], model.features(ids)[0, 3], atol=1e-5))
            True
        """
        tokens = jnp.asarray(tokens, jnp.int32)
        b, t = tokens.shape
        positions = jnp.broadcast_to(index + jnp.arange(t, dtype=jnp.int32), (b, t))
        slots = jnp.broadcast_to(jnp.arange(cache[0][0].shape[1], dtype=jnp.int32), (b, cache[0][0].shape[1]))
        global_mask = attention_mask(positions, slots, None)
        local_mask = attention_mask(positions, slots, self.config.sliding_window)
        x = self._embed(tokens)
        new_cache = []
        for layer, (k, v) in zip(self.layers, cache):
            x, kv = layer(x, positions, local_mask, global_mask, (k, v, index))
            new_cache.append(kv)
        return self.final_norm(x), tuple(new_cache)

    def _embed(self, tokens):
        x = self.embed(tokens)
        return x * jnp.asarray(math.sqrt(self.config.d_model), dtype=x.dtype)  # Gemma casts the normalizer to x.dtype

    @property
    def native_dtype(self) -> str:
        """The dtype the weights were released in (``config.native_dtype``), e.g. ``"bfloat16"``."""
        return self.config.native_dtype

    def unembed(self, h):
        """Logits [..., vocab] of hidden states ``h`` through the tied embedding."""
        return self.embed.attend(h)  # tied output projection

    def __call__(self, tokens, positions=None):
        return self.unembed(self.features(tokens, positions))
