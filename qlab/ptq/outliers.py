"""LLM.int8()-style outlier features (Dettmers et al. 2022, arXiv:2208.07339).

LLM.int8() keeps the input features whose magnitude exceeds a threshold (6.0) in 16-bit and runs the rest
of the matrix multiply in int8. In qlab the decomposition itself is an activation-side layer feature
(``qlab.nn.Rule(..., outlier_threshold=6.0)``); this module finds the outlier columns from calibration
statistics so that drivers and reports can say how many there are, counts outlier features with the paper's
definition (:func:`outlier_dims` per layer, :func:`systematic_outliers` across layers: magnitude >= 6 at >= 6% of
the sequence positions in >= 25% of the layers), and removes input features from a model's projections
(:func:`zero_input_features`, the paper's "set the outlier features to zero" ablation).

Example:
    >>> import numpy as np
    >>> outlier_columns(np.array([0.5, 7.0, 2.0, 12.0])).tolist()
    [1, 3]
"""

from __future__ import annotations

from typing import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlab.nn import copy_model

__all__ = ["outlier_columns", "outlier_fraction", "position_fractions", "outlier_dims", "systematic_outliers",
           "zero_input_features"]

#: Dettmers et al. 2022: the magnitude, the share of sequence positions and the share of layers of an outlier feature
PAPER_THRESHOLD, PAPER_MIN_POSITIONS, PAPER_MIN_LAYERS = 6.0, 0.06, 0.25


def outlier_columns(act_absmax, threshold: float = 6.0) -> np.ndarray:
    """Indices of input features whose calibration absmax exceeds ``threshold`` (sorted, int64).

    Example:
        >>> outlier_columns([1.0, 6.0, 6.5], threshold=6.0).tolist()
        [2]
    """
    a = np.asarray(act_absmax, np.float32).reshape(-1)
    if threshold <= 0:
        raise ValueError(f"outlier_columns: threshold must be positive, got {threshold}")
    return np.nonzero(a > threshold)[0].astype(np.int64)


def outlier_fraction(act_absmax, threshold: float = 6.0) -> float:
    """Fraction of input features that LLM.int8() would keep in 16-bit.

    Example:
        >>> outlier_fraction([0.5, 7.0, 2.0, 12.0])
        0.5
    """
    a = np.asarray(act_absmax).reshape(-1)
    return float(len(outlier_columns(a, threshold)) / max(1, a.size))


def position_fractions(x, threshold: float = PAPER_THRESHOLD) -> np.ndarray:
    """Per feature (last axis of ``x``, viewed as ``[positions, features]``): the share of positions whose magnitude
    is at least ``threshold`` (float64, in [0, 1]).

    Example:
        >>> position_fractions(np.array([[0.0, 7.0], [6.0, -9.0], [1.0, 0.5], [-2.0, 6.5]])).tolist()
        [0.25, 0.75]
    """
    a = np.abs(np.asarray(x, np.float32))
    a = a.reshape(-1, a.shape[-1])
    if a.shape[0] == 0:
        raise ValueError("position_fractions: x has no positions")
    return (a >= threshold).mean(axis=0, dtype=np.float64)


def outlier_dims(x, threshold: float = PAPER_THRESHOLD, min_positions: float = PAPER_MIN_POSITIONS) -> np.ndarray:
    """The outlier features of one layer's input ``x`` (``[positions, features]``) in Dettmers et al.'s sense:
    magnitude >= ``threshold`` at >= ``min_positions`` of the positions (sorted indices, int64).

    Example:
        >>> x = np.zeros((100, 4)); x[:6, 1] = 6.0; x[:5, 2] = -8.0; x[:50, 3] = 5.9
        >>> outlier_dims(x).tolist()   # feature 2 is large at only 5% of the positions, feature 3 never >= 6
        [1]
    """
    return np.nonzero(position_fractions(x, threshold) >= min_positions)[0].astype(np.int64)


def systematic_outliers(inputs: Mapping[str, np.ndarray], threshold: float = PAPER_THRESHOLD,
                        min_positions: float = PAPER_MIN_POSITIONS, min_layers: float = PAPER_MIN_LAYERS,
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Outlier features shared across layers (Dettmers et al. 2022): a feature dimension is systematic when it is an
    :func:`outlier_dims` feature (magnitude >= ``threshold`` at >= ``min_positions`` of the positions) in at least
    ``min_layers`` of the layers. ``inputs``: ``{layer: [positions, features]}`` inputs of layers that read the same
    feature space (e.g. the hidden states that feed each block's attention and MLP projections).

    Returns ``(dims, layer_counts)``: the systematic dimensions (sorted, int64) and, per feature, the number of
    layers in which it is an outlier (int64, length ``features``).

    Example:
        >>> x = np.zeros((100, 3)); x[:10, 0] = 8.0                  # feature 0 large at 10% of the positions
        >>> dims, counts = systematic_outliers({"a": x, "b": x, "c": np.zeros((100, 3)), "d": np.zeros((100, 3))})
        >>> dims.tolist(), counts.tolist()                           # an outlier in 2 of 4 layers (50% >= 25%)
        ([0], [2, 0, 0])
        >>> systematic_outliers({"a": x, "b": x}, min_layers=1.0)[0].tolist()   # in every layer
        [0]
        >>> systematic_outliers({"a": x}, threshold=9.0)[0].tolist()               # never >= 9
        []
    """
    if not inputs:
        raise ValueError("systematic_outliers: no layers given")
    widths = {k: np.shape(v)[-1] for k, v in inputs.items()}
    if len(set(widths.values())) != 1:
        raise ValueError(f"systematic_outliers: the layers must read one feature space; widths {widths}")
    counts = np.zeros(next(iter(widths.values())), np.int64)
    for x in inputs.values():
        counts[outlier_dims(x, threshold, min_positions)] += 1
    need = min_layers * len(inputs)
    return np.nonzero(counts >= need - 1e-9)[0].astype(np.int64), counts


def zero_input_features(model: nnx.Module, features: Mapping[str, object]) -> nnx.Module:
    """A copy of ``model`` whose linear layers at the given paths ignore the given input features: ``features`` maps
    a layer path (as :mod:`qlab.nn` spells it, e.g. ``"layers/0/attn/q_proj"``) to feature indices, whose rows of
    the layer's ``(in, out)`` kernel are set to zero (the same as zeroing those input features, bias aside).

    Example:
        >>> from qlab.models import MLP
        >>> m = MLP(4, hidden=(8,), rngs=nnx.Rngs(0))
        >>> z = zero_input_features(m, {"layers/0": [1, 3]})
        >>> x = np.ones((2, 4), np.float32)
        >>> bool(jnp.allclose(z(x), m(x * np.array([1, 0, 1, 0], np.float32))))
        True
        >>> float(abs(m.layers[0].kernel[...][1]).sum()) > 0      # the original keeps its weights
        True
    """
    out = copy_model(model)
    modules = {"/".join(map(str, p)): m for p, m in nnx.iter_modules(out)}
    unknown = [p for p in features if p not in modules or not hasattr(modules[p], "kernel")]
    if unknown:
        raise ValueError(f"zero_input_features: no linear layer at {unknown}")
    for p, idx in features.items():
        k = modules[p].kernel
        idx = np.asarray(idx, np.int64).reshape(-1)
        if len(idx):
            k.value = k[...].at[idx].set(0)
    return out
