"""Quantizer modules (Flax NNX) and their Variable types.

* :class:`QuantParam` (an ``nnx.Param`` subclass): learnable quantizer parameters (LSQ steps,
  PACT clips). Default optimizers (``wrt=nnx.Param``) train them; filter them with
  ``nnx.state(model, QuantParam)``.
* :class:`QuantStat` (an ``nnx.Variable``): statistics (EMA ranges, first-batch initial values,
  calibration sums). Updated by forward passes in training mode, never differentiated.
* :class:`QuantOverride` (a ``QuantStat``): a quantizer's integer bit width / clip ratio held as
  traced state (``set_traced``), so that models differing only in those values share one graph
  and train together under ``jax.vmap`` (``qlab.nn.traced_variant``, batched sweeps).

:class:`WeightQuantizer` fake-quantizes a layer weight (``"ste"``: ``qlab.fake_quant``; ``"lsq"``:
a learned step per scale group). :class:`ActQuantizer` fake-quantizes a layer's input viewed as
``[rows, in_features]`` (``"ste"`` with a dynamic or EMA range, ``"lsq"``, ``"pact"``).

Learned activation quantizers are parameterised relative to a data-dependent initial value
captured on the first training batch: the effective LSQ step is ``step * step_init`` and the
PACT clip is ``alpha * alpha_init`` (both ``QuantParam``s start at 1.0). This keeps the
parameters trainable from the first step without writing Params inside a differentiated
forward pass; ``effective_step()`` / ``effective_alpha()`` return the values in data units.

Example:
    >>> import jax.numpy as jnp
    >>> wq = WeightQuantizer("int4/ch", method="lsq", weight=jnp.ones((8, 4)), channel_axis=1, contract_axis=0)
    >>> wq.step.shape
    (1, 4)
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from qlab.numerics.formats import IntFormat
from qlab.numerics.granularity import from_view, to_view
from qlab.numerics.learned import lsq_fake_quant, pact_fake_quant, round_ste, scale_grad
from qlab.numerics.qtensor import QTensor
from qlab.numerics.quantize import TracedIntFormat, check_overrides, fake_quant, fake_quant_range, quantize
from qlab.numerics.spec import QuantSpec, as_spec

__all__ = ["QuantParam", "QuantStat", "QuantOverride", "WeightQuantizer", "ActQuantizer", "traced_overrides"]


class QuantParam(nnx.Param):
    """A learnable quantizer parameter (LSQ step, PACT alpha). Trained by ``wrt=nnx.Param``."""


class QuantStat(nnx.Variable):
    """Quantizer / calibration statistics (EMA ranges, counters). Never differentiated."""


class QuantOverride(QuantStat):
    """A traced quantizer setting: ``traced_bits`` (int32) or ``clip_ratio`` (float32), read by the
    forward pass in place of the spec's static bit width / full range (see ``set_traced``)."""


def _set_traced(q, spec: QuantSpec, what: str, bits, clip_ratio):
    """Validate and store ``bits`` / ``clip_ratio`` overrides on quantizer ``q``."""
    lsq_bits = q.method == "lsq" and isinstance(q, WeightQuantizer) and clip_ratio is None
    if q.method != "ste" and not lsq_bits:
        raise ValueError(f"{what}: traced bits / clip ratio need method 'ste' (LSQ weights: bits only), "
                         f"got method {q.method!r}")
    ov = check_overrides(spec, bits, clip_ratio, f"{what}.set_traced")
    if bits is not None:
        q.traced_bits = QuantOverride(ov[0])
    if lsq_bits and bits is not None:
        if isinstance(bits, jax.core.Tracer):
            raise ValueError(f"{what}.set_traced: LSQ needs a concrete bits (its gradient scale is computed from it)")
        qmax = TracedIntFormat(spec.fmt, int(bits)).qmax
        # the same Python float the static path computes, held per variant
        q.lsq_grad_scale = QuantOverride(jnp.float32(q._lsq_grad_scale(qmax)))
    if clip_ratio is not None:
        q.clip_ratio = QuantOverride(ov[1])


def traced_overrides(q) -> dict:
    """The ``bits`` / ``clip_ratio`` keyword overrides quantizer ``q`` holds (values, maybe traced;
    see ``set_traced``), as keyword arguments for :func:`qlab.fake_quant`; ``{}`` when none.

    Example:
        >>> wq = WeightQuantizer("int8/ch", channel_axis=1, contract_axis=0)
        >>> traced_overrides(wq)
        {}
        >>> wq.set_traced(bits=3)
        >>> {k: int(v) for k, v in traced_overrides(wq).items()}
        {'bits': 3}
    """
    out = {}
    b, c = getattr(q, "traced_bits", None), getattr(q, "clip_ratio", None)
    if b is not None:
        out["bits"] = b[...]
    if c is not None:
        out["clip_ratio"] = c[...]
    return out


