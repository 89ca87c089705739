"""Text continuation with a Gemma 3 model: greedy or sampled, one compiled step, no KV cache.

Example:
    >>> from flax import nnx
    >>> from qlab.models.gemma3 import Gemma3, Gemma3Config, build_tokenizer, tiny_vocab
    >>> model = Gemma3(Gemma3Config.tiny(n_layers=1), rngs=nnx.Rngs(0))
    >>> isinstance(generate(model, build_tokenizer(*tiny_vocab(320)), "the cat", max_new_tokens=2), str)
    True
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .model import Gemma3

__all__ = ["generate"]


@nnx.jit
def _next_logits(model: Gemma3, tokens, index):
    h = model.features(tokens)
    return model.unembed(jax.lax.dynamic_index_in_dim(h, index, axis=1, keepdims=False))


def generate(model: Gemma3, tokenizer, prompt: str, max_new_tokens: int = 32, greedy: bool = True,
             temperature: float = 1.0, seed: int = 0, stop_at_eos: bool = True) -> str:
    """Continue ``prompt`` (BOS prepended); returns only the new text. No KV cache: each step reruns the model
    on one fixed-size padded buffer (causal masking makes the padding invisible), so it compiles once.
    See the module example."""
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
