"""Rules: which layers are quantized, and how.

A rule is an ordered regex over *layer paths*. A layer path is the module attribute path
from the model root, joined by ``"/"``: ``"layers/0"``, ``"blocks/1/attn/query"``, ``"head"``.
List/dict items contribute their index/key (``nnx.List`` item 0 -> ``"0"``). Call sites of
``jnp.einsum`` / ``jnp.dot`` / ``jnp.matmul`` / ``jax.lax.dot_general`` made by a user module's
own code get the module's path plus ``"/<op>_<k>"`` (k counts that op's calls within one call of
the module): ``"blocks/0/attn/einsum_0"`` (attention scores q.k), ``"blocks/0/attn/einsum_1"``
(probs.v). The root module's own call sites are ``"einsum_0"`` etc.

Matching uses :func:`re.fullmatch`: the pattern must match the WHOLE path (``"head"`` does not
match ``"lm_head"``; write ``".*head"`` for that). Rules are tried in order; the first one that
matches decides. A rule whose ``weight`` and ``act`` are both None keeps the layer in float.

Position tokens: ``@first`` and ``@last`` in a pattern stand for the path of the first / last
quantizable layer (in call order when the model is traced on an example batch, else graph order;
see :func:`qlab.nn.quantizable_layers`). :func:`qlab.nn.quantize_model` resolves them itself;
:func:`resolve_positions` resolves them against a list of paths, for code that only has paths.

Example:
    >>> rules = [Rule(r".*embed.*"), Rule(r".*mlp.*", weight="int4/g128", act="int8"), Rule(r".*", weight="int8/ch")]
    >>> first_match(rules, "blocks/0/mlp/up").pattern
    '.*mlp.*'
    >>> first_match(rules, "embed").is_float
    True
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from qlab.numerics.spec import QuantSpec, as_spec

__all__ = ["Rule", "first_match", "as_rules", "resolve_positions", "FIRST", "LAST"]

#: position tokens: the first / last quantizable layer (see :func:`resolve_positions`)
FIRST, LAST = "@first", "@last"

_WEIGHT_QUANTIZERS = ("ste", "lsq")
_ACT_QUANTIZERS = ("ste", "lsq", "pact")
_ACT_RANGES = ("dynamic", "ema")


@dataclasses.dataclass(frozen=True)
class Rule:
    """One quantization rule: layers whose path fully matches ``pattern`` get these specs.

    Args:
        pattern: a regular expression, matched with ``re.fullmatch`` against the layer path.
        weight: spec (QuantSpec or string like ``"int4/g128"``) for the weight, or None (float).
            ``axis=None`` granularities are resolved per layer: per-channel = output channels,
            groups run along the contraction (input) axis.
        act: spec for the layer's input activation, or None (float). Activations are viewed as
            ``[rows, in_features]``: per-channel = per row (token), groups along in_features.
        weight_quantizer: ``"ste"`` (fake_quant with a straight-through gradient; scales from
            the current weight) or ``"lsq"`` (a learned step per scale group, a ``QuantParam``).
        act_quantizer: ``"ste"``, ``"lsq"`` (learned step) or ``"pact"`` (learned clip alpha).
        lsq_grad_scale: for ``"lsq"`` quantizers: scale each step's gradient by LSQ's
            ``g = 1/sqrt(N * Qp)`` (N values share the step); False: ``g = 1`` (the LSQ paper's ablation).
        act_range: for ``"ste"`` activations: ``"dynamic"`` (range from each batch) or ``"ema"``
            (a static per-tensor range tracked by an exponential moving average in a
            ``QuantStat``, updated by forward passes in training mode, frozen after ``.eval()``).
        ema_decay: EMA decay for ``act_range="ema"``.
        outlier_threshold: LLM.int8-style decomposition: input features whose |x| exceeds this
            anywhere in the batch stay float (with their weight rows); the rest are quantized.
        int_matmul: for ``nnx.Linear`` / ``nn.Dense`` layers whose weight and input specs are both
            symmetric absmax integers (<= 8 bits) with scales that factor out of the product (per
            tensor or per output channel for the weight; per tensor or per row for a dynamic STE
            input), multiply the integer codes (exact int32 sums, then rescale:
            :func:`qlab.numerics.quantized_matmul`) instead of the float32 fake-quant values; the
            gradients are the same. False always uses the float32 product.

    Example:
        >>> Rule(r"blocks/\\d+/mlp/.*", weight="int4/g32", act="int8")
        Rule('blocks/\\\\d+/mlp/.*', weight='int4/g32', act='int8')
    """

    pattern: str
    weight: QuantSpec | str | None = None
    act: QuantSpec | str | None = None
    weight_quantizer: str = "ste"
    act_quantizer: str = "ste"
    act_range: str = "dynamic"
    ema_decay: float = 0.99
    outlier_threshold: float | None = None
    int_matmul: bool = True
    lsq_grad_scale: bool = True

    def __post_init__(self):
        try:
            re.compile(self.pattern)
        except re.error as e:
            raise ValueError(f"Rule pattern {self.pattern!r} is not a valid regex: {e}") from None
        object.__setattr__(self, "weight", as_spec(self.weight))
        object.__setattr__(self, "act", as_spec(self.act))
        if self.weight_quantizer not in _WEIGHT_QUANTIZERS:
            raise ValueError(f"Rule.weight_quantizer: got {self.weight_quantizer!r}; allowed: {_WEIGHT_QUANTIZERS}")
        if self.act_quantizer not in _ACT_QUANTIZERS:
            raise ValueError(f"Rule.act_quantizer: got {self.act_quantizer!r}; allowed: {_ACT_QUANTIZERS}")
        if self.act_range not in _ACT_RANGES:
            raise ValueError(f"Rule.act_range: got {self.act_range!r}; allowed: {_ACT_RANGES}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"Rule.ema_decay must be in [0, 1), got {self.ema_decay}")
        if not isinstance(self.lsq_grad_scale, bool):
            raise ValueError(f"Rule.lsq_grad_scale must be True or False, got {self.lsq_grad_scale!r}")
        if not isinstance(self.int_matmul, bool):
            raise ValueError(f"Rule.int_matmul must be True or False, got {self.int_matmul!r}")
        if self.outlier_threshold is not None and not self.outlier_threshold > 0:
            raise ValueError(f"Rule.outlier_threshold must be positive, got {self.outlier_threshold}")

    @property
    def is_float(self) -> bool:
        """True when the rule keeps matching layers in float (no weight and no act spec)."""
        return self.weight is None and self.act is None

    def matches(self, path: str) -> bool:
        """``re.fullmatch(pattern, path)``.

        Example:
            >>> Rule("head", weight="int8").matches("lm_head")
            False
        """
        return re.fullmatch(self.pattern, path) is not None

    @property
    def uses_positions(self) -> bool:
        """True when the pattern holds an ``@first`` / ``@last`` token (see :func:`resolve_positions`).

        Example:
            >>> Rule("@first|@last", weight="int8/ch").uses_positions, Rule("head").uses_positions
            (True, False)
        """
        return FIRST in self.pattern or LAST in self.pattern

    def at_positions(self, paths: Sequence[str]) -> "Rule":
        """This rule with ``@first`` / ``@last`` replaced by ``paths[0]`` / ``paths[-1]`` (escaped as
        regex literals). Unchanged when it has no tokens or ``paths`` is empty (a token then matches
        no layer, and is reported as unmatched like any such rule).

        Example:
            >>> Rule("@last", weight="int8").at_positions(["layers/0", "head"])
            Rule('head', weight='int8')
        """
        if not self.uses_positions or not paths:
            return self
        pattern = self.pattern.replace(FIRST, re.escape(paths[0])).replace(LAST, re.escape(paths[-1]))
        return dataclasses.replace(self, pattern=pattern)

    @property
    def stateless(self) -> bool:
        """True when the rule needs no Flax state (STE weights, dynamic STE activations)."""
        return (
            self.weight_quantizer == "ste"
            and self.act_quantizer == "ste"
            and self.act_range == "dynamic"
        )

    def __repr__(self):
        parts = [repr(self.pattern)]
        if self.weight is not None:
            parts.append(f"weight={str(self.weight)!r}")
        if self.act is not None:
            parts.append(f"act={str(self.act)!r}")
        defaults = {"weight_quantizer": "ste", "act_quantizer": "ste", "act_range": "dynamic",
                    "ema_decay": 0.99, "outlier_threshold": None, "int_matmul": True,
                    "lsq_grad_scale": True}
        for k, d in defaults.items():
            v = getattr(self, k)
            if v != d:
                parts.append(f"{k}={v!r}")
        return f"Rule({', '.join(parts)})"

    def __str__(self):
        return self.__repr__()


def as_rules(rules) -> tuple[Rule, ...]:
    """Accept one Rule, a sequence of Rules, or ``(pattern, weight[, act])`` tuples.

    Example:
        >>> as_rules([(".*", "int8")])[0].weight.bits
        8
    """
    if isinstance(rules, Rule):
        return (rules,)
    out = []
    for r in rules:
        if isinstance(r, Rule):
            out.append(r)
        elif isinstance(r, (tuple, list)):
            out.append(Rule(*r))
        elif isinstance(r, dict):
            out.append(Rule(**r))
        else:
            raise TypeError(f"rules: expected Rule objects, got {type(r).__name__}: {r!r}")
    return tuple(out)


def first_match(rules: Sequence[Rule], path: str) -> Rule | None:
    """The first rule whose pattern fully matches ``path`` (None if none does).

    Example:
        >>> first_match([Rule("a.*", weight="int8"), Rule(".*")], "ab").pattern
        'a.*'
    """
    for r in rules:
        if r.matches(path):
            return r
    return None


def resolve_positions(rules, paths: Sequence[str]) -> tuple[Rule, ...]:
    """``rules`` (anything :func:`as_rules` takes) with ``@first`` / ``@last`` replaced by the first /
    last of ``paths`` (the quantizable layer paths, in call order where known).

    Example:
        >>> resolve_positions([Rule("@first|@last", weight="int8/ch"), Rule(".*", weight="int4/ch")],
        ...                   ["convs/0", "dense/0", "head"])[0].pattern
        'convs/0|head'
    """
    return tuple(r.at_positions(paths) for r in as_rules(rules))
