"""Named weights in and out of a Flax NNX model through a weight map: ``[(module path, attribute, tensor name,
transpose)]``, as the Gemma 3 (GGUF names) and MiniLM (Hugging Face names) loaders declare them.

Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> m = assign_weights(nnx.Linear(2, 3, rngs=nnx.Rngs(0)), [((), "kernel", "w", True)], {"w": np.ones((3, 2))})
    >>> m.kernel.shape, read_weights(m, [((), "kernel", "w", True)])["w"].shape
    ((2, 3), (3, 2))
"""

from __future__ import annotations

from typing import Mapping, Sequence

import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = ["submodule", "assign_weights", "read_weights"]


def submodule(model: nnx.Module, path: Sequence[str | int]):
    """The module at ``path`` (attribute names and list indices) under ``model``.

    Example:
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> type(submodule(MLP(4, hidden=(8,), rngs=nnx.Rngs(0)), ("layers", 0))).__name__
        'Linear'
    """
    m = model
    for p in path:
        m = m[p] if isinstance(p, int) else getattr(m, p)
    return m


def assign_weights(model: nnx.Module, weight_map, weights: Mapping[str, np.ndarray]) -> nnx.Module:
    """Set every mapped variable of ``model`` (in place) from ``weights[name]`` as float32, transposed where the
    map says so; a tensor whose shape does not fit is a ValueError naming it. Returns ``model``.
    (Callers check for missing names first, each with its own naming scheme in the message.)
    """
    for path, attr, name, transpose in weight_map:
        var = getattr(submodule(model, path), attr)
        w = np.asarray(weights[name], dtype=np.float32)
        if transpose:
            w = w.T
        if tuple(w.shape) != tuple(var.shape):
            raise ValueError(f"{name}: shape {w.shape} does not fit {'.'.join(map(str, path))}.{attr} "
                             f"{tuple(var.shape)}")
        var.value = jnp.asarray(w)
    return model


def read_weights(model: nnx.Module, weight_map) -> dict[str, np.ndarray]:
    """The inverse of :func:`assign_weights`: ``{name: float32 array}`` in the map's layout."""
    out = {}
    for path, attr, name, transpose in weight_map:
        w = np.asarray(getattr(submodule(model, path), attr)[...], dtype=np.float32)
        out[name] = np.ascontiguousarray(w.T if transpose else w)
    return out
