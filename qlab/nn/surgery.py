"""Model surgery: find, copy and replace layers of an NNX model, and models derived from a quantized one.

* finding: :func:`quantizable_layers` (weight layers of a float model, in call order when traced on
  an example batch), :func:`walk_layers` / :func:`quantized_layers` / :func:`float_layers` /
  :func:`find_layer` (the layers of a quantized model), :func:`path_str` (layer path names);
* copying and replacing: :func:`copy_model` (no shared buffers), :func:`set_submodule`;
* derived models: :func:`effective_model` (a float model holding a quantized model's effective
  weights) and :func:`traced_variant` (a quantized model whose bit widths are traced state).

Graph order is Flax's (``nnx.iter_modules``: attribute names sorted, children before parents), which
is not the order a forward pass calls the layers in: ``MLP`` lists ``head`` before ``layers/0``.

Example:
    >>> import numpy as np
    >>> from flax import nnx
    >>> from qlab.models import MLP
    >>> m = MLP(4, hidden=(8,), rngs=nnx.Rngs(0))
    >>> [p for p, _ in quantizable_layers(m)], [p for p, _ in quantizable_layers(m, np.zeros((1, 4)))]
    (['head', 'layers/0'], ['layers/0', 'head'])
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from qlab.numerics.formats import IntFormat
from qlab.numerics.spec import bit_width_family
from qlab.nn.layer import LAYER_KINDS, WEIGHT_NAMES, QuantizedLayer, layer_kind

__all__ = [
    "MATMUL_KINDS",
    "ModelLayers",
    "path_str",
    "walk_layers",
    "quantized_layers",
    "float_layers",
    "find_layer",
    "quantizable_layers",
    "copy_model",
    "set_submodule",
    "effective_model",
    "traced_variant",
]

#: the layer kinds :func:`quantizable_layers` lists by default: weight layers that multiply their
#: input (embedding lookups are left out: ``@first`` is the first matmul, not the token table)
MATMUL_KINDS = ("linear", "conv", "einsum")


def path_str(path) -> str:
    """A module path (tuple of attribute names / list indices) as a layer path string.

    Example:
        >>> path_str(("blocks", 1, "attn", "query")), path_str(())
        ('blocks/1/attn/query', '')
    """
    return "/".join(str(k) for k in path)


@dataclasses.dataclass(frozen=True)
class ModelLayers:
    """The layers of a (quantized) model by kind, each ``{path: module}`` in graph order.

    Attributes:
        quantized: the :class:`~qlab.nn.QuantizedLayer` wrappers (not entered: their inner layer is
            not listed again).
        floating: Linear/Conv/Einsum/Embed layers left in float.
        user: the other modules that are not Flax's own (user code that may hold call sites).
    """

    quantized: dict
    floating: dict
    user: dict


def walk_layers(model) -> ModelLayers:
    """Sort ``model``'s modules into quantized layers, float layers and user modules.

    Example:
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> from qlab.nn import Rule, quantize_model
        >>> w = walk_layers(quantize_model(MLP(4, hidden=(8,), rngs=nnx.Rngs(0)), [Rule("head", weight="int8")]))
        >>> list(w.quantized), list(w.floating), list(w.user)
        (['head'], ['layers/0'], [''])
    """
    wrappers, floats, users = {}, {}, {}
    inside = []
    for p, m in sorted(nnx.iter_modules(model), key=lambda t: tuple(map(str, t[0]))):
        if any(p[: len(w)] == w and len(p) > len(w) for w in inside):
            continue
        s = path_str(p)
        if isinstance(m, QuantizedLayer):
            if m.call_site is not None:  # a call site's weight, kept in <module>/qlab_sites/<op>_<k>
                s = path_str(p[:-2] + p[-1:])
            wrappers[s] = m
            inside.append(p)
        elif layer_kind(m) is not None:
            floats[s] = m
        elif not type(m).__module__.startswith("flax"):
            users[s] = m
    return ModelLayers(wrappers, floats, users)


def quantized_layers(qmodel) -> dict[str, QuantizedLayer]:
    """``{path: QuantizedLayer}`` of a quantized model.

    Example:
        >>> from flax import nnx
        >>> from qlab.nn import Rule, quantize_model
        >>> list(quantized_layers(quantize_model(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), [Rule(".*", weight="int8")])))
        ['']
    """
    return walk_layers(qmodel).quantized


def float_layers(qmodel) -> dict[str, nnx.Module]:
    """``{path: layer}``: Linear/Conv/Einsum/Embed layers left in float.

    Example:
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> list(float_layers(MLP(4, hidden=(8,), rngs=nnx.Rngs(0))))
        ['head', 'layers/0']
    """
    return walk_layers(qmodel).floating


def find_layer(qmodel, path: str) -> QuantizedLayer:
    """The QuantizedLayer at ``path`` (ValueError listing the known paths otherwise).

    Example:
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> from qlab.nn import Rule, quantize_model
        >>> qm = quantize_model(MLP(4, hidden=(8,), rngs=nnx.Rngs(0)), [Rule("head", weight="int8")])
        >>> find_layer(qm, "head").kind
        'linear'
    """
    wr = quantized_layers(qmodel)
    if path not in wr:
        raise ValueError(f"no quantized layer at {path!r}; quantized layers: {list(wr)}")
    return wr[path]


def quantizable_layers(model: nnx.Module, example=None, *, kinds=MATMUL_KINDS) -> list[tuple[str, nnx.Module]]:
    """``[(path, layer)]`` of a float model's layers of ``kinds`` (default :data:`MATMUL_KINDS`:
    ``nnx.Linear``, ``nnx.Conv``, ``nnx.Einsum``), in call order when ``example`` (an input batch)
    is given, else in graph order.

    Call order is recorded by tracing ``model(example)`` with ``jax.eval_shape`` (nothing is
    computed) while the layer classes' ``__call__`` note which instance ran; each layer ranks by its
    first call, and layers the forward never calls come last, in graph order.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> [p for p, _ in quantizable_layers(MLP(4, hidden=(8, 8), rngs=nnx.Rngs(0)), np.zeros((1, 4)))]
        ['layers/0', 'layers/1', 'head']
    """
    unknown = set(kinds) - set(LAYER_KINDS.values())
    if unknown:
        raise ValueError(f"quantizable_layers: unknown kinds {sorted(unknown)}; known: {list(LAYER_KINDS.values())}")
    layers = [(path_str(p), m) for p, m in nnx.iter_modules(model) if layer_kind(m) in kinds]
    if example is None:
        return layers
    order: list[int] = []
    originals = {cls: cls.__call__ for cls, k in LAYER_KINDS.items() if k in kinds}

    def recording(f):
        def call(self, *a, **k):
            order.append(id(self))
            return f(self, *a, **k)

        return call

    try:
        for cls, f in originals.items():
            cls.__call__ = recording(f)
        jax.eval_shape(lambda x: model(x), jnp.asarray(example))
    finally:
        for cls, f in originals.items():
            cls.__call__ = f
    rank = {}
    for i, ident in enumerate(order):
        rank.setdefault(ident, i)
    return sorted(layers, key=lambda pm: rank.get(id(pm[1]), len(order)))


def copy_model(model: nnx.Module) -> nnx.Module:
    """A deep copy sharing no buffers with ``model`` (safe when training donates the copy's arrays).

    Example:
        >>> from flax import nnx
        >>> m = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
        >>> c = copy_model(m)
        >>> c.kernel[...] = c.kernel[...] * 0
        >>> float(abs(m.kernel[...]).sum()) > 0
        True
    """
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda a: jnp.array(a, copy=True) if isinstance(a, jax.Array) else a, state)
    return nnx.merge(graphdef, state)


def set_submodule(root, path: tuple, new) -> None:
    """Put ``new`` at module path ``path`` (a non-empty tuple of attribute names / list or dict keys)
    of ``root``, in place.

    Example:
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> m = MLP(4, hidden=(8,), rngs=nnx.Rngs(0))
        >>> set_submodule(m, ("layers", 0), nnx.Linear(4, 8, use_bias=False, rngs=nnx.Rngs(1)))
        >>> m.layers[0].bias is None
        True
    """
    parent = root
    for k in path[:-1]:
        parent = parent[k] if isinstance(parent, (nnx.List, nnx.Dict, list, dict)) else getattr(parent, k)
    k = path[-1]
    if isinstance(parent, (nnx.List, nnx.Dict, list, dict)):
        parent[k] = new
    else:
        setattr(parent, k, new)


def _under(path: str, layer_paths) -> bool:
    return any(lp == "" or path == lp or path.startswith(lp + "/") for lp in layer_paths)


def effective_model(qmodel: nnx.Module, template: nnx.Module) -> nnx.Module | None:
    """A float model with ``template``'s structure holding ``qmodel``'s effective weights, or None
    when the quantized forward is not a float forward with other weights.

    Each Linear/Conv/Einsum/Embed layer of ``template`` gets the weight the quantized layer at its
    path uses (fake-quantized or dequantized codes; a PTQ ``input_scale`` folded into a Linear
    kernel), or the float layer's own weight, and the layer's bias; every other variable (norms,
    position tables...) is taken from ``qmodel`` at the same path. Models of one structure share one
    compiled evaluation, whatever their specs, so evaluating many specs this way is cheap.

    None when some layer quantizes its input, splits outliers, folds an ``input_scale`` into a
    non-Linear weight or is a call site's Param weight, or when a template layer has no counterpart in
    ``qmodel``. Call sites
    (``jnp.einsum`` ... written in user modules, :mod:`qlab.nn.call_sites`) are not layers: the
    effective model computes them in float, so it equals ``qmodel`` only where they are kept float
    (a float rule such as ``Rule(".*/einsum_.*")`` before the others; ``layer_report`` lists the
    call sites a forward pass quantized).

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> from qlab.nn import Rule, quantize_model
        >>> m = MLP(4, hidden=(8,), rngs=nnx.Rngs(0))
        >>> e = effective_model(quantize_model(m, [Rule("head", weight="int2/ch")]), m)
        >>> type(e.head).__name__, len(np.unique(np.asarray(e.head.kernel[...])[:, 0])) <= 3
        ('Linear', True)
        >>> effective_model(quantize_model(m, [Rule("head", weight="int8", act="int8")]), m) is None
        True
    """
    layers = walk_layers(qmodel)
    qls, fls = layers.quantized, layers.floating
    if any(L.act_quant is not None or L.outlier_threshold is not None or L.call_site is not None for L in qls.values()):
        return None
    out = copy_model(template)
    targets = quantizable_layers(out, kinds=tuple(LAYER_KINDS.values()))
    for path, m in targets:
        name = WEIGHT_NAMES[layer_kind(m)]
        if path in qls:
            L = qls[path]
            w = jnp.asarray(L.weight_value())
            if L.input_scale is not None:  # (x / s) @ W  ==  x @ (W / s[:, None])
                if L.kind != "linear":
                    return None
                w = w / jnp.asarray(L.input_scale[...]).reshape(-1, 1)
            src = L.layer
        elif path in fls:
            src = fls[path]
            w = getattr(src, name)[...]
        else:
            return None
        getattr(m, name).value = w
        if getattr(m, "bias", None) is not None and getattr(src, "bias", None) is not None:
            m.bias.value = src.bias[...]
    layer_paths = [p for p, _ in targets]
    theirs = {path_str(p): v for p, v in nnx.to_flat_state(nnx.state(qmodel))}
    rest = []
    for p, v in nnx.to_flat_state(nnx.state(out)):
        s = path_str(p)
        if not _under(s, layer_paths) and s in theirs and jnp.shape(theirs[s][...]) == jnp.shape(v[...]):
            rest.append((p, theirs[s]))
    if rest:
        nnx.update(out, nnx.from_flat_state(rest))
    return out


def traced_variant(qmodel, like=None, *, clip_ratio=None) -> nnx.Module:
    """A copy of ``qmodel`` on ``like``'s graph whose STE quantizers hold their integer bit width
    (each from ``qmodel``'s OWN spec) and, with ``clip_ratio``, the weight clip ratio as traced
    :class:`~qlab.nn.quantizers.QuantOverride` state. Variants of one model that differ only in
    those values (``int2/ch`` vs ``int8/ch`` ...) then have equal graphdefs and can train as one
    ``jax.vmap``-ed program (:func:`qlab.train.train_variants`); copy the trained values
    back with ``nnx.update(qmodel, nnx.state(view, nnx.Not(QuantOverride)))``.

    Every quantizer of ``like`` with an integer format and method ``"ste"`` (or an LSQ weight quantizer) gets ``traced_bits``
    (whatever its bits), so all variants built against one ``like`` share one structure; other
    quantizers must have equal specs. ValueError names the layer otherwise.

    Example:
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> from qlab.nn import Rule, quantize_model
        >>> m = MLP(8, hidden=(16,), out=2, rngs=nnx.Rngs(0))
        >>> q2, q8 = (quantize_model(m, [Rule(".*", weight=w)]) for w in ("int2/ch", "int8/ch"))
        >>> v2, v8 = traced_variant(q2, q8), traced_variant(q8, q8)
        >>> nnx.graphdef(v2) == nnx.graphdef(v8), int(v2.head.weight_quant.traced_bits[...])
        (True, 2)
        >>> bool((v2(jnp.ones((1, 8))) == q2(jnp.ones((1, 8)))).all())
        True
    """
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
