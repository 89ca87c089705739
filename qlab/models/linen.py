"""Flax Linen counterparts of the NNX models (``nn.Dense``/``nn.Conv``), for the Linen integration path.

:func:`linen_mlp_from_nnx` / :func:`linen_cnn_from_nnx` build a Linen module and its variables
holding the SAME weights as an NNX model, so both paths can be compared number for number.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qlab.models import MLP
    >>> nnx_model = MLP(64, hidden=(32,), out=10, rngs=nnx.Rngs(0))
    >>> module, variables = linen_mlp_from_nnx(nnx_model)
    >>> x = jnp.ones((2, 8, 8, 1))
    >>> bool(jnp.allclose(module.apply(variables, x), nnx_model(x), atol=1e-6))
    True
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn

from .cnn import CNN, CNNConfig
from .mlp import MLP

__all__ = ["LinenMLP", "LinenCNN", "linen_mlp_from_nnx", "linen_cnn_from_nnx"]


class LinenMLP(nn.Module):
    """Linen MLP: flatten, ``Dense_0..Dense_{k-1}`` + ReLU, then ``head`` (``nn.Dense``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> m = LinenMLP(hidden=(16,), out=3)
        >>> v = m.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> m.apply(v, jnp.ones((2, 4))).shape
        (2, 3)
    """

    hidden: Sequence[int] = (1024, 1024)
    out: int = 10

    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        for i, h in enumerate(self.hidden):
            x = nn.relu(nn.Dense(h, name=f"Dense_{i}")(x))
        return nn.Dense(self.out, name="head")(x)


class LinenCNN(nn.Module):
    """Linen version of :class:`qlab.models.CNN` (same config, same layer order).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from qlab.models import CNNConfig
        >>> m = LinenCNN(CNNConfig.digits())
        >>> v = m.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
        >>> m.apply(v, jnp.ones((2, 8, 8, 1))).shape
        (2, 10)
    """

    config: CNNConfig = CNNConfig()

    @nn.compact
    def __call__(self, x):
        if x.ndim == 3:
            x = x[..., None]
        k = self.config.kernel_size
        for i, ch in enumerate(self.config.channels):
            x = nn.Conv(ch, (k, k), padding="SAME", name=f"Conv_{i}")(x)
            x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        for i, h in enumerate(self.config.hidden):
            x = nn.relu(nn.Dense(h, name=f"Dense_{i}")(x))
        return nn.Dense(self.config.num_classes, name="head")(x)


def _kb(layer) -> dict:
    out = {"kernel": jnp.asarray(layer.kernel[...])}
    if getattr(layer, "bias", None) is not None:
        out["bias"] = jnp.asarray(layer.bias[...])
    return out


def linen_mlp_from_nnx(model: MLP) -> tuple[LinenMLP, dict]:
    """A :class:`LinenMLP` and its ``{"params": ...}`` copied from an NNX :class:`~qlab.models.MLP`.

    Only ReLU MLPs are supported (the Linen module hard-codes ReLU).

    Example:
        >>> from flax import nnx
        >>> module, variables = linen_mlp_from_nnx(MLP(4, hidden=(8, 8), out=2, rngs=nnx.Rngs(0)))
        >>> sorted(variables["params"])
        ['Dense_0', 'Dense_1', 'head']
    """
    if model.activation is not jax.nn.relu:
        raise ValueError("linen_mlp_from_nnx supports ReLU MLPs only")
    hidden = tuple(layer.out_features for layer in model.layers)
    params = {f"Dense_{i}": _kb(layer) for i, layer in enumerate(model.layers)}
    params["head"] = _kb(model.head)
    return LinenMLP(hidden=hidden, out=model.head.out_features), {"params": params}


def linen_cnn_from_nnx(model: CNN) -> tuple[LinenCNN, dict]:
    """A :class:`LinenCNN` and its ``{"params": ...}`` copied from an NNX :class:`~qlab.models.CNN`.

    Example:
        >>> from flax import nnx
        >>> from qlab.models import CNNConfig
        >>> module, variables = linen_cnn_from_nnx(CNN(CNNConfig.digits(), rngs=nnx.Rngs(0)))
        >>> sorted(variables["params"])
        ['Conv_0', 'Conv_1', 'Dense_0', 'head']
    """
    params = {f"Conv_{i}": _kb(c) for i, c in enumerate(model.convs)}
    params.update({f"Dense_{i}": _kb(d) for i, d in enumerate(model.dense)})
    params["head"] = _kb(model.head)
    return LinenCNN(config=model.config), {"params": params}
