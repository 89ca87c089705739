"""Call-site interception: quantizing ``jnp.einsum`` / ``dot`` / ``matmul`` / ``lax.dot_general``
written directly in a user's module.

A call site is named ``"<module path>/<op>_<k>"``: ``k`` counts that op's calls within one call of
the module (``"blocks/0/attn/einsum_0"`` is the first einsum of ``blocks/0/attn``; the root module's
own sites are ``"einsum_0"`` ...). The first operand is the activation, the second the "weight";
rules are matched on the site name like on a layer path (:mod:`qlab.nn.rules`).

How: :func:`intercept_call_sites` gives one module instance a subclass whose ``__call__`` runs
under :func:`call_scope`. While any scope is open, the four public names are swapped (globally,
reference counted, under a lock) for wrappers that fake-quantize the operands of calls made from
user code and pass everything else through. Calls made from inside Flax/JAX/qlab library code are
never intercepted, and ``a @ b`` is not intercepted (write ``jnp.matmul``). Interception only
acts while tracing, so a jitted step costs nothing extra for it. Call sites support stateless
quantizers only (STE weights, dynamic STE activations).

Example (``qlab.models.Transformer`` computes attention scores with ``jnp.einsum``):
    >>> import jax, jax.numpy as jnp
    >>> from flax import nnx
    >>> from qlab.models import Transformer, TransformerConfig
    >>> from qlab.nn import Rule, quantize_model
    >>> cfg = TransformerConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, d_ff=16, max_len=4)
    >>> rules = (Rule(".*/einsum_0", act="int8", weight="int8"),)   # q.k^T of every block
    >>> qm = quantize_model(Transformer(cfg, rngs=nnx.Rngs(0)), rules)
    >>> out = jax.eval_shape(lambda t: qm(t), jnp.zeros((1, 4), jnp.int32))   # tracing is enough
    >>> is_intercepting(qm.blocks[0].attn), out.shape
    (True, (1, 4, 11))
    >>> SEEN_CALL_SITES[rules]
    {'blocks/0/attn/einsum_0': '.*/einsum_0'}
"""

from __future__ import annotations

import contextlib
import sys
import threading
import types

import jax
import jax.numpy as jnp

from flax import nnx

from qlab.numerics.quantize import fake_quant
from qlab.nn.axes import dot_general_axes, einsum_axes, matmul_axes
from qlab.nn.quantizers import QuantParam
from qlab.nn.rules import first_match

__all__ = [
    "CALL_OPS",
    "SITES_PER_OP",
    "ORIGINAL_OPS",
    "SEEN_CALL_SITES",
    "SITES_ATTR",
    "call_scope",
    "direct_params",
    "recording_site_weights",
    "candidate_sites",
    "intercept_call_sites",
    "is_intercepting",
]

#: the intercepted ops, as they appear in call-site names
CALL_OPS = ("einsum", "dot", "matmul", "dot_general")
#: call sites ``<op>_0 .. <op>_7`` of each user module are tried when matching rules at quantize time
SITES_PER_OP = 8
#: the unpatched functions (the public names may be patched while a scope is open)
ORIGINAL_OPS = types.MappingProxyType({
    "einsum": jnp.einsum,
    "dot": jnp.dot,
    "matmul": jnp.matmul,
    "dot_general": jax.lax.dot_general,
})
#: call sites seen while tracing: ``{rules: {site path: pattern of the rule that quantized it}}``
SEEN_CALL_SITES: dict = {}

_LIB_PREFIXES = ("jax.", "jax", "flax", "optax", "qlab.nn", "qlab.numerics", "numpy", "treescope")
_local = threading.local()
_patch_lock = threading.Lock()
_patch_depth = [0]
_INTERCEPT_CLASSES: dict = {}


def candidate_sites(module_path: str) -> list[str]:
    """The call-site names a module at ``module_path`` may have, as rules are matched against them
    at quantize time (``SITES_PER_OP`` per op).

    Example:
        >>> candidate_sites("blocks/0/attn")[:2], len(candidate_sites(""))
        (['blocks/0/attn/einsum_0', 'blocks/0/attn/einsum_1'], 32)
    """
    prefix = f"{module_path}/" if module_path else ""
    return [f"{prefix}{op}_{k}" for op in CALL_OPS for k in range(SITES_PER_OP)]


def _stack():
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    return s


def _from_library(depth=2) -> bool:
    name = sys._getframe(depth).f_globals.get("__name__", "")
    return name == "jax" or name.startswith(_LIB_PREFIXES)


#: the attribute of an intercepted module that holds the QuantizedLayers of its call-site weights
SITES_ATTR = "qlab_sites"
_recorders: list = []


