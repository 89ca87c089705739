"""LLM.int8()-style outlier features (Dettmers et al. 2022, arXiv:2208.07339).

LLM.int8() keeps the input features whose magnitude exceeds a threshold (6.0) in 16-bit and runs the rest
of the matrix multiply in int8. In qlab the decomposition itself is an activation-side layer feature
(``qlab.nn.Rule(..., outlier_threshold=6.0)``); this module finds the outlier columns from calibration
statistics so that drivers and reports can say how many there are.

Example:
    >>> import numpy as np
    >>> outlier_columns(np.array([0.5, 7.0, 2.0, 12.0])).tolist()
    [1, 3]
"""

from __future__ import annotations

import numpy as np

__all__ = ["outlier_columns", "outlier_fraction"]


def outlier_columns(act_absmax, threshold: float = 6.0) -> np.ndarray:
    """Indices of input features whose calibration absmax exceeds ``threshold`` (sorted, int64)."""
    a = np.asarray(act_absmax, np.float32).reshape(-1)
    if threshold <= 0:
        raise ValueError(f"outlier_columns: threshold must be positive, got {threshold}")
    return np.nonzero(a > threshold)[0].astype(np.int64)


def outlier_fraction(act_absmax, threshold: float = 6.0) -> float:
    """Fraction of input features that LLM.int8() would keep in 16-bit."""
    a = np.asarray(act_absmax).reshape(-1)
    return float(len(outlier_columns(a, threshold)) / max(1, a.size))
