"""A small decoder-only (GPT-style, pre-LayerNorm) transformer for character/byte-level language modelling.

Every weight multiply goes through a standard module (``nnx.Embed``, ``nnx.Linear``); attention
scores and the weighted sum of values are ``jnp.einsum`` calls inside :class:`CausalSelfAttention`.

Module paths (for regex rules): ``embed``, ``pos_embed`` (learned positions only),
``blocks.<i>.ln1``, ``blocks.<i>.attn.{query,key,value,out}``, ``blocks.<i>.ln2``,
``blocks.<i>.mlp.{up,down}``, ``ln_f``, ``head`` (absent when ``tie_embeddings``).

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qlab.models import TransformerConfig, Transformer
    >>> cfg = TransformerConfig(vocab_size=80, d_model=64, n_layers=2, n_heads=4, d_ff=128, max_len=32)
    >>> Transformer(cfg, rngs=nnx.Rngs(0))(jnp.zeros((2, 16), jnp.int32)).shape
    (2, 16, 80)
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["TransformerConfig", "Transformer", "CharTransformer", "CausalSelfAttention", "FeedForward", "Block"]


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Shape of a :class:`Transformer`.

    ``positions``: ``"learned"`` (an ``nnx.Embed`` of ``max_len`` rows) or ``"sinusoidal"`` (fixed).
    ``tie_embeddings``: logits via ``embed.attend`` instead of a separate ``head`` ``nnx.Linear``.
    ``remat``: rematerialise each block (``nnx.remat``): its activations are recomputed in the backward
    pass instead of stored, trading compute for memory; the values and gradients are unchanged.

    Example:
        >>> TransformerConfig(vocab_size=256).d_head
        64
    """

    vocab_size: int
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 1024
    max_len: int = 128
    positions: str = "learned"
    tie_embeddings: bool = False
    layer_norm_eps: float = 1e-5
    remat: bool = False

    def __post_init__(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}")
        if self.positions not in ("learned", "sinusoidal"):
            raise ValueError(f"positions must be 'learned' or 'sinusoidal', got {self.positions!r}")

    @property
    def d_head(self) -> int:
        """Width of one attention head.

        Example:
            >>> TransformerConfig(vocab_size=10, d_model=64, n_heads=8).d_head
            8
        """
        return self.d_model // self.n_heads


@functools.lru_cache(maxsize=64)
def sinusoidal_positions(max_len: int, d_model: int) -> np.ndarray:
    """The fixed sine/cosine position table of "Attention Is All You Need", (max_len, d_model) float32.

    Example:
        >>> sinusoidal_positions(4, 6).shape
        (4, 6)
    """
    pos = np.arange(max_len)[:, None]
    i = np.arange(0, d_model, 2)[None, :]
    angles = pos / np.power(10000.0, i / d_model)
    table = np.zeros((max_len, d_model), np.float32)
    table[:, 0::2] = np.sin(angles)
    table[:, 1::2] = np.cos(angles[:, : d_model // 2])
    table.flags.writeable = False
    return table


class CausalSelfAttention(nnx.Module):
    """Multi-head causal self-attention: ``query``/``key``/``value``/``out`` are ``nnx.Linear``;
    scores ``einsum('bqhd,bkhd->bhqk')`` and the weighted sum ``einsum('bhqk,bkhd->bqhd')``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> attn = CausalSelfAttention(32, 4, rngs=nnx.Rngs(0))
        >>> attn(jnp.ones((2, 5, 32))).shape
        (2, 5, 32)
    """

    def __init__(self, d_model: int, n_heads: int, *, rngs: nnx.Rngs):
        self.n_heads = n_heads
        self.d_head = d_model // n_heads
        self.query = nnx.Linear(d_model, d_model, rngs=rngs)
        self.key = nnx.Linear(d_model, d_model, rngs=rngs)
        self.value = nnx.Linear(d_model, d_model, rngs=rngs)
        self.out = nnx.Linear(d_model, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.n_heads, self.d_head)
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(self.d_head)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        scores = jnp.where(causal, scores, jnp.finfo(scores.dtype).min)
        weights = jax.nn.softmax(scores, axis=-1)
        y = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, -1)
        return self.out(y)


class FeedForward(nnx.Module):
    """``up`` (d_model -> d_ff), GELU, ``down`` (d_ff -> d_model).

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> FeedForward(16, 64, rngs=nnx.Rngs(0))(jnp.ones((1, 3, 16))).shape
        (1, 3, 16)
    """

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs):
        self.up = nnx.Linear(d_model, d_ff, rngs=rngs)
        self.down = nnx.Linear(d_ff, d_model, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


class Block(nnx.Module):
    """Pre-LN transformer block: ``x + attn(ln1(x))``, then ``x + mlp(ln2(x))``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = TransformerConfig(vocab_size=10, d_model=16, n_heads=2, d_ff=32)
        >>> Block(cfg, rngs=nnx.Rngs(0))(jnp.ones((1, 4, 16))).shape
        (1, 4, 16)
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        eps = config.layer_norm_eps
        self.ln1 = nnx.LayerNorm(config.d_model, epsilon=eps, rngs=rngs)
        self.attn = CausalSelfAttention(config.d_model, config.n_heads, rngs=rngs)
        self.ln2 = nnx.LayerNorm(config.d_model, epsilon=eps, rngs=rngs)
        self.mlp = FeedForward(config.d_model, config.d_ff, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Transformer(nnx.Module):
    """Decoder-only transformer: int tokens (B, T) -> logits (B, T, vocab_size), T <= max_len.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> cfg = TransformerConfig(vocab_size=50, d_model=32, n_layers=1, n_heads=2, d_ff=64,
        ...                         max_len=16, positions="sinusoidal", tie_embeddings=True)
        >>> Transformer(cfg, rngs=nnx.Rngs(0))(jnp.zeros((1, 16), jnp.int32)).shape
        (1, 16, 50)
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.embed = nnx.Embed(config.vocab_size, config.d_model, rngs=rngs)
        if config.positions == "learned":
            self.pos_embed = nnx.Embed(
                config.max_len, config.d_model, embedding_init=nnx.initializers.normal(0.02), rngs=rngs
            )
        else:
            self.pos_embed = None  # fixed table, computed in __call__ (a constant, not state)
        self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.n_layers)])
        self.ln_f = nnx.LayerNorm(config.d_model, epsilon=config.layer_norm_eps, rngs=rngs)
        self.head = None if config.tie_embeddings else nnx.Linear(config.d_model, config.vocab_size, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        t = tokens.shape[-1]
        if t > self.config.max_len:
            raise ValueError(f"sequence length {t} exceeds max_len {self.config.max_len}")
        x = self.embed(tokens)
        if self.pos_embed is not None:
            x = x + self.pos_embed(jnp.arange(t))
        else:
            x = x + sinusoidal_positions(t, self.config.d_model)
        for block in self.blocks:
            x = _remat_block(block, x) if self.config.remat else block(x)
        x = self.ln_f(x)
        return self.embed.attend(x) if self.head is None else self.head(x)


@nnx.remat
def _remat_block(block, x):
    return block(x)


#: Alias: the transformer used on character/byte-level corpora.
CharTransformer = Transformer