@contextlib.contextmanager
def recording_site_weights():
    """Within this context, traced call sites whose weight operand IS an ``nnx.Param`` of the calling module
    (``self.w[...]`` passed as is) are recorded: the yielded dict gets ``{(module path, "<op>_<k>"): (param
    attribute, weight equation)}``, the equation an einsum string whose second operand has the weight's
    channel and contraction axes (:class:`qlab.nn.layer.SiteWeight`). ``quantize_model`` uses it."""
    rec: dict = {}
    _recorders.append(rec)
    try:
        yield rec
    finally:
        _recorders.remove(rec)


def direct_params(module) -> dict:
    """``{attribute: nnx.Param}`` of the weights (2 or more dims) a module holds itself, not inside a sub-layer
    (quantizer parameters left out): what its call sites may use as weights.

    Example:
        >>> from flax import nnx
        >>> class Mix(nnx.Module):
        ...     def __init__(self):
        ...         self.w = nnx.Param(jnp.ones((4, 2)))
        ...         self.b = nnx.Param(jnp.ones((2,)))
        >>> list(direct_params(Mix()))
        ['w']
    """
    return {k: v for k, v in vars(module).items()
            if isinstance(v, nnx.Param) and not isinstance(v, QuantParam) and jnp.ndim(v.get_value()) >= 2}


def _param_of(module, x):
    """The attribute name of the Param of ``module`` whose value IS ``x``, else None."""
    if module is None:
        return None
    for name, v in direct_params(module).items():
        if v.get_value() is x:
            return name
    return None


def _weight_equation(op, eq, dims, ndim) -> str:
    """An einsum equation whose operand 1 has the weight's (channel, contraction) axes of this call."""
    if op == "einsum":
        return eq
    ch, ct = dot_general_axes(dims, 1, ndim) if op == "dot_general" else matmul_axes(1, ndim)
    letters = "abcdefghijklmnopqrstuvwxyz"[:ndim]
    return f"{letters[ct]},{letters}->{letters[ch]}"


def _site_quant(op, a, b, eq=None, dims=None):
    """Fake-quantized operands ``(a', b')`` for the innermost scope's next ``op`` site, or None."""
    scope = _stack()[-1]
    k = scope["counts"].get(op, 0)
    scope["counts"][op] = k + 1
    local = f"{op}_{k}"
    path = f"{scope['path']}/{local}" if scope["path"] else local
    rule = first_match(scope["rules"], path)
    if rule is None or rule.is_float:
        return None
    if not rule.stateless:
        raise ValueError(
            f"call site {path!r} matched {rule!r}: call sites (jnp.einsum/dot/matmul/dot_general in your "
            "own modules) support weight_quantizer='ste' and act_quantizer='ste' with act_range='dynamic' "
            "only; use a separate rule for them"
        )
    module = scope.get("module")
    pname = _param_of(module, b) if rule.weight is not None else None
    sites = getattr(module, SITES_ATTR, None)
    layer = sites[local] if sites is not None and local in sites else None
    if layer is not None and pname is None:
        raise ValueError(f"call site {path!r}: quantize_model bound it to a Param of its module, but this call "
                         "passes another operand; pass the Param itself (self.w[...]) as the second operand")
    SEEN_CALL_SITES.setdefault(scope["rules"], {})[path] = rule.pattern
    a, b = jnp.asarray(a), jnp.asarray(b)

    def axes(x, operand):
        if eq is not None:
            return einsum_axes(eq, operand, x.ndim)
        if dims is not None:
            return dot_general_axes(dims, operand, x.ndim)
        return matmul_axes(operand, x.ndim)

    if pname is not None and layer is None:
        if not _recorders:
            raise ValueError(
                f"call site {path!r} multiplies Param {pname!r} of its module, which quantize_model did not bind "
                "(its example never reached this call): pass an example batch that runs it to quantize_model")
        for rec in _recorders:
            rec[(scope["path"], local)] = (pname, _weight_equation(op, eq, dims, b.ndim))
    if layer is not None and layer.capture_stats is not None and jnp.issubdtype(a.dtype, jnp.floating):
        ct = axes(a, 0)[1]
        layer.capture_stats(jnp.moveaxis(a, ct, -1).reshape(-1, a.shape[ct]))
    capturing = layer is not None and layer.capture_float
    if rule.act is not None and jnp.issubdtype(a.dtype, jnp.floating) and a.ndim and not capturing:
        a = fake_quant(a, rule.act.resolve(*axes(a, 0)))
    if layer is not None:
        b = b if capturing else layer.weight_value().astype(b.dtype)
    elif rule.weight is not None and jnp.issubdtype(b.dtype, jnp.floating) and b.ndim:
        b = fake_quant(b, rule.weight.resolve(*axes(b, 1)))
    return a, b


