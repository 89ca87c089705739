"""Text continuation with a Gemma 3 model: :func:`generate` (greedy or sampled, one compiled step, no KV cache)
and :func:`decode_greedy` (token ids, with a KV cache: one compiled prefill and one compiled single-token step).

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

__all__ = ["generate", "decode_greedy"]


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


def _last_logits(graphdef, state, tokens, index, cache, last):
    model = nnx.merge(graphdef, state)
    h, cache = model.features_cached(tokens, index, cache)
    return model.unembed(jax.lax.dynamic_index_in_dim(h, last, axis=1, keepdims=False)), cache


_decode_step = jax.jit(_last_logits, static_argnums=0, donate_argnums=4)


def decode_greedy(model: Gemma3, prompt_ids, max_new_tokens: int = 32, *, stop_at_eos: bool = False) -> list[int]:
    """Greedy continuation of ``prompt_ids`` (a list of token ids, BOS included) with a KV cache: the prompt
    runs once (padded to a multiple of 16 tokens), then one compiled step per new token. Returns the new ids.
    The same tokens as :func:`generate` (which reruns the whole sequence per token), much faster.

    On CPU, a converted (packed) model decodes about as fast as float32 only with
    ``XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false`` set before JAX starts: XLA:CPU's
    default scheduler keeps every layer's dequantized weight alive at once (385 MiB of temporaries per step
    for Gemma 3 270M's int4 linears, against 5 MiB with the plain scheduler; passing the option through
    ``jax.jit(compiler_options=...)`` does not change it in jax 0.10.2). See ``benchmarks/decode.py``.

    Example:
        >>> from flax import nnx
        >>> from qlab.models.gemma3 import Gemma3, Gemma3Config, build_tokenizer, tiny_vocab
        >>> model, tok = Gemma3(Gemma3Config.tiny(n_layers=1), rngs=nnx.Rngs(0)), build_tokenizer(*tiny_vocab(320))
        >>> ids = decode_greedy(model, tok.encode("the cat").ids, max_new_tokens=3)
        >>> tok.decode(ids) == generate(model, tok, "the cat", max_new_tokens=3, stop_at_eos=False)
        True
    """
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise ValueError("decode_greedy: prompt_ids is empty (it needs at least BOS)")
    if max_new_tokens < 1:
        raise ValueError(f"decode_greedy: max_new_tokens must be >= 1, got {max_new_tokens}")
    n0 = len(ids)
    padded = -(-n0 // 16) * 16
    length = -(-(max(padded, n0 + max_new_tokens)) // 64) * 64
    buf = np.full((1, padded), model.config.pad_id, np.int32)
    buf[0, :n0] = ids
    graphdef, state = nnx.split(model)
    cache = model.init_kv_cache(1, length)
    logits, cache = _decode_step(graphdef, state, jnp.asarray(buf), 0, cache, n0 - 1)
    out = []
    for n in range(n0, n0 + max_new_tokens):
        nxt = int(jnp.argmax(logits[0]))
        if stop_at_eos and nxt == model.config.eos_id:
            break
        out.append(nxt)
        if n + 1 == n0 + max_new_tokens:
            break
        logits, cache = _decode_step(graphdef, state, jnp.asarray([[nxt]], jnp.int32), n, cache, 0)
    return out
