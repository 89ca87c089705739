"""Candidates and their costs: every quantizable layer x every candidate weight format, with the
exact bytes qlab's accounting gives it (codes + scales + zero points, as ``qlab.nn.model_size``).

A candidate is a spec string (``"int4/ch"``, ``"int4/g128"``, ``"nf4/g64"``, ``"mxfp4"`` ...,
anything :func:`qlab.parse_spec` reads) or :data:`KEEP` (``"keep"``: the layer's float weight at
its own dtype). Unresolved axes are resolved per layer exactly as :func:`qlab.nn.quantize_model`
does (per-channel = output channels, groups along the contraction axis).

Example:
    >>> from flax import nnx
    >>> from qlab.models import MLP
    >>> t = candidate_table(MLP(8, hidden=(16,), out=4, rngs=nnx.Rngs(0)), ["int8/ch", "keep"])
    >>> t[["layer", "candidate", "bytes"]].values.tolist()
    [['head', 'int8/ch', 72], ['head', 'keep', 256], ['layers/0', 'int8/ch', 160], ['layers/0', 'keep', 512]]
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pandas as pd

from qlab.nn import QuantizedLayer, Rule, quantizable_layers
from qlab.nn.layer import layer_kind
from qlab.numerics import QuantSpec, packed_nbytes, parse_spec

__all__ = [
    "KEEP",
    "TABLE_COLUMNS",
    "parse_candidate",
    "candidate_layer",
    "candidate_table",
    "uniform_bytes",
]

#: the candidate that leaves a layer's weight in float, at its own dtype
KEEP = "keep"
#: columns of :func:`candidate_table`
TABLE_COLUMNS = ["layer", "candidate", "params", "bytes", "usable", "reason"]

_ALLOWED = (f"{KEEP!r} (float weight) or a qlab spec string such as 'int4/ch', 'int8/ch', 'int4/g128', "
            "'nf4/g64', 'mxfp4', 'fp8_e4m3' (format[/granularity][/options], see qlab.parse_spec)")


def parse_candidate(candidate: str) -> QuantSpec | None:
    """The QuantSpec a candidate string names, or None for :data:`KEEP`; ValueError naming the allowed
    forms otherwise.

    Example:
        >>> parse_candidate("int4/g128"), parse_candidate("keep")
        (QuantSpec('int4/g128'), None)
    """
    if candidate == KEEP:
        return None
    if not isinstance(candidate, str):
        raise ValueError(f"candidate {candidate!r} is not a string; allowed: {_ALLOWED}")
    try:
        return parse_spec(candidate)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"unknown candidate {candidate!r} ({e}); allowed: {_ALLOWED}") from None


def candidate_layer(layer, candidate: str, path: str = "") -> QuantizedLayer | None:
    """The :class:`~qlab.nn.QuantizedLayer` that ``quantize_model`` would put at ``path`` for a weight
    rule of ``candidate`` (None for :data:`KEEP`). ValueError when the layer cannot take it.
    ``.weight_value()`` is the effective weight, ``.weight_quant.spec`` the resolved spec.

    Example:
        >>> from flax import nnx
        >>> candidate_layer(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), "int4/g4").weight_quant.spec
        QuantSpec('int4/g4a0')
    """
    spec = parse_candidate(candidate)
    if spec is None:
        return None
    kind = layer_kind(layer)
    if kind is None:
        raise ValueError(f"layer {path!r} ({type(layer).__name__}) is not a layer qlab quantizes")
    return QuantizedLayer(layer, kind, path, Rule(".*", weight=spec))


def _row(path: str, layer, candidate: str) -> dict:
    w = layer.embedding if layer_kind(layer) == "embed" else layer.kernel
    shape = tuple(w[...].shape)
    n = math.prod(shape)
    row = dict(layer=path, candidate=candidate, params=n, bytes=n * np.dtype(w[...].dtype).itemsize,
               usable=True, reason="")
    try:
        q = candidate_layer(layer, candidate, path)
    except ValueError as e:
        return {**row, "bytes": 0, "usable": False, "reason": str(e)}
    if q is not None:
        row["bytes"] = int(packed_nbytes(q.weight_quant.spec, shape))
    return row


def candidate_table(model, candidates, example=None) -> pd.DataFrame:
    """One row per quantizable layer (``qlab.nn.quantizable_layers``: call order when ``example`` is
    given) and candidate: ``layer, candidate, params, bytes, usable, reason``.

    ``bytes`` is the packed size of the weight (scales included, ``qlab.numerics.packed_nbytes``), or
    ``params * itemsize`` for :data:`KEEP`; biases are not in the table (they stay float whatever is
    chosen). A candidate a layer cannot take (a group size that does not divide the contraction
    axis, without padding) has ``usable=False``, ``bytes=0`` and the reason. An unknown candidate
    is a ValueError naming the allowed forms.

    Example:
        >>> from flax import nnx
        >>> t = candidate_table(nnx.Linear(96, 4, rngs=nnx.Rngs(0)), ["int4/g64", "int4/g32"])
        >>> t[["candidate", "bytes", "usable"]].values.tolist()
        [['int4/g64', 0, False], ['int4/g32', 216, True]]
    """
    candidates = list(candidates)
    if not candidates:
        raise ValueError(f"candidate_table: no candidates; allowed: {_ALLOWED}")
    for c in candidates:
        parse_candidate(c)
    if len(set(candidates)) != len(candidates):
        raise ValueError(f"candidate_table: repeated candidates in {candidates}")
    layers = quantizable_layers(model, None if example is None else jnp.asarray(example))
    if not layers:
        raise ValueError("candidate_table: the model has no quantizable layers")
    rows = [_row(path, layer, c) for path, layer in layers for c in candidates]
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


def uniform_bytes(table: pd.DataFrame, candidate: str) -> int:
    """Total bytes of the table's layers all at ``candidate`` (ValueError naming the layers that
    cannot take it): the budget of a uniform model.

    Example:
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> t = candidate_table(MLP(8, hidden=(16,), out=4, rngs=nnx.Rngs(0)), ["int8/ch", "keep"])
        >>> uniform_bytes(t, "int8/ch"), uniform_bytes(t, "keep")
        (232, 768)
    """
    rows = table[table["candidate"] == candidate]
    if rows.empty:
        raise ValueError(f"uniform_bytes: no rows for candidate {candidate!r}; have {sorted(table['candidate'].unique())}")
    bad = rows[~rows["usable"].astype(bool)] if "usable" in rows else rows.iloc[:0]
    if len(bad):
        raise ValueError(f"uniform_bytes: layers {bad['layer'].tolist()} cannot take {candidate!r}")
    return int(rows["bytes"].sum())
