"""The layer wrapper: :class:`QuantizedLayer`, a quantization-aware stand-in for one Flax layer.

:func:`qlab.nn.quantize_model` puts one at the path of every ``nnx.Linear``, ``nnx.Conv``,
``nnx.Einsum`` and ``nnx.Embed`` that a quantizing rule matches (:data:`LAYER_KINDS`). The wrapper
holds the original layer (``.layer``, with its Params), a
:class:`~qlab.nn.quantizers.WeightQuantizer` and/or :class:`~qlab.nn.quantizers.ActQuantizer`, and
optional PTQ hooks (``input_scale``, real codes after :func:`~qlab.nn.convert`). Its forward
fake-quantizes the input and the weight, then runs the ORIGINAL layer's own ``__call__`` (or
``attend``) with the fake-quantized weight swapped in for the duration of the call, so every
option of the Flax layer (padding, strides, dtype promotion, bias) behaves exactly as in float.

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qlab.nn.rules import Rule
    >>> lin = nnx.Linear(8, 4, rngs=nnx.Rngs(0))
    >>> q = QuantizedLayer(lin, layer_kind(lin), "", Rule(".*", weight="int4/ch"))
    >>> q.weight_quant.spec, q(jnp.ones((2, 8))).shape
    (QuantSpec('int4/ch1'), (2, 4))
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlab.numerics.granularity import PerChannel, PerGroup
from qlab.numerics.matmul import int_matmul_supported, quantized_matmul, quantized_matmul_codes
from qlab.numerics.packing import PackedQTensor, check_packable, from_packed, to_packed
from qlab.numerics.quantize import QTensor, dequantize, dequantize_rows
from qlab.nn.axes import weight_axes
from qlab.nn.call_sites import ORIGINAL_OPS
from qlab.nn.quantizers import ActQuantizer, QuantStat, WeightQuantizer, traced_overrides
from qlab.nn.rules import Rule

__all__ = ["QuantizedLayer", "SiteWeight", "LAYER_KINDS", "WEIGHT_NAMES", "layer_kind"]

#: the Flax layers qlab wraps, and their kind names
LAYER_KINDS = {nnx.Linear: "linear", nnx.Conv: "conv", nnx.Einsum: "einsum", nnx.Embed: "embed"}
#: the weight attribute of each kind
WEIGHT_NAMES = {"linear": "kernel", "conv": "kernel", "einsum": "kernel", "embed": "embedding"}


def layer_kind(module) -> str | None:
    """The kind of a Flax layer qlab can wrap (``"linear"``, ``"conv"``, ``"einsum"``, ``"embed"``;
    subclasses count), else None.

    Example:
        >>> from flax import nnx
        >>> layer_kind(nnx.Conv(2, 4, (3, 3), rngs=nnx.Rngs(0))), layer_kind(nnx.relu)
        ('conv', None)
    """
    for cls, k in LAYER_KINDS.items():
        if type(module) is cls or isinstance(module, cls):
            return k
    return None


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


class SiteWeight(nnx.Module):
    """A weight that a user module passes to ``jnp.einsum`` / ``dot`` / ``matmul`` / ``lax.dot_general`` itself
    (a call site, :mod:`qlab.nn.call_sites`), seen as an ``nnx.Einsum``-like layer so a
    :class:`QuantizedLayer` can hold it: ``kernel`` IS the module's own ``nnx.Param`` (shared, not copied)
    and ``einsum_str`` an equation whose second operand has the weight's channel and contraction axes.

    Example:
        >>> import jax.numpy as jnp
        >>> w = nnx.Param(jnp.ones((8, 4)))
        >>> sw = SiteWeight(w, "bd,dh->bh")
        >>> sw.kernel is w, weight_axes("einsum", sw, (8, 4))
        (True, (1, 0))
    """

    def __init__(self, kernel: nnx.Param, einsum_str: str):
        self.kernel = kernel
        self.einsum_str = einsum_str


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
            (:func:`~qlab.nn.convert`, :func:`~qlab.nn.load_quantized_weights`), held packed
            (:class:`~qlab.numerics.packing.PackedQTensor`: uint8 code bytes, scales in their stored
            dtype) and unpacked inside the forward; None before.
    """

    def __init__(self, layer, kind: str, path: str, rule: Rule):
        self.layer = layer
        self.kind = kind
        self.path = path
        self.rule = rule
        self.weight_name = WEIGHT_NAMES[kind]
        w = getattr(layer, self.weight_name)[...]
        self.channel_axis, self.contract_axis = weight_axes(kind, layer, w.shape)
        if rule.weight is not None:
            try:
                rule.weight.resolve(self.channel_axis, self.contract_axis).granularity.view(tuple(w.shape))
            except ValueError as e:
                raise ValueError(f"layer {path!r} ({kind}, weight {tuple(w.shape)}) with {rule!r}: {e}") from None
            self.weight_quant = WeightQuantizer(
                rule.weight.resolve(self.channel_axis, self.contract_axis),
                method=rule.weight_quantizer,
                weight=w,
                grad_scale=rule.lsq_grad_scale,
            )
        else:
            self.weight_quant = nnx.data(None)
        if rule.act is not None:
            self.act_quant = ActQuantizer(
                rule.act, method=rule.act_quantizer, range=rule.act_range, ema_decay=rule.ema_decay,
                grad_scale=rule.lsq_grad_scale,
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
        self.call_site = None  # the op ("einsum", "dot", ...) when this is a call site's weight (SiteWeight)

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

    def packed(self) -> PackedQTensor | None:
        """The weight as held in memory (converted layers): packed codes, scales in their stored dtype."""
        if self.q_meta is None:
            return None
        spec, shape, dtype = self.q_meta
        return PackedQTensor(
            self.q_codes[...],
            self.q_scale[...],
            None if self.q_zero is None else self.q_zero[...],
            None if self.q_tscale is None else self.q_tscale[...],
            spec,
            tuple(shape),
            np.dtype(dtype),
        )

    def qtensor(self) -> QTensor | None:
        """The stored QTensor (converted layers), unpacked from :meth:`packed`; else None."""
        p = self.packed()
        return None if p is None else from_packed(p)

    def set_qtensor(self, q: QTensor, *, keep_float: bool = True):
        """Use ``dequantize(q)`` as this layer's weight from now on. The codes are kept packed
        (``qlab.numerics.packing.to_packed``: two 4-bit codes a byte, scales in their stored dtype);
        a ``q`` that packing would change (a scale its ``scale_dtype`` cannot hold) is an error."""
        shape = tuple(self.q_meta[1]) if (self.q_meta is not None and self.weight[...].size == 0) else tuple(self.weight[...].shape)
        if tuple(q.shape) != shape:
            raise ValueError(f"{self.path}: QTensor shape {q.shape} != weight shape {shape}")
        if not isinstance(q.scale, jax.core.Tracer):
            check_packable(q, f"layer {self.path!r}")
        p = to_packed(q)
        self.q_codes = QuantStat(p.codes)
        self.q_scale = QuantStat(p.scale)
        self.q_zero = None if p.zero_point is None else QuantStat(p.zero_point)
        self.q_tscale = None if p.tensor_scale is None else QuantStat(p.tensor_scale)
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

    def indivisible_blocks(self) -> dict[tuple, dict[int, int]]:
        """``{("layer", weight name): {axis: group size}}`` for a per-group weight spec: a sharded layout must
        keep each quantization group on one device (see :func:`qlab.distributed.check_blocks`); else ``{}``.
        """
        g = None if self.weight_quant is None else self.weight_quant.spec.granularity
        if not isinstance(g, PerGroup) or self.q_meta is not None:
            return {}
        nd = len(self.weight[...].shape)
        return {("layer", self.weight_name): {g.axis % nd: g.size}}

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
                and aq.method == "ste" and aq.range == "dynamic" and not traced_overrides(aq)
                and int_matmul_supported(aq.spec, 0)
                and getattr(lin, "dot_general", None) in (None, ORIGINAL_OPS["dot_general"])  # jax.lax's, maybe patched now
                and getattr(lin, "dtype", None) in (None, jnp.float32) and lin.precision is None):
            return None
        if self.q_meta is not None:
            q = self.qtensor()
            ok = self.contract_axis == 0 and q.zero_point is None and int_matmul_supported(q.spec, 1)
            return (aq.spec, q) if ok else None
        if (wq is not None and wq.method == "ste" and not traced_overrides(wq) and self.contract_axis == 0
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
        """Embedding rows of ``ids``: the codes (or fake-quantized rows) are gathered first and only those
        rows are dequantized when scales do not span rows (per row ``ch``, groups along the row); an
        ``input_scale`` (AWQ / SmoothQuant of the tied head, which stored ``W * s``) is divided out."""
        if args or kwargs:
            if self.input_scale is not None:
                raise ValueError(f"{self.path}: an embedding with an input_scale takes no extra lookup arguments")
            return self._run("__call__", ids, *args, **kwargs)
        if not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
            raise ValueError(f"{self.path}: embedding ids must be integers, got {jnp.asarray(ids).dtype}")
        wq = self.weight_quant
        g = None if wq is None else wq.spec.granularity
        if self.capture_float or (self.q_meta is None and wq is None):
            rows = jnp.take(self.weight[...], ids, axis=0)
        elif self.q_meta is not None:
            rows = dequantize_rows(self.qtensor(), ids)
        elif wq.method == "ste" and (isinstance(g, PerChannel) and g.axis == 0 or isinstance(g, PerGroup) and g.axis == 1):
            # per-row scales: quantizing only the gathered rows is bit-identical and much cheaper
            table = self.weight[...]
            rows = wq(jnp.take(table, ids, axis=0).reshape(-1, table.shape[1])).reshape(jnp.shape(ids) + table.shape[1:])
        else:  # scales span rows (per tensor, LSQ steps ...): the whole table
            rows = jnp.take(self.weight_value(), ids, axis=0)
        if self.input_scale is not None:
            rows = rows / self.input_scale[...].astype(rows.dtype)
        (rows,) = self.layer.promote_dtype((rows,), dtype=self.layer.dtype, inexact=False)
        return rows

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
