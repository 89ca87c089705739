"""qlab.analysis: mixed precision under a memory budget.

Modules (each imports only those listed before it, and qlab.nn / qlab.numerics below):
    candidates   candidate_table: every quantizable layer x candidate spec, exact packed bytes
    sensitivity  sqnr / measured / fisher / hutchinson scores per (layer, candidate), selectable by name
    allocate     allocate: least summed damage within a byte budget (dp, milp, greedy) -> Allocation

Example:
    >>> from flax import nnx
    >>> from qlab.models import MLP
    >>> from qlab.nn import quantize_model, model_size
    >>> m = MLP(16, hidden=(32,), out=4, rngs=nnx.Rngs(0))
    >>> s = sensitivity(m, ["int4/ch", "int8/ch"], "sqnr")
    >>> a = allocate(s, budget_bytes=uniform_bytes(s, "int8/ch"))
    >>> a.choices.candidate.tolist(), a.total_bytes
    (['int8/ch', 'int8/ch'], 712)
    >>> model_size(quantize_model(m, a.rules()))["packed_bytes"] - a.total_bytes   # + 36 f32 biases
    144
"""

from qlab.analysis.allocate import ALLOCATION_METHODS, Allocation, allocate
from qlab.analysis.candidates import KEEP, TABLE_COLUMNS, candidate_layer, candidate_table, parse_candidate, uniform_bytes
from qlab.analysis.sensitivity import (
    SCORE_COLUMNS,
    SENSITIVITY_METHODS,
    fisher_sensitivity,
    hutchinson_sensitivity,
    measured_sensitivity,
    sensitivity,
    sqnr_sensitivity,
)

__all__ = [
    "KEEP",
    "TABLE_COLUMNS",
    "parse_candidate",
    "candidate_layer",
    "candidate_table",
    "uniform_bytes",
    "SCORE_COLUMNS",
    "SENSITIVITY_METHODS",
    "sensitivity",
    "sqnr_sensitivity",
    "measured_sensitivity",
    "fisher_sensitivity",
    "hutchinson_sensitivity",
    "ALLOCATION_METHODS",
    "Allocation",
    "allocate",
]