def _p_einsum(subscripts, *operands, **kw):
    if not _stack() or _from_library() or not isinstance(subscripts, str) or len(operands) != 2 or "->" not in subscripts:
        return ORIGINAL_OPS["einsum"](subscripts, *operands, **kw)
    r = _site_quant("einsum", *operands, eq=subscripts)
    return ORIGINAL_OPS["einsum"](subscripts, *(operands if r is None else r), **kw)


def _p_dot(a, b, *args, **kw):
    if not _stack() or _from_library():
        return ORIGINAL_OPS["dot"](a, b, *args, **kw)
    r = _site_quant("dot", a, b)
    return ORIGINAL_OPS["dot"](*((a, b) if r is None else r), *args, **kw)


def _p_matmul(a, b, *args, **kw):
    if not _stack() or _from_library():
        return ORIGINAL_OPS["matmul"](a, b, *args, **kw)
    r = _site_quant("matmul", a, b)
    return ORIGINAL_OPS["matmul"](*((a, b) if r is None else r), *args, **kw)


def _p_dot_general(lhs, rhs, dimension_numbers, *args, **kw):
    if not _stack() or _from_library():
        return ORIGINAL_OPS["dot_general"](lhs, rhs, dimension_numbers, *args, **kw)
    r = _site_quant("dot_general", lhs, rhs, dims=dimension_numbers)
    return ORIGINAL_OPS["dot_general"](*((lhs, rhs) if r is None else r), dimension_numbers, *args, **kw)


@contextlib.contextmanager
def _patched():
    with _patch_lock:
        if _patch_depth[0] == 0:
            jnp.einsum, jnp.dot, jnp.matmul, jax.lax.dot_general = _p_einsum, _p_dot, _p_matmul, _p_dot_general
        _patch_depth[0] += 1
    try:
        yield
    finally:
        with _patch_lock:
            _patch_depth[0] -= 1
            if _patch_depth[0] == 0:
                jnp.einsum, jnp.dot, jnp.matmul = ORIGINAL_OPS["einsum"], ORIGINAL_OPS["dot"], ORIGINAL_OPS["matmul"]
                jax.lax.dot_general = ORIGINAL_OPS["dot_general"]


@contextlib.contextmanager
def call_scope(path: str, rules, module=None):
    """Run a module's code with its call sites named ``path/<op>_<k>`` and quantized by ``rules``
    (a tuple of :class:`~qlab.nn.Rule`; see the module example); ``module``: the module whose code runs
    (its Params passed as weights are found, and quantized by its bound call-site layers)."""
    st = _stack()
    st.append({"path": path, "rules": rules, "counts": {}, "module": module})
    try:
        with _patched():
            yield
    finally:
        st.pop()


def _intercepting_class(cls):
    """A subclass of ``cls`` whose ``__call__`` runs under :func:`call_scope` (cached per class)."""
    if getattr(cls, "_qlab_intercepting", False):
        return cls
    sub = _INTERCEPT_CLASSES.get(cls)
    if sub is None:
        def __call__(self, *args, **kwargs):
            with call_scope(self._qlab_path, self._qlab_rules, self):
                return cls.__call__(self, *args, **kwargs)

        sub = type(cls.__name__, (cls,), {
            "__call__": __call__,
            "_qlab_intercepting": True,
            "__module__": cls.__module__,
            "__qualname__": cls.__qualname__,
            "__doc__": cls.__doc__,
        })
        _INTERCEPT_CLASSES[cls] = sub
    return sub


def intercept_call_sites(module, path: str, rules) -> None:
    """Make ``module`` (in place) run its ``__call__`` under ``call_scope(path, rules)``: its class
    becomes a cached subclass of the same name, so the graph and its state are unchanged.

    Example:
        >>> from flax import nnx
        >>> from qlab.nn.rules import Rule
        >>> class Gram(nnx.Module):
        ...     def __call__(self, x):
        ...         return jnp.matmul(x, x.T)
        >>> g = Gram()
        >>> intercept_call_sites(g, "", (Rule("matmul_0", act="int2"),))
        >>> is_intercepting(g), type(g).__name__
        (True, 'Gram')
    """
    module.__class__ = _intercepting_class(type(module))
    module._qlab_path = path
    module._qlab_rules = rules


def is_intercepting(module) -> bool:
    """True when ``module``'s call sites are intercepted (see :func:`intercept_call_sites`).

    Example:
        >>> from flax import nnx
        >>> is_intercepting(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
        False
    """
    return bool(getattr(type(module), "_qlab_intercepting", False))
