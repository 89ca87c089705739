"""Quantization-aware NNX models: :func:`quantize_model` and the layer wrapper it installs.

``quantize_model(model, rules)`` clones ``model`` and replaces every ``nnx.Linear``, ``nnx.Conv``,
``nnx.Einsum`` and ``nnx.Embed`` whose path matches a quantizing rule by a :class:`QuantizedLayer`
at the same path. The wrapper holds the original layer (``.layer``, with its Params), a
:class:`~qlab.nn.quantizers.WeightQuantizer` and/or :class:`~qlab.nn.quantizers.ActQuantizer`,
and optional PTQ hooks (``input_scale``, real codes after :func:`~qlab.nn.convert`). Its forward
fake-quantizes the input and the weight, then runs the ORIGINAL layer's own ``__call__`` (or
``attend``) with the fake-quantized weight swapped in for the duration of the call, so every
option of the Flax layer (padding, strides, dtype promotion, bias) behaves exactly as in float.

Matmuls written directly in a user's module (``jnp.einsum``, ``jnp.dot``, ``jnp.matmul``,
``jax.lax.dot_general`` looked up through those public names) are reached by running the
module's ``__call__`` under a scoped interception: call sites are named
``"<module path>/<op>_<k>"`` (see :mod:`qlab.nn.rules`), the first operand is the activation and
the second the "weight". Call sites support stateless quantizers (STE weights, dynamic
activations). Calls made from inside Flax/JAX library code are never intercepted, and ``a @ b``
is not intercepted (write ``jnp.matmul``). Interception only acts while tracing, so a jitted
step costs nothing extra for it.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qlab.models import MLP
    >>> from qlab.nn import Rule, quantize_model
    >>> qm = quantize_model(MLP(16, hidden=(32,), out=4, rngs=nnx.Rngs(0)), [Rule(".*", weight="int4/g8", act="int8")])
    >>> type(qm.layers[0]).__name__, qm(jnp.ones((2, 16))).shape
    ('QuantizedLayer', (2, 4))
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlab.numerics.granularity import PerChannel, PerGroup
from qlab.numerics.matmul import int_matmul_supported, quantized_matmul, quantized_matmul_codes
from qlab.numerics.quantize import QTensor, dequantize, fake_quant
from qlab.numerics.spec import bit_width_family
from qlab.nn.quantizers import ActQuantizer, QuantOverride, QuantStat, WeightQuantizer, _traced
from qlab.nn.rules import Rule, as_rules, first_match

__all__ = [
    "QuantizedLayer",
    "quantize_model",
    "set_input_scale",
    "quantized_layers",
    "float_layers",
    "find_layer",
    "LAYER_KINDS",
    "traced_variant",
]

LAYER_KINDS = {nnx.Linear: "linear", nnx.Conv: "conv", nnx.Einsum: "einsum", nnx.Embed: "embed"}
_WEIGHT_NAME = {"linear": "kernel", "conv": "kernel", "einsum": "kernel", "embed": "embedding"}
_CALL_OPS = ("einsum", "dot", "matmul", "dot_general")
_MAX_SITES = 8  # call sites <op>_0 .. <op>_7 are tried when matching rules at quantize time


def _kind(module) -> str | None:
    for cls, k in LAYER_KINDS.items():
        if type(module) is cls or isinstance(module, cls):
            return k
    return None


def _einsum_axes(eq: str, operand: int, ndim: int):
    """(channel_axis, contract_axis) of operand 0/1 of a two-operand einsum."""
    try:
        lhs, out = eq.replace(" ", "").split("->")
        a, b = lhs.split(",")
    except ValueError:
        return ndim - 1, max(ndim - 2, 0)
    if "." in a or "." in b:
        return ndim - 1, (ndim - 2 if operand == 1 else ndim - 1)
    me, other = (a, b) if operand == 0 else (b, a)
    contract = [i for i, c in enumerate(me) if c in other and c not in out]
    free = [i for i, c in enumerate(me) if c in out and c not in other]
    ct = contract[0] if contract else ndim - 1
    ch = free[-1] if free else (ndim - 1 if ct != ndim - 1 else 0)
    return ch, ct


def _weight_axes(kind: str, layer, shape) -> tuple[int, int]:
    nd = len(shape)
    if kind == "linear":
        return 1, 0
    if kind == "conv":
        return nd - 1, nd - 2
    if kind == "embed":
        return 0, 1
    eq = getattr(layer, "einsum_str", None)
    if eq:
        return _einsum_axes(eq, 1, nd)
    return nd - 1, 0


class _Const:
    """Read-only stand-in for a Variable (``v[...]``, ``.value``, ``.shape``) holding a traced array."""

    __slots__ = ("_v",)

    def __init__(self, v):
        self._v = v

    def __getitem__(self, idx):
        return self._v if idx is Ellipsis else self._v[idx]

    def get_value(self):
        return self._v

    value = property(get_value)
    shape = property(lambda self: self._v.shape)
    dtype = property(lambda self: self._v.dtype)


def _with_weight(layer, name: str, value):
    """A shallow view of ``layer`` whose ``name`` attribute reads as ``value``. Nothing is mutated,
    so this works in any trace (jax.grad/jit closures included)."""
    view = object.__new__(type(layer))
    d = dict(vars(layer))
    d[name] = _Const(value)
    object.__setattr__(view, "__dict__", d)
    return view


class CaptureStats(nnx.Module):
    """Calibration statistics of one layer's input (QuantStats, updated by forward passes)."""

    def __init__(self, in_features: int, stats, max_rows: int, dtype=jnp.float32):
        self.stats = tuple(stats)
        self.max_rows = int(max_rows)
        self.count = QuantStat(jnp.zeros((), jnp.int32))
        self.hessian = QuantStat(jnp.zeros((in_features, in_features), jnp.float32)) if "hessian" in stats else None
        self.absmax = QuantStat(jnp.zeros((in_features,), jnp.float32)) if "absmax" in stats else None
        self.sum_abs = QuantStat(jnp.zeros((in_features,), jnp.float32)) if "mean_abs" in stats else None
        self.inputs = QuantStat(jnp.zeros((max_rows, in_features), dtype)) if "inputs" in stats else None

    def __call__(self, x2):
        x2f = jax.lax.stop_gradient(x2).astype(jnp.float32)
        n = self.count[...]
        if self.hessian is not None:
            self.hessian[...] = self.hessian[...] + jnp.matmul(x2f.T, x2f, precision=jax.lax.Precision.HIGHEST)
        if self.absmax is not None:
            self.absmax[...] = jnp.maximum(self.absmax[...], jnp.max(jnp.abs(x2f), axis=0))
        if self.sum_abs is not None:
            self.sum_abs[...] = self.sum_abs[...] + jnp.sum(jnp.abs(x2f), axis=0)
        if self.inputs is not None:
            k = min(x2.shape[0], self.max_rows)
            buf = jnp.concatenate([self.inputs[...], jnp.zeros((k, x2.shape[1]), self.inputs.dtype)])
            pos = jnp.minimum(n, self.max_rows)
            buf = jax.lax.dynamic_update_slice(buf, x2[:k].astype(buf.dtype), (pos, 0))
            self.inputs[...] = buf[: self.max_rows]
        self.count[...] = n + x2.shape[0]


