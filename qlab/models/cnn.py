"""A small convolutional classifier (conv-pool blocks, then dense layers), Flax NNX, float32.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qlab.models import CNN
    >>> CNN(rngs=nnx.Rngs(0))(jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

__all__ = ["CNNConfig", "CNN"]


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    """Shape of a :class:`CNN`. Each conv (3x3, SAME) is followed by ReLU and 2x2 max-pooling.

    Example:
        >>> CNNConfig.digits().input_shape
        (8, 8, 1)
    """

    input_shape: tuple[int, int, int] = (28, 28, 1)
    channels: tuple[int, ...] = (32, 64)
    kernel_size: int = 3
    hidden: tuple[int, ...] = (128,)
    num_classes: int = 10

    @classmethod
    def fashion_mnist(cls) -> "CNNConfig":
        """conv32-pool-conv64-pool-dense128-dense10 on 28x28x1 (about 420K parameters).

        Example:
            >>> CNNConfig.fashion_mnist().channels
            (32, 64)
        """
        return cls()

    @classmethod
    def digits(cls) -> "CNNConfig":
        """A smaller variant for 8x8x1 scikit-learn digits: conv16-pool-conv32-pool-dense64-dense10.

        Example:
            >>> CNNConfig.digits().hidden
            (64,)
        """
        return cls(input_shape=(8, 8, 1), channels=(16, 32), hidden=(64,))


class CNN(nnx.Module):
    """Conv blocks (``convs.i``: ``nnx.Conv`` + ReLU + 2x2 max-pool), flatten, dense layers
    (``dense.i``: ``nnx.Linear`` + ReLU) and a ``head`` (``nnx.Linear``). Input: NHWC float.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> m = CNN(CNNConfig.digits(), rngs=nnx.Rngs(0))
        >>> m(jnp.zeros((3, 8, 8, 1))).shape
        (3, 10)
    """

    def __init__(self, config: CNNConfig | None = None, *, rngs: nnx.Rngs):
        config = config or CNNConfig()
        self.config = config
        h, w, c = config.input_shape
        k = config.kernel_size
        convs = []
        for ch in config.channels:
            convs.append(nnx.Conv(c, ch, (k, k), padding="SAME", rngs=rngs))
            c, h, w = ch, h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"{len(config.channels)} pooling stages are too many for {config.input_shape}")
        self.convs = nnx.List(convs)
        sizes = (h * w * c, *config.hidden)
        self.dense = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.head = nnx.Linear(sizes[-1], config.num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if x.ndim == 3:
            x = x[..., None]
        for conv in self.convs:
            x = nnx.max_pool(jax.nn.relu(conv(x)), window_shape=(2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        for layer in self.dense:
            x = jax.nn.relu(layer(x))
        return self.head(x)
