"""A plain multilayer perceptron (flattens its input), Flax NNX, float32.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qlab.models import MLP
    >>> model = MLP(784, hidden=(1024, 1024), out=10, rngs=nnx.Rngs(0))
    >>> model(jnp.zeros((2, 28, 28, 1))).shape
    (2, 10)
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
from flax import nnx

__all__ = ["MLP"]


class MLP(nnx.Module):
    """``in_features -> hidden... -> out`` with ReLU between layers; inputs are flattened after the batch axis.

    Layers are ``nnx.Linear`` modules at paths ``layers.0``, ``layers.1``, ... and ``head``.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> m = MLP(64, hidden=(32,), out=10, rngs=nnx.Rngs(0))
        >>> m(jnp.ones((5, 8, 8, 1))).shape
        (5, 10)
    """

    def __init__(
        self,
        in_features: int,
        hidden: Sequence[int] = (1024, 1024),
        out: int = 10,
        *,
        activation: Callable[[jax.Array], jax.Array] = jax.nn.relu,
        rngs: nnx.Rngs,
    ):
        sizes = (in_features, *hidden)
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])])
        self.head = nnx.Linear(sizes[-1], out, rngs=rngs)
        self.activation = activation

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for layer in self.layers:
            x = self.activation(layer(x))
        return self.head(x)