class QuantizedLayer(nnx.Module):
    """A quantization-aware stand-in for one Flax layer (at the layer's path in the model).

    Attributes:
        layer: the original ``nnx.Linear`` / ``nnx.Conv`` / ``nnx.Einsum`` / ``nnx.Embed``.
        kind: ``"linear"``, ``"conv"``, ``"einsum"`` or ``"embed"``.
        path: the layer path the rule matched.
        rule: the :class:`~qlab.nn.Rule` that matched.
        weight_quant: a ``WeightQuantizer`` or None (float weight).
        act_quant: an ``ActQuantizer`` or None (float input).
        input_scale: None, or a per-input-feature Variable: the forward computes
            ``act_quant(x / input_scale) @ weight`` (PTQ smoothing stores weight * input_scale).
        q_codes, q_scale, q_zero, q_tscale: the weight as real codes + scales once converted
            (:func:`~qlab.nn.convert`, :func:`~qlab.nn.load_quantized_weights`); None before.
    """

    def __init__(self, layer, kind: str, path: str, rule: Rule):
        self.layer = layer
        self.kind = kind
        self.path = path
        self.rule = rule
        self.weight_name = _WEIGHT_NAME[kind]
        w = getattr(layer, self.weight_name)[...]
        self.channel_axis, self.contract_axis = _weight_axes(kind, layer, w.shape)
        if rule.weight is not None:
            try:
                rule.weight.resolve(self.channel_axis, self.contract_axis).granularity.view(tuple(w.shape))
            except ValueError as e:
                raise ValueError(f"layer {path!r} ({kind}, weight {tuple(w.shape)}) with {rule!r}: {e}") from None
            self.weight_quant = WeightQuantizer(
                rule.weight.resolve(self.channel_axis, self.contract_axis),
                method=rule.weight_quantizer,
                weight=w,
            )
        else:
            self.weight_quant = nnx.data(None)
        if rule.act is not None:
            self.act_quant = ActQuantizer(
                rule.act, method=rule.act_quantizer, range=rule.act_range, ema_decay=rule.ema_decay
            )
        else:
            self.act_quant = nnx.data(None)
        self.outlier_threshold = rule.outlier_threshold
        if self.outlier_threshold is not None and kind != "linear":
            raise ValueError(f"{path}: outlier_threshold is supported for nnx.Linear layers only, not {kind}")
        self.input_scale = nnx.data(None)
        self.q_codes = nnx.data(None)
        self.q_scale = nnx.data(None)
        self.q_zero = nnx.data(None)
        self.q_tscale = nnx.data(None)
        self.q_meta = None  # (spec, shape, dtype name) once converted
        self.capture_stats = nnx.data(None)
        self.capture_float = False

    # ---- weights ---------------------------------------------------------------------
    @property
    def weight(self) -> nnx.Variable:
        """The float weight Variable of the wrapped layer (kernel or embedding table)."""
        return getattr(self.layer, self.weight_name)

    @property
    def in_features(self) -> int:
        w = self.weight[...]
        if self.q_meta is not None and w.size == 0:
            return self.q_meta[1][self.contract_axis]
        return w.shape[self.contract_axis]

    @property
    def converted(self) -> bool:
        """True once the layer uses real codes + scales (convert / load_quantized_weights)."""
        return self.q_meta is not None

    def qtensor(self) -> QTensor | None:
        """The stored QTensor (converted layers), else None."""
        if self.q_meta is None:
            return None
        spec, shape, dtype = self.q_meta
        return QTensor(
            self.q_codes[...],
            self.q_scale[...],
            None if self.q_zero is None else self.q_zero[...],
            None if self.q_tscale is None else self.q_tscale[...],
            spec,
            tuple(shape),
            np.dtype(dtype),
        )

    def set_qtensor(self, q: QTensor, *, keep_float: bool = True):
        """Use ``dequantize(q)`` as this layer's weight from now on."""
        shape = tuple(self.q_meta[1]) if (self.q_meta is not None and self.weight[...].size == 0) else tuple(self.weight[...].shape)
        if tuple(q.shape) != shape:
            raise ValueError(f"{self.path}: QTensor shape {q.shape} != weight shape {shape}")
        self.q_codes = QuantStat(q.codes)
        self.q_scale = QuantStat(q.scale)
        self.q_zero = None if q.zero_point is None else QuantStat(q.zero_point)
        self.q_tscale = None if q.tensor_scale is None else QuantStat(q.tensor_scale)
        self.q_meta = (q.spec, tuple(q.shape), np.dtype(q.dtype).name)
        if not keep_float:
            self.weight.set_raw_value(jnp.zeros((0,), self.weight[...].dtype))

    def weight_value(self, w=None):
        """The weight the forward pass uses: dequantized codes, fake-quant weight, or float."""
        if self.q_meta is not None:
            return dequantize(self.qtensor())
        w = self.weight[...] if w is None else w
        if self.weight_quant is not None:
            return self.weight_quant(w)
        return w

    # ---- inputs ----------------------------------------------------------------------
    def _prep_input(self, x):
        if self.input_scale is not None:
            x = x / self.input_scale[...].astype(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.capture_stats is not None:
            self.capture_stats(x2)
        if self.act_quant is not None and not self.capture_float:
            x2 = self.act_quant(x2)
        return x2.reshape(shape)

    def _run(self, method, x, *args, **kwargs):
        if self.capture_float and self.weight[...].size:
            w = self.weight[...]
        else:
            w = self.weight_value()
        view = _with_weight(self.layer, self.weight_name, w)
        return getattr(type(self.layer), method)(view, x, *args, **kwargs)

    def _int_matmul_specs(self, x):
        """(input spec, weight spec or QTensor) when the forward can multiply integer codes, else None
        (see ``Rule.int_matmul``)."""
        aq, wq, lin = self.act_quant, self.weight_quant, self.layer
        if not (self.kind == "linear" and self.rule.int_matmul and aq is not None and self.outlier_threshold is None
                and self.capture_stats is None and not self.capture_float and x.dtype == jnp.float32
                and aq.method == "ste" and aq.range == "dynamic" and not _traced(aq)
                and int_matmul_supported(aq.spec, 0)
                and getattr(lin, "dot_general", None) in (None, _ORIG["dot_general"])  # jax.lax's, maybe patched now
                and getattr(lin, "dtype", None) in (None, jnp.float32) and lin.precision is None):
            return None
        if self.q_meta is not None:
            q = self.qtensor()
            ok = self.contract_axis == 0 and q.zero_point is None and int_matmul_supported(q.spec, 1)
            return (aq.spec, q) if ok else None
        if (wq is not None and wq.method == "ste" and not _traced(wq) and self.contract_axis == 0
                and self.weight[...].dtype == jnp.float32 and int_matmul_supported(wq.spec, 1)):
            return aq.spec, wq.spec
        return None

    def _int_matmul_forward(self, x, specs):
        aspec, w = specs
        if self.input_scale is not None:
            x = x / self.input_scale[...].astype(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if isinstance(w, QTensor):
            y = quantized_matmul_codes(x2, aspec, w)
        else:
            y = quantized_matmul(x2, self.weight[...], aspec, w)
        y = y.reshape(shape[:-1] + (y.shape[-1],))
        bias = getattr(self.layer, "bias", None)
        return y if bias is None else y + bias[...]

    def __call__(self, x, *args, **kwargs):
        if self.kind == "embed":
            return self._lookup(x, *args, **kwargs)
        specs = None if args or kwargs else self._int_matmul_specs(x)
        if specs is not None:
            return self._int_matmul_forward(x, specs)
        if self.outlier_threshold is not None and not self.capture_float:
            return self._outlier_forward(x, *args, **kwargs)
        return self._run("__call__", self._prep_input(x), *args, **kwargs)

    def attend(self, query, *args, **kwargs):
        """Tied output projection ``query @ embedding.T`` (Embed layers), quantized like a Linear."""
        if self.kind != "embed":
            raise AttributeError(f"{self.kind} layers have no attend()")
        return self._run("attend", self._prep_input(query), *args, **kwargs)

    def _lookup(self, ids, *args, **kwargs):
        wq = self.weight_quant
        g = None if wq is None else wq.spec.granularity
        row_wise = (
            self.q_meta is None
            and wq is not None
            and wq.method == "ste"
            and not self.capture_float
            and (isinstance(g, PerChannel) and g.axis == 0 or isinstance(g, PerGroup) and g.axis == 1)
        )
        if row_wise and not args and not kwargs:
            # per-row scales: quantizing only the gathered rows is bit-identical and much cheaper
            table = self.weight[...]
            rows = jnp.take(table, ids, axis=0)
            r2 = rows.reshape(-1, table.shape[1])
            return wq(r2).reshape(rows.shape)
        return self._run("__call__", ids, *args, **kwargs)

    def _outlier_forward(self, x, *args, **kwargs):
        """LLM.int8-style: features with |x| > threshold anywhere in the batch stay float."""
        lin = self.layer
        if self.input_scale is not None:
            x = x / self.input_scale[...].astype(x.dtype)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.capture_stats is not None:
            self.capture_stats(x2)
        outl = jnp.max(jnp.abs(jax.lax.stop_gradient(x2)), axis=0) > self.outlier_threshold  # [in]
        keep = (~outl).astype(x2.dtype)
        xin = x2 * keep
        xout = x2 * (1 - keep)
        if self.act_quant is not None:
            xin = self.act_quant(xin)
        w = self.weight[...]
        if self.q_meta is not None:
            wq = dequantize(self.qtensor())
        elif self.weight_quant is not None:
            wq = self.weight_quant(w * keep[:, None].astype(w.dtype))
        else:
            wq = w
        wq = jnp.where(outl[:, None], w if w.size else wq, wq)
        y = type(lin).__call__(_with_weight(lin, "kernel", wq), xin.reshape(shape), *args, **kwargs)
        wf = w * (1 - keep)[:, None].astype(w.dtype) if w.size else wq * (1 - keep)[:, None]
        y_out = lin.dot_general(xout, wf, (((1,), (0,)), ((), ())), precision=lin.precision)
        return y + y_out.reshape(y.shape).astype(y.dtype)

    # convenience passthroughs (read-only)
    @property
    def kernel(self):
        return self.layer.kernel

    @property
    def bias(self):
        return getattr(self.layer, "bias", None)

    @property
    def embedding(self):
        return self.layer.embedding

    @property
    def num_embeddings(self):
        return self.layer.num_embeddings

    @property
    def features(self):
        return self.layer.features

    @property
    def out_features(self):
        return getattr(self.layer, "out_features", None)


# ---------------------------------------------------------------------------------------
# Call-site interception (jnp.einsum / dot / matmul / lax.dot_general in user modules)

_local = threading.local()
_ORIG = {
    "einsum": jnp.einsum,
    "dot": jnp.dot,
    "matmul": jnp.matmul,
    "dot_general": jax.lax.dot_general,
}
_LIB_PREFIXES = ("jax.", "jax", "flax", "optax", "qlab.nn", "qlab.numerics", "numpy", "treescope")
_patch_lock = threading.Lock()
_patch_depth = [0]
#: call sites seen while tracing: {rules: {path: pattern}}
SEEN_CALL_SITES: dict = {}


def _stack():
    s = getattr(_local, "stack", None)
    if s is None:
        s = _local.stack = []
    return s


def _from_library(depth=2) -> bool:
    name = sys._getframe(depth).f_globals.get("__name__", "")
    return name == "jax" or name.startswith(_LIB_PREFIXES)


def _site_quant(op, a, b, eq=None, dims=None):
    """(a', b', path) fake-quantized operands for the innermost scope, or None."""
    scope = _stack()[-1]
    k = scope["counts"].get(op, 0)
    scope["counts"][op] = k + 1
    path = f"{scope['path']}/{op}_{k}" if scope["path"] else f"{op}_{k}"
    rule = first_match(scope["rules"], path)
    if rule is None or rule.is_float:
        return None
    if not rule.stateless:
        raise ValueError(
            f"call site {path!r} matched {rule!r}: call sites (jnp.einsum/dot/matmul/dot_general in your "
            "own modules) support weight_quantizer='ste' and act_quantizer='ste' with act_range='dynamic' "
            "only; use a separate rule for them"
        )
    SEEN_CALL_SITES.setdefault(scope["rules"], {})[path] = rule.pattern
    a, b = jnp.asarray(a), jnp.asarray(b)

    def axes(x, operand):
        if eq is not None:
            return _einsum_axes(eq, operand, x.ndim)
        if dims is not None:
            (lc, rc), _ = dims
            c = (lc if operand == 0 else rc)
            ct = c[0] % x.ndim if c else x.ndim - 1
            ch = x.ndim - 1 if ct != x.ndim - 1 else 0
            return ch, ct
        if operand == 0:
            return max(x.ndim - 2, 0), x.ndim - 1
        return x.ndim - 1, max(x.ndim - 2, 0)

    if rule.act is not None and jnp.issubdtype(a.dtype, jnp.floating) and a.ndim:
        a = fake_quant(a, rule.act.resolve(*axes(a, 0)))
    if rule.weight is not None and jnp.issubdtype(b.dtype, jnp.floating) and b.ndim:
        b = fake_quant(b, rule.weight.resolve(*axes(b, 1)))
    return a, b


def _p_einsum(subscripts, *operands, **kw):
    if not _stack() or _from_library() or not isinstance(subscripts, str) or len(operands) != 2 or "->" not in subscripts:
        return _ORIG["einsum"](subscripts, *operands, **kw)
    r = _site_quant("einsum", *operands, eq=subscripts)
    return _ORIG["einsum"](subscripts, *(operands if r is None else r), **kw)


def _p_dot(a, b, *args, **kw):
    if not _stack() or _from_library():
        return _ORIG["dot"](a, b, *args, **kw)
    r = _site_quant("dot", a, b)
    return _ORIG["dot"](*((a, b) if r is None else r), *args, **kw)


def _p_matmul(a, b, *args, **kw):
    if not _stack() or _from_library():
        return _ORIG["matmul"](a, b, *args, **kw)
    r = _site_quant("matmul", a, b)
    return _ORIG["matmul"](*((a, b) if r is None else r), *args, **kw)


def _p_dot_general(lhs, rhs, dimension_numbers, *args, **kw):
    if not _stack() or _from_library():
        return _ORIG["dot_general"](lhs, rhs, dimension_numbers, *args, **kw)
    r = _site_quant("dot_general", lhs, rhs, dims=dimension_numbers)
    return _ORIG["dot_general"](*((lhs, rhs) if r is None else r), dimension_numbers, *args, **kw)


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
                jnp.einsum, jnp.dot, jnp.matmul = _ORIG["einsum"], _ORIG["dot"], _ORIG["matmul"]
                jax.lax.dot_general = _ORIG["dot_general"]


@contextlib.contextmanager
def call_scope(path: str, rules):
    """Run a module's code with its call sites named ``path/<op>_<k>`` and quantized by ``rules``."""
    st = _stack()
    st.append({"path": path, "rules": rules, "counts": {}})
    try:
        with _patched():
            yield
    finally:
        st.pop()


_INTERCEPT_CLASSES: dict = {}


def _intercepting_class(cls):
    """A subclass of ``cls`` whose ``__call__`` runs under :func:`call_scope` (cached per class)."""
    if getattr(cls, "_qlab_intercepting", False):
        return cls
    sub = _INTERCEPT_CLASSES.get(cls)
    if sub is None:
        def __call__(self, *args, **kwargs):
            with call_scope(self._qlab_path, self._qlab_rules):
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


# ---------------------------------------------------------------------------------------
# quantize_model


def _path_str(p) -> str:
    return "/".join(str(k) for k in p)


def _walk(model):
    """(wrappers, float layers, user modules) as ordered {path: module}, not entering wrappers."""
    wrappers, floats, users = {}, {}, {}
    inside = []
    for p, m in sorted(nnx.iter_modules(model), key=lambda t: tuple(map(str, t[0]))):
        if any(p[: len(w)] == w and len(p) > len(w) for w in inside):
            continue
        s = _path_str(p)
        if isinstance(m, QuantizedLayer):
            wrappers[s] = m
            inside.append(p)
        elif _kind(m) is not None:
            floats[s] = m
        elif not type(m).__module__.startswith("flax"):
            users[s] = m
    return wrappers, floats, users


def _ordered(model):
    """Module paths in definition order (nnx.iter_modules yields children before parents)."""
    return list(nnx.iter_modules(model))


def quantized_layers(qmodel) -> dict[str, QuantizedLayer]:
    """``{path: QuantizedLayer}`` of a quantized model."""
    return _walk(qmodel)[0]


def float_layers(qmodel) -> dict[str, nnx.Module]:
    """``{path: layer}``: Linear/Conv/Einsum/Embed layers left in float."""
    return _walk(qmodel)[1]


def find_layer(qmodel, path: str) -> QuantizedLayer:
    """The QuantizedLayer at ``path`` (ValueError listing the known paths otherwise)."""
    wr = quantized_layers(qmodel)
    if path not in wr:
        raise ValueError(f"no quantized layer at {path!r}; quantized layers: {list(wr)}")
    return wr[path]


def _deep_copy(model):
    """A copy sharing no buffers with ``model`` (optimizers may donate the copy's arrays)."""
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: jnp.array(a, copy=True) if isinstance(a, jax.Array) else a, state)
    return nnx.merge(graphdef, state)


def _set_child(root, p, new):
    parent = root
    for k in p[:-1]:
        parent = parent[k] if isinstance(parent, (nnx.List, nnx.Dict, list, dict)) else getattr(parent, k)
    k = p[-1]
    if isinstance(parent, (nnx.List, nnx.Dict, list, dict)):
        parent[k] = new
    else:
        setattr(parent, k, new)


def quantize_model(model: nnx.Module, rules, *, allow_unmatched: bool = False) -> nnx.Module:
    """A quantization-aware copy of an NNX ``model`` (``model`` itself is not changed).

    Args:
        model: any NNX module.
        rules: a :class:`~qlab.nn.Rule` or a sequence of them, tried in order on each layer path
            (see :mod:`qlab.nn.rules` for paths and matching).
        allow_unmatched: by default a quantizing rule that matches no layer (nor a possible call
            site ``<module>/<op>_<k>``, k < 8, of a user module) raises ValueError; with True it
            is only warned about and listed by :func:`~qlab.nn.layer_report`.

    Returns:
        The same module graph with matching layers replaced by :class:`QuantizedLayer`s. Learnable
        quantizer state is ``QuantParam`` (trained by default optimizers), statistics are
        ``QuantStat``. ``qmodel.eval()`` freezes activation statistics, ``qmodel.train()`` resumes.

    Example:
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> m = MLP(8, hidden=(16,), out=2, rngs=nnx.Rngs(0))
        >>> qm = quantize_model(m, [Rule("layers/.*", weight="int4/ch", act="int8")])
        >>> type(qm.layers[0]).__name__, type(qm.head).__name__
        ('QuantizedLayer', 'Linear')
        >>> try:
        ...     quantize_model(m, [Rule("nothing", weight="int8")])
        ... except ValueError as e:
        ...     print(str(e)[:54])
        rules matched no layer: Rule('nothing', weight='int8')
    """
    rules = as_rules(rules)
    qmodel = _deep_copy(model)
    mods = list(nnx.iter_modules(qmodel))
    layer_paths, user_paths = [], []
    for p, m in mods:
        if isinstance(m, QuantizedLayer):
            raise ValueError(
                f"quantize_model: the model is already quantized (QuantizedLayer at {_path_str(p)!r}); "
                "quantize the float model instead"
            )
    for p, m in mods:
        if any(len(q) < len(p) and p[: len(q)] == q for q, _ in layer_paths):
            continue
        k = _kind(m)
        if k is not None:
            layer_paths.append((p, m))
        elif not type(m).__module__.startswith("flax"):
            user_paths.append((p, m))
    matched = set()
    root = qmodel
    for p, m in layer_paths:
        s = _path_str(p)
        rule = first_match(rules, s)
        if rule is None:
            continue
        matched.add(rule)
        if rule.is_float:
            continue
        w = QuantizedLayer(m, _kind(m), s, rule)
        if p == ():
            root = w
        else:
            _set_child(qmodel, p, w)
    # user modules: intercept their call sites where some rule may match one
    for p, m in user_paths:
        s = _path_str(p)
        hits = set()
        for op in _CALL_OPS:
            for k in range(_MAX_SITES):
                site = f"{s}/{op}_{k}" if s else f"{op}_{k}"
                r = first_match(rules, site)
                if r is not None:
                    hits.add(r)
        quant_hits = {r for r in hits if not r.is_float}
        matched |= hits
        if quant_hits:
            m.__class__ = _intercepting_class(type(m))
            m._qlab_path = s
            m._qlab_rules = rules
    unmatched = tuple(r for r in rules if r not in matched)
    bad = [r for r in unmatched if not r.is_float]
    if bad:
        msg = "rules matched no layer: " + ", ".join(map(repr, bad)) + (
            f". Layer paths: {[_path_str(p) for p, _ in layer_paths][:20]}"
        )
        if not allow_unmatched:
            raise ValueError(msg + " (pass allow_unmatched=True to continue)")
        warnings.warn(msg, stacklevel=2)
    root._qlab_rules = rules
    root._qlab_unmatched = tuple(r.pattern for r in unmatched)
    return root


def set_input_scale(qmodel, path: str, s) -> None:
    """Give the quantized layer at ``path`` a per-input-feature scale: from now on it computes
    ``act_quant(x / s) @ weight``. (PTQ smoothing stores the weight already multiplied by ``s``
    along its contraction axis; this function does not touch the weight.)

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> qm = quantize_model(nnx.Linear(4, 2, rngs=nnx.Rngs(0)), [Rule(".*", weight="int8")])
        >>> set_input_scale(qm, "", jnp.full((4,), 2.0)); qm.input_scale.shape
        (4,)
    """
    layer = find_layer(qmodel, path)
    s = jnp.asarray(s, jnp.float32)
    if s.shape != (layer.in_features,):
        raise ValueError(f"{path}: input_scale must have shape ({layer.in_features},), got {s.shape}")
    layer.input_scale = QuantStat(s)


def traced_variant(qmodel, like=None, *, clip_ratio=None) -> nnx.Module:
    """A copy of ``qmodel`` on ``like``'s graph whose STE quantizers hold their integer bit width
    (each from ``qmodel``'s OWN spec) and, with ``clip_ratio``, the weight clip ratio as traced
    :class:`~qlab.nn.quantizers.QuantOverride` state. Variants of one model that differ only in
    those values (``int2/ch`` vs ``int8/ch`` ...) then have equal graphdefs and can train as one
    ``jax.vmap``-ed program (``qlab.experiments.methods.train_variants``); copy the trained values
    back with ``nnx.update(qmodel, nnx.state(view, nnx.Not(QuantOverride)))``.

    Every quantizer of ``like`` with an integer format and method ``"ste"`` (or an LSQ weight quantizer) gets ``traced_bits``
    (whatever its bits), so all variants built against one ``like`` share one structure; other
    quantizers must have equal specs. ValueError names the layer otherwise.

    Example:
        >>> from qlab.models import MLP
        >>> m = MLP(8, hidden=(16,), out=2, rngs=nnx.Rngs(0))
        >>> q2, q8 = (quantize_model(m, [Rule(".*", weight=w)]) for w in ("int2/ch", "int8/ch"))
        >>> v2, v8 = traced_variant(q2, q8), traced_variant(q8, q8)
        >>> nnx.graphdef(v2) == nnx.graphdef(v8), int(v2.head.weight_quant.traced_bits[...])
        (True, 2)
        >>> bool((v2(jnp.ones((1, 8))) == q2(jnp.ones((1, 8)))).all())
        True
    """
    from qlab.numerics.formats import IntFormat

    like = qmodel if like is None else like
    own, tmpl = quantized_layers(qmodel), quantized_layers(like)
    if list(own) != list(tmpl):
        raise ValueError(f"traced_variant: quantized layers differ: {list(own)} vs {list(tmpl)}")
    view = nnx.merge(nnx.graphdef(like), nnx.state(qmodel))
    for path, L in quantized_layers(view).items():
        for name in ("weight_quant", "act_quant"):
            a, t = getattr(own[path], name), getattr(tmpl[path], name)
            if (a is None) != (t is None) or (a is not None and (a.method != t.method or bit_width_family(a.spec) != bit_width_family(t.spec))):
                raise ValueError(
                    f"traced_variant: layer {path!r} {name}: {None if a is None else str(a.spec)!r} and "
                    f"{None if t is None else str(t.spec)!r} differ in more than an integer bit width "
                    "(or in the quantizer method)"
                )
            if a is None:
                continue
            traced = (t.method == "ste" or (t.method == "lsq" and name == "weight_quant")) and isinstance(t.spec.fmt, IntFormat)
            if a.spec != t.spec and not traced:
                raise ValueError(f"traced_variant: layer {path!r} {name}: bit widths differ ({a.spec} vs {t.spec}) "
                                 f"but method {t.method!r} cannot trace them (use 'ste')")
            if traced:
                getattr(L, name).set_traced(bits=a.spec.fmt.bits,
                                            clip_ratio=clip_ratio if name == "weight_quant" else None)
            elif clip_ratio is not None and name == "weight_quant":
                getattr(L, name).set_traced(clip_ratio=clip_ratio)
    return view