def _int_fmt(spec: QuantSpec, what: str) -> IntFormat:
    if not isinstance(spec.fmt, IntFormat):
        raise ValueError(f"{what} needs an integer format (int2..int8, uint..), got {spec.fmt.name}")
    if not spec.symmetric:
        raise ValueError(f"{what} supports symmetric specs only, got {spec}")
    return spec.fmt


def _lsq_codes(xv, s, fmt: IntFormat):
    """LSQ forward on a grouped view: (rounded clipped codes with STE, value)."""
    v = jnp.clip(xv / s, fmt.qmin, fmt.qmax)
    r = round_ste(v)
    return r, r * s


class WeightQuantizer(nnx.Module):
    """Fake-quantizes a layer weight under a resolved spec.

    Args:
        spec: the weight spec, already resolved for the layer (``spec.resolve(channel, contract)``).
        method: ``"ste"`` or ``"lsq"``.
        weight: the initial weight (LSQ initialises its steps from it: ``2 mean|w| / sqrt(Qp)``
            per scale group).
        grad_scale: LSQ only: scale the steps' gradient by ``g = 1/sqrt(N * Qp)`` (the paper's choice);
            False: ``g = 1`` (the paper's "no gradient scale" ablation).

    Example:
        >>> import jax.numpy as jnp
        >>> WeightQuantizer("int4/ch", method="lsq", weight=jnp.ones((8, 4)), channel_axis=1,
        ...                 contract_axis=0, grad_scale=False)._lsq_grad_scale(7)
        1.0
    """

    def __init__(self, spec, *, method: str = "ste", weight=None, channel_axis=None, contract_axis=None,
                 grad_scale: bool = True):
        spec = as_spec(spec)
        if channel_axis is not None:
            spec = spec.resolve(channel_axis, contract_axis)
        self.spec = spec
        self.method = method
        self.grad_scale = bool(grad_scale)
        if method == "lsq":
            fmt = _int_fmt(spec, "LSQ weight quantizer")
            wv, axes = to_view(jnp.asarray(weight, jnp.float32), spec.granularity)
            m = jnp.mean(jnp.abs(wv), axis=axes, keepdims=True)
            self.step = QuantParam(jnp.maximum(2 * m / math.sqrt(max(fmt.qmax, 1)), 1e-8))
            self.group_size = int(math.prod(wv.shape[a] for a in axes))
        elif method == "ste":
            self.step = nnx.data(None)
            self.group_size = 0
        else:
            raise ValueError(f"weight quantizer: unknown method {method!r} (ste, lsq)")

    def set_traced(self, *, bits=None, clip_ratio=None):
        """Hold the integer bit width and/or a clip ratio (multiplying the range) as traced
        :class:`QuantOverride` state, used by the forward pass instead of ``spec``'s bit width /
        full range. ``spec`` stays as it is (it names the format family: signedness, narrow
        range, granularity); method ``"ste"``, integer formats only for ``bits``.

        Example:
            >>> import jax.numpy as jnp
            >>> wq = WeightQuantizer("int8/ch", channel_axis=1, contract_axis=0)
            >>> wq.set_traced(bits=2)
            >>> sorted(set(wq(jnp.linspace(-1, 1, 16).reshape(8, 2)).ravel().tolist()))   # int2: absmax * {-1, 0, 1}
            [-1.0, 0.0, 1.0]
        """
        _set_traced(self, self.spec, "WeightQuantizer", bits, clip_ratio)

    def _lsq_grad_scale(self, qmax) -> float:
        """LSQ's gradient scale ``1/sqrt(N * Qp)``, N = ``group_size`` weights per step (1.0 without
        ``grad_scale``)."""
        if not self.grad_scale:
            return 1.0
        return 1.0 / math.sqrt(self.group_size * max(float(qmax), 1))

    def __call__(self, w):
        if self.method == "ste":
            return fake_quant(w, self.spec, **traced_overrides(self))
        fmt = self.spec.fmt
        wv, _ = to_view(w.astype(jnp.float32), self.spec.granularity)
        if getattr(self, "traced_bits", None) is not None:  # LSQ with a traced bit width (set_traced)
            fmt, g = TracedIntFormat(fmt, self.traced_bits[...]), self.lsq_grad_scale[...]
        else:
            g = self._lsq_grad_scale(fmt.qmax)
        y = lsq_fake_quant(wv, self.step[...], fmt, grad_scale=g)
        return from_view(y, self.spec.granularity, w.shape).astype(w.dtype)

    def quantize(self, w) -> QTensor:
        """Real codes + scales whose dequantization equals ``self(w)`` exactly."""
        if self.method == "ste":
            return quantize(w, self.spec)
        wv, _ = to_view(w.astype(jnp.float32), self.spec.granularity)
        s = jnp.abs(self.step[...]) + 1e-12
        r, _ = _lsq_codes(wv, s, self.spec.fmt)
        codes = from_view(self.spec.fmt.encode(r), self.spec.granularity, w.shape)
        spec = self.spec.replace(scale_dtype="f32")  # learned steps are stored in f32
        return QTensor(codes, s.astype(jnp.float32), None, None, spec, tuple(w.shape), w.dtype)


