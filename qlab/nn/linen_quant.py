"""Quantization-aware Flax Linen models, via ``flax.linen.intercept_methods``.

``quantize_linen(module, rules)`` returns a :class:`QuantizedLinen` with the module's ``init``/
``apply`` signature: the variables are the float model's own (nothing is added or renamed), and
every ``nn.Dense`` / ``nn.Conv`` whose scope path (names joined by ``"/"``, e.g. ``"Dense_0"``,
``"encoder/Conv_1"``) matches a rule runs with a fake-quantized input and kernel. Numbers are the
same as the NNX integration for the same weights and rules (same spec resolution: per-channel =
output channels, groups along the contraction axis; activations viewed as ``[rows, features]``).
Linen supports stateless quantizers (STE weights, dynamic STE activations); use NNX for LSQ,
PACT, EMA ranges, capture and conversion.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from qlab.models import LinenMLP
    >>> from qlab.nn import Rule
    >>> m = LinenMLP(hidden=(8,), out=2)
    >>> v = m.init(jax.random.key(0), jnp.ones((1, 4)))
    >>> qm = quantize_linen(m, [Rule(".*", weight="int4/ch", act="int8")])
    >>> qm.apply(v, jnp.ones((3, 4))).shape
    (3, 2)
"""

from __future__ import annotations

import contextlib
import threading

import flax.linen as nn
import jax.numpy as jnp

from qlab.numerics.matmul import int_matmul_supported, quantized_matmul
from qlab.numerics.quantize import fake_quant
from qlab.nn.rules import as_rules, first_match

__all__ = ["quantize_linen", "QuantizedLinen", "linen_quantization"]

_local = threading.local()


def _axes(m, kernel):
    if isinstance(m, nn.Dense):
        return 1, 0
    return kernel.ndim - 1, kernel.ndim - 2


def _int_matmul_ok(m, rule, x, kernel, args, kwargs) -> bool:
    return (isinstance(m, nn.Dense) and rule.int_matmul and rule.act is not None and rule.weight is not None
            and len(args) == 1 and not kwargs and x.dtype == jnp.float32 and kernel.dtype == jnp.float32
            and m.dtype in (None, jnp.float32) and m.precision is None and getattr(m, "dot_general", None) is None
            and getattr(m, "dot_general_cls", None) is None
            and int_matmul_supported(rule.act.resolve(0, 1), 0) and int_matmul_supported(rule.weight.resolve(1, 0), 1))


def _make_interceptor(rules, seen):
    def interceptor(next_fun, args, kwargs, context):
        m = context.module
        if (
            context.method_name != "__call__"
            or not isinstance(m, (nn.Dense, nn.Conv))
            or getattr(_local, "inside", False)
            or not m.has_variable("params", "kernel")
        ):
            return next_fun(*args, **kwargs)
        path = "/".join(m.scope.path)
        rule = first_match(rules, path)
        if rule is None or rule.is_float:
            return next_fun(*args, **kwargs)
        if not rule.stateless:
            raise NotImplementedError(
                f"Linen layer {path!r} matched {rule!r}: the Linen integration supports STE weights and "
                "dynamic STE activations only (use the NNX integration for LSQ/PACT/EMA)"
            )
        seen[path] = rule
        x = args[0]
        kernel = m.get_variable("params", "kernel")
        if _int_matmul_ok(m, rule, x, kernel, args, kwargs):  # the same integer product as the NNX path
            shp = x.shape
            y = quantized_matmul(x.reshape(-1, shp[-1]), kernel, rule.act.resolve(0, 1), rule.weight.resolve(1, 0))
            y = y.reshape(shp[:-1] + (y.shape[-1],))
            return y + m.get_variable("params", "bias") if m.has_variable("params", "bias") else y
        params = {"kernel": kernel}
        if m.has_variable("params", "bias"):
            params["bias"] = m.get_variable("params", "bias")
        if rule.act is not None:
            shp = x.shape
            x = fake_quant(x.reshape(-1, shp[-1]), rule.act.resolve(0, 1)).reshape(shp)
        if rule.weight is not None:
            params["kernel"] = fake_quant(kernel, rule.weight.resolve(*_axes(m, kernel)))
        _local.inside = True
        try:
            return m.clone(parent=None, name=None).apply({"params": params}, x, *args[1:], **kwargs)
        finally:
            _local.inside = False

    return interceptor


@contextlib.contextmanager
def linen_quantization(rules, seen: dict | None = None):
    """Within this context, Linen ``nn.Dense``/``nn.Conv`` calls whose path matches ``rules`` are
    quantized (for code that calls ``module.apply`` itself). ``@first`` / ``@last`` are not resolved
    here: resolve them first with :func:`qlab.nn.resolve_positions` (ValueError otherwise).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from qlab.models import LinenMLP
        >>> from qlab.nn import Rule
        >>> m = LinenMLP(hidden=(8,), out=2)
        >>> v = m.init(jax.random.key(0), jnp.ones((1, 4)))
        >>> seen = {}
        >>> with linen_quantization([Rule("Dense_0", weight="int8")], seen):
        ...     _ = m.apply(v, jnp.ones((1, 4)))
        >>> list(seen)
        ['Dense_0']
    """
    rules = as_rules(rules)
    positional = [r for r in rules if r.uses_positions]
    if positional:
        raise ValueError(f"Linen rules cannot resolve @first/@last: {positional}; "
                         "pass them through qlab.nn.resolve_positions(rules, layer_paths) first")
    with nn.intercept_methods(_make_interceptor(rules, {} if seen is None else seen)):
        yield


class QuantizedLinen:
    """A Linen module run under quantization rules; ``init``/``apply`` as the module's own.
    ``matched`` collects ``{layer path: rule}`` of the layers quantized so far (see the module example)."""

    def __init__(self, module: nn.Module, rules):
        self.module = module
        self.rules = as_rules(rules)
        self.matched: dict = {}

    def init(self, *args, **kwargs):
        return self.module.init(*args, **kwargs)

    def apply(self, variables, *args, **kwargs):
        with linen_quantization(self.rules, self.matched):
            return self.module.apply(variables, *args, **kwargs)

    def __call__(self, variables, *args, **kwargs):
        return self.apply(variables, *args, **kwargs)

    def __repr__(self):
        return f"QuantizedLinen({type(self.module).__name__}, rules={list(self.rules)})"


def quantize_linen(module: nn.Module, rules) -> QuantizedLinen:
    """Wrap a Linen module so that its ``apply`` runs quantization-aware under ``rules``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from qlab.models import LinenMLP
        >>> from qlab.nn import Rule
        >>> qm = quantize_linen(LinenMLP(hidden=(8,), out=2), [Rule("head", weight="int4/ch")])
        >>> _ = qm.apply(qm.init(jax.random.key(0), jnp.ones((1, 4))), jnp.ones((1, 4)))
        >>> {p: r.pattern for p, r in qm.matched.items()}
        {'head': 'head'}
    """
    return QuantizedLinen(module, rules)
