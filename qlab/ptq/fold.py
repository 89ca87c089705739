"""Folding AWQ input scales into the preceding op, so a model needs no runtime divide (GGUF export).

A layer with an input scale computes ``(x / s) @ Q(diag(s) W)``. When every layer reading ``x`` shares one
``s`` and ``x`` is the output of an op that is linear per channel, ``1/s`` can move into that op:

* a norm ``y = rms_normalize(z) * w`` (Gemma's RMSNorm; its stored weight already includes Gemma's ``+1``,
  so the fold is ``w / s``; a ``1 + w`` convention would need ``(1 + w) / s - 1``);
* a Linear's output columns (``v_proj`` before ``o_proj``: attention is linear in ``v``, so dividing the
  value head's channels divides the attention output's; ``up_proj`` before ``down_proj``: ``gelu(gate) *
  up`` is linear in ``up``). With grouped-query attention query head ``h`` reads value head
  ``h // repeat``: the ``repeat`` heads sharing a value head must have equal scales (``ScaleGroup.repeat``).

A :class:`ScaleGroup` names such a set of layers and the op before them; :func:`scale_groups` gives them for
a Gemma 3 model. ``qlab.ptq.awq(..., share_scales=True)`` searches one scale per group, folds the
Linear-into-Linear ones into the float weights at once (as the AWQ reference code does, before quantizing)
and leaves the norm ones as runtime input scales; :func:`fold_input_scales` then moves those into the norms.

Example:
    >>> from flax import nnx
    >>> from qlab.models.gemma3 import Gemma3, Gemma3Config
    >>> g = scale_groups(Gemma3(Gemma3Config.tiny(n_layers=1), rngs=nnx.Rngs(0)))
    >>> [(grp.layers[0], grp.into, grp.repeat) for grp in g]  # doctest: +NORMALIZE_WHITESPACE
    [('layers/0/attn/q_proj', 'layers/0/pre_attn_norm', 1), ('layers/0/attn/o_proj', 'layers/0/attn/v_proj', 2),
     ('layers/0/mlp/gate_proj', 'layers/0/pre_ffn_norm', 1), ('layers/0/mlp/down_proj', 'layers/0/mlp/up_proj', 1)]
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from flax import nnx

from qlab import nn as qnn
from qlab.models.gemma3.model import Gemma3, Gemma3Config

__all__ = ["ScaleGroup", "scale_groups", "gemma3_scale_groups", "tie_heads", "fold_input_scales", "module_at",
           "fold_target_kind", "divide_output"]


@dataclass(frozen=True)
class ScaleGroup:
    """Layers (paths) that read one input, and the path of the op producing it (``into``: a norm with a 1-D
    ``weight``, or a Linear whose output columns are the input). ``repeat`` > 1 (grouped-query attention):
    the input is ``into``'s output with each block of ``head_dim`` channels read by ``repeat`` consecutive
    heads, i.e. input channel ``(k * repeat + j) * head_dim + d`` is output channel ``k * head_dim + d``.
    What runs between ``into`` and the layers must commute with a positive per-channel scale (a product
    with another branch, attention over values, ReLU; not GELU alone, not a norm).

    Example:
        >>> ScaleGroup(("mlp/down_proj",), "mlp/up_proj").repeat
        1
    """

    layers: tuple[str, ...]
    into: str
    repeat: int = 1
    head_dim: int = 1

    def __post_init__(self):
        if not self.layers:
            raise ValueError("ScaleGroup.layers is empty: name the layers that read the same input")
        if self.repeat < 1 or self.head_dim < 1:
            raise ValueError(f"ScaleGroup {self.layers}: repeat={self.repeat} and head_dim={self.head_dim} must be >= 1")

    def to_input(self, s_into):
        """The input scale (one per input channel of ``layers``) of a scale per output channel of ``into``.

        Example:
            >>> import numpy as np
            >>> ScaleGroup(("o",), "v", repeat=2, head_dim=2).to_input(np.array([1., 2, 3, 4])).tolist()
            [1.0, 2.0, 1.0, 2.0, 3.0, 4.0, 3.0, 4.0]
        """
        s = jnp.asarray(s_into)
        if self.repeat == 1:
            return s
        v = s.reshape(-1, 1, self.head_dim)
        return jnp.broadcast_to(v, (v.shape[0], self.repeat, self.head_dim)).reshape(-1)

    def to_output(self, s_in):
        """The inverse of :meth:`to_input` (reads the first of each ``repeat`` heads; the scales must be tied).

        Example:
            >>> import numpy as np
            >>> ScaleGroup(("o",), "v", repeat=2, head_dim=2).to_output(np.array([1., 2, 1, 2, 3, 4, 3, 4])).tolist()
            [1.0, 2.0, 3.0, 4.0]
        """
        s = jnp.asarray(s_in)
        if self.repeat == 1:
            return s
        return s.reshape(-1, self.repeat, self.head_dim)[:, 0, :].reshape(-1)


def tie_heads(group: ScaleGroup, x_mean_abs):
    """Mean ``|x|`` per input channel, averaged over the ``repeat`` heads that share an ``into`` channel
    (and broadcast back), so that scales computed from it are consistent across those heads.

    Example:
        >>> import numpy as np
        >>> tie_heads(ScaleGroup(("o",), "v", repeat=2, head_dim=1), np.array([1., 3, 5, 7])).tolist()
        [2.0, 2.0, 6.0, 6.0]
    """
    x = jnp.asarray(x_mean_abs, jnp.float32)
    if group.repeat == 1:
        return x
    return group.to_input(jnp.mean(x.reshape(-1, group.repeat, group.head_dim), axis=1).reshape(-1))


def gemma3_scale_groups(cfg: Gemma3Config, prefix: str = "") -> tuple[ScaleGroup, ...]:
    """Gemma 3's groups, block by block: q/k/v after ``pre_attn_norm``; ``o_proj`` after ``v_proj``
    (GQA: ``n_heads / n_kv_heads`` query heads per value head); gate/up after ``pre_ffn_norm``;
    ``down_proj`` after ``up_proj``. (q/k outputs go through QK-norm and cannot take a scale.)

    Example:
        >>> len(gemma3_scale_groups(Gemma3Config.tiny()))
        24
    """
    out = []
    for i in range(cfg.n_layers):
        b = f"{prefix}layers/{i}/"
        out += [ScaleGroup((b + "attn/q_proj", b + "attn/k_proj", b + "attn/v_proj"), b + "pre_attn_norm"),
                ScaleGroup((b + "attn/o_proj",), b + "attn/v_proj", cfg.n_heads // cfg.n_kv_heads, cfg.head_dim),
                ScaleGroup((b + "mlp/gate_proj", b + "mlp/up_proj"), b + "pre_ffn_norm"),
                ScaleGroup((b + "mlp/down_proj",), b + "mlp/up_proj")]
    return tuple(out)


def scale_groups(model) -> tuple[ScaleGroup, ...]:
    """The :class:`ScaleGroup`s of a model qlab knows the structure of (Gemma 3); a ValueError otherwise,
    saying to pass the groups explicitly.

    Example:
        >>> from flax import nnx
        >>> scale_groups(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
        Traceback (most recent call last):
        ...
        ValueError: share_scales=True knows the layer groups of Gemma 3 models, not Linear: pass share_scales=[ScaleGroup(layers, into), ...]
    """
    if isinstance(model, Gemma3):
        return gemma3_scale_groups(model.config)
    raise ValueError(f"share_scales=True knows the layer groups of Gemma 3 models, not {type(model).__name__}: "
                     "pass share_scales=[ScaleGroup(layers, into), ...]")


def module_at(root, path: str):
    """The module at a ``/``-separated path (list indices as digits).

    Example:
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> type(module_at(MLP(4, hidden=(8,), rngs=nnx.Rngs(0)), "layers/0")).__name__
        'Linear'
    """
    m = root
    for k in path.split("/") if path else []:
        try:
            m = m[int(k)] if k.isdigit() else getattr(m, k)
        except (AttributeError, IndexError, TypeError):
            raise ValueError(f"no module at path {path!r} (at {k!r})") from None
    return m


def fold_target_kind(m) -> str:
    """``"quantized"`` (a weight-quantized layer), ``"linear"`` (a float Linear, wrapped or not) or
    ``"norm"`` (a module with a 1-D ``weight``): how a scale folds into ``m``; a ValueError otherwise.

    Example:
        >>> from flax import nnx
        >>> from qlab.models.gemma3.model import RMSNorm
        >>> fold_target_kind(RMSNorm(4)), fold_target_kind(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
        ('norm', 'linear')
    """
    if isinstance(m, qnn.QuantizedLayer):
        if m.kind != "linear":
            raise ValueError(f"{m.path}: a scale folds into a Linear's outputs, not a {m.kind} layer")
        return "quantized" if (m.weight_quant is not None or m.converted) else "linear"
    if isinstance(m, nnx.Linear):
        return "linear"
    w = getattr(m, "weight", None)
    if isinstance(w, nnx.Variable) and np.ndim(w[...]) == 1:
        return "norm"
    raise ValueError(f"{type(m).__name__}: a scale folds into a norm (1-D weight) or a Linear, not this module")


def _float_kernel(m):
    return m.weight if isinstance(m, qnn.QuantizedLayer) else m.kernel


def divide_output(m, s) -> None:
    """Divide a Linear's float kernel's output columns (or a norm's weight) by ``s``, in place (a layer
    already holding codes is an error).

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> lin = nnx.Linear(2, 2, use_bias=False, rngs=nnx.Rngs(0))
        >>> k = np.asarray(lin.kernel[...])
        >>> divide_output(lin, np.array([2.0, 4.0]))
        >>> bool(np.allclose(lin.kernel[...], k / [2.0, 4.0]))
        True
    """
    kind = fold_target_kind(m)
    if kind == "quantized" and m.converted:
        raise ValueError(f"{m.path}: holds quantized codes; a scale must be folded into its float weight before "
                         "quantizing")
    var = m.weight if kind == "norm" else _float_kernel(m)
    w = var[...]
    if w.shape[-1] != np.shape(s)[0]:
        raise ValueError(f"cannot fold a scale of {np.shape(s)[0]} channels into a weight of shape {w.shape}")
    var[...] = (w / jnp.asarray(s, w.dtype)).astype(w.dtype)
    bias = None if kind == "norm" else getattr(m.layer if isinstance(m, qnn.QuantizedLayer) else m, "bias", None)
    if bias is not None:
        bias[...] = (bias[...] / jnp.asarray(s, bias[...].dtype)).astype(bias[...].dtype)


def fold_input_scales(qmodel, groups=None):
    """A copy of ``qmodel`` whose layers' input scales (from ``qlab.ptq.awq(..., share_scales=True)``) are
    folded into the op before them (``groups``, default :func:`scale_groups`): outputs equal within float
    rounding, no runtime divide left, the quantized weights untouched (so they export bit for bit).

    Errors (ValueError, naming the layers): an input scale on a layer in no group, or a group whose layers
    do not share one scale (AWQ run without ``share_scales=True``), or whose op before is quantized.

    Example:
        >>> import numpy as np, qlab
        >>> from flax import nnx
        >>> from qlab import ptq
        >>> from qlab.models.gemma3 import Gemma3, Gemma3Config
        >>> from qlab.nn import Rule, set_input_scale
        >>> m = Gemma3(Gemma3Config.tiny(n_layers=1), rngs=nnx.Rngs(0))
        >>> qm = ptq.rtn(m, [Rule(".*mlp/(gate|up)_proj", weight="q4_0")])  # as awq(..., share_scales=True) leaves it:
        >>> for p in ("layers/0/mlp/gate_proj", "layers/0/mlp/up_proj"):   # one scale on the layers after a norm
        ...     set_input_scale(qm, p, np.linspace(0.5, 2.0, 32))
        >>> fm = fold_input_scales(qm)
        >>> ids = np.arange(8)[None]
        >>> any(L.input_scale is not None for L in qlab.nn.quantized_layers(fm).values())
        False
        >>> bool(np.allclose(fm(ids), qm(ids), atol=1e-4))
        True
    """
    groups = scale_groups(qmodel) if groups is None else tuple(groups)
    fm = qnn.copy_model(qmodel)
    layers = qnn.quantized_layers(fm)
    scaled = {p for p, L in layers.items() if L.input_scale is not None}
    done = set()
    for g in groups:
        have = [p for p in g.layers if p in scaled]
        if not have:
            continue
        ss = [np.asarray(layers[p].input_scale[...]) for p in g.layers if p in layers and p in scaled]
        if len(have) != len(g.layers) or any(not np.array_equal(ss[0], s) for s in ss[1:]):
            raise ValueError(f"{have[0]}: has an input scale (AWQ) that is not folded into the preceding weights and "
                             f"cannot be: the layers reading its input {list(g.layers)} do not share one scale. "
                             "Quantize with qlab.ptq.awq(..., share_scales=True), or export with export_safetensors")
        target = module_at(fm, g.into)
        if fold_target_kind(target) == "quantized":
            raise ValueError(f"{g.into}: is quantized, so the input scale of {list(g.layers)} cannot fold into it "
                             "exactly; qlab.ptq.awq(..., share_scales=True) folds such scales before quantizing")
        divide_output(target, g.to_output(ss[0]))
        for p in g.layers:
            layers[p].input_scale = None
        done.update(g.layers)
    left = sorted(scaled - done)
    if left:
        raise ValueError(f"{left[0]}: has an input scale (AWQ / SmoothQuant) that is not folded into the preceding "
                         f"weights and belongs to no scale group ({len(left)} such layers); quantize with "
                         "qlab.ptq.awq(..., share_scales=True) or export with export_safetensors")
    return fm