class ActQuantizer(nnx.Module):
    """Fake-quantizes activations viewed as ``[rows, features]``.

    Methods: ``"ste"`` + ``range="dynamic"`` (qlab.fake_quant on each batch), ``"ste"`` +
    ``range="ema"`` (static per-tensor range, EMA in ``QuantStat``s), ``"lsq"``, ``"pact"``.
    ``use_running_average`` (set by ``model.eval()`` / ``model.train()``) freezes statistics.
    ``grad_scale``: LSQ only: the step's gradient scale ``1/sqrt(N * Qp)`` (False: 1, LSQ's ablation).
    """

    def __init__(self, spec, *, method: str = "ste", range: str = "dynamic", ema_decay: float = 0.99,
                 grad_scale: bool = True):
        spec = as_spec(spec).resolve(0, 1)
        self.spec = spec
        self.method = method
        self.grad_scale = bool(grad_scale)
        self.range = range
        self.ema_decay = float(ema_decay)
        self.use_running_average = False
        self.count = nnx.data(None)
        if method == "ste" and range == "dynamic":
            return
        self.count = QuantStat(jnp.zeros((), jnp.int32))
        if method == "ste":  # ema
            self.lo = QuantStat(jnp.zeros((), jnp.float32))
            self.hi = QuantStat(jnp.zeros((), jnp.float32))
        elif method == "lsq":
            _int_fmt(spec, "LSQ activation quantizer")
            self.step = QuantParam(jnp.ones((), jnp.float32))
            self.step_init = QuantStat(jnp.ones((), jnp.float32))
        elif method == "pact":
            _int_fmt(spec, "PACT activation quantizer")
            self.alpha = QuantParam(jnp.ones((), jnp.float32))
            self.alpha_init = QuantStat(jnp.ones((), jnp.float32))
        else:
            raise ValueError(f"activation quantizer: unknown method {method!r} (ste, lsq, pact)")

    def set_traced(self, *, bits=None, clip_ratio=None):
        """Traced bit width / clip ratio, as :meth:`WeightQuantizer.set_traced` (method ``"ste"``,
        dynamic or EMA range)."""
        _set_traced(self, self.spec, "ActQuantizer", bits, clip_ratio)

    def effective_step(self):
        """LSQ step in data units (``step * step_init``)."""
        return jnp.abs(self.step[...]) * self.step_init[...]

    def effective_alpha(self):
        """PACT clip in data units (``alpha * alpha_init``)."""
        return jnp.abs(self.alpha[...]) * self.alpha_init[...]

    def _first(self, value_fn, var):
        """On the first training call, store ``value_fn()`` into ``var``; return the value to use."""
        seen = self.count[...] > 0
        if self.use_running_average:
            return jnp.where(seen, var[...], value_fn())
        v = jnp.where(seen, var[...], jax.lax.stop_gradient(value_fn()))
        var[...] = v
        return v

    def __call__(self, x2):
        spec = self.spec
        if self.method == "ste" and self.range == "dynamic":
            return fake_quant(x2, spec, **traced_overrides(self))
        xs = jax.lax.stop_gradient(x2.astype(jnp.float32))
        train = not self.use_running_average
        if self.method == "ste":
            if spec.symmetric:
                a = jnp.max(jnp.abs(xs))
                blo, bhi = -a, a
            else:
                blo, bhi = jnp.minimum(jnp.min(xs), 0.0), jnp.maximum(jnp.max(xs), 0.0)
            seen = self.count[...] > 0
            d = self.ema_decay
            if train:
                lo = jnp.where(seen, d * self.lo[...] + (1 - d) * blo, blo)
                hi = jnp.where(seen, d * self.hi[...] + (1 - d) * bhi, bhi)
                self.lo[...] = lo
                self.hi[...] = hi
            else:
                lo = jnp.where(seen, self.lo[...], blo)
                hi = jnp.where(seen, self.hi[...], bhi)
            y = fake_quant_range(x2, spec, lo, hi, **traced_overrides(self))
        elif self.method == "lsq":
            fmt = spec.fmt
            qp = max(fmt.qmax, 1)
            s0 = self._first(lambda: jnp.maximum(2 * jnp.mean(jnp.abs(xs)) / math.sqrt(qp), 1e-8), self.step_init)
            g = 1.0 / math.sqrt(max(1, x2.size) * qp) if self.grad_scale else 1.0
            s = scale_grad(jnp.abs(self.step[...]) + 1e-12, g) * s0
            _, y = _lsq_codes(x2.astype(jnp.float32), s, fmt)
            y = y.astype(x2.dtype)
        else:  # pact
            a0 = self._first(lambda: jnp.maximum(jnp.max(jnp.abs(xs)), 1e-6), self.alpha_init)
            y = pact_fake_quant(x2, jnp.abs(self.alpha[...]) * a0, spec.fmt)
        if train:
            self.count[...] = self.count[...] + 1
        return y
