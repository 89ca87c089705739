"""qlab's Gemma 3 weights as a flat dict of float32 numpy arrays, keyed by GGUF tensor name.

This is the one weight layout every source is converted to (the GGUF reader uses it as is; the Hugging Face
checkpoint reader renames its tensors to it): names like ``token_embd.weight`` and ``blk.{i}.attn_q.weight``,
matrices in numpy ``[out, in]`` orientation (NNX ``Linear`` kernels are ``[in, out]``), and RMSNorm weights
with Gemma's ``+1`` already folded in (qlab's :class:`~qlab.models.gemma3.model.RMSNorm` multiplies by them
as stored).

Example:
    >>> from flax import nnx
    >>> from qlab.models.gemma3.model import Gemma3, Gemma3Config
    >>> w = model_weights(Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0)))
    >>> w["blk.0.attn_q.weight"].shape, w["output_norm.weight"].shape
    ((64, 32), (32,))
"""

from __future__ import annotations

import numpy as np
from flax import nnx

from qlab.models.weight_map import assign_weights, read_weights

from .model import Gemma3, Gemma3Config

__all__ = ["weight_map", "weight_names", "model_from_weights", "model_weights"]

# (module path inside a block, attribute, GGUF name inside a block, transpose?)
_BLOCK_WEIGHTS = (
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
)


def weight_map(cfg: Gemma3Config):
    """List of (module path, attribute, GGUF tensor name, transpose?), as ``qlab.models.weight_map`` reads it.

    Example:
        >>> weight_map(Gemma3Config.tiny())[2]
        (('layers', 0, 'pre_attn_norm'), 'weight', 'blk.0.attn_norm.weight', False)
    """
    items = [(("embed",), "embedding", "token_embd.weight", False),
             (("final_norm",), "weight", "output_norm.weight", False)]
    for i in range(cfg.n_layers):
        for path, attr, name, transpose in _BLOCK_WEIGHTS:
            items.append((("layers", i) + path, attr, f"blk.{i}.{name}", transpose))
    return items


def weight_names(cfg: Gemma3Config) -> list[str]:
    """Every tensor name a model of ``cfg`` needs, embedding and final norm first, then block by block.

    Example:
        >>> names = weight_names(Gemma3Config.tiny(n_layers=2))
        >>> len(names), names[:3]
        (28, ['token_embd.weight', 'output_norm.weight', 'blk.0.attn_norm.weight'])
    """
    return [name for _, _, name, _ in weight_map(cfg)]


def model_from_weights(cfg: Gemma3Config, weights: dict[str, np.ndarray]) -> Gemma3:
    """Build a ``Gemma3`` from float arrays keyed by GGUF tensor name (numpy layout, i.e. [out, in]).

    Raises KeyError naming missing tensors and ValueError naming a tensor whose shape does not fit.

    Example:
        >>> from flax import nnx
        >>> cfg = Gemma3Config.tiny()
        >>> w = model_weights(Gemma3(cfg, rngs=nnx.Rngs(0)))
        >>> model_from_weights(cfg, w).layers[0].attn.q_proj.kernel.shape
        (32, 64)
    """
    model = nnx.eval_shape(lambda: Gemma3(cfg, rngs=nnx.Rngs(0)))  # no random init of 170M embedding values
    missing = [name for name in weight_names(cfg) if name not in weights]
    if missing:
        raise KeyError(f"weights are missing tensors (GGUF names): {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return assign_weights(model, weight_map(cfg), weights)


def model_weights(model: Gemma3) -> dict[str, np.ndarray]:
    """The inverse of ``model_from_weights``: float32 numpy arrays keyed by GGUF tensor name.

    Example:
        >>> from flax import nnx
        >>> model = Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0))
        >>> model_weights(model)["blk.1.ffn_down.weight"].shape  # [out, in]
        (32, 64)
    """
    return read_weights(model, weight_map(model.config))
