"""The model transform: :func:`quantize_model` (an NNX model -> its quantization-aware copy).

``quantize_model(model, rules)`` copies ``model`` and replaces every ``nnx.Linear``, ``nnx.Conv``,
``nnx.Einsum`` and ``nnx.Embed`` whose path matches a quantizing rule by a
:class:`~qlab.nn.QuantizedLayer` at the same path (:mod:`qlab.nn.layer`). User modules with a
possible call site that a quantizing rule matches get their ``jnp.einsum``/``dot``/``matmul``/
``lax.dot_general`` calls intercepted (:mod:`qlab.nn.call_sites`). Rules may name layers by
position (``@first`` / ``@last``, :mod:`qlab.nn.rules`). The rules and the ones that matched
nothing stay with the model (:func:`applied_rules`, :func:`unmatched_rules`).

Example:
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qlab.models import MLP
    >>> qm = quantize_model(MLP(16, hidden=(32,), out=4, rngs=nnx.Rngs(0)), [Rule(".*", weight="int4/g8", act="int8")])
    >>> type(qm.layers[0]).__name__, qm(jnp.ones((2, 16))).shape
    ('QuantizedLayer', (2, 4))
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from qlab.nn.call_sites import SITES_ATTR, candidate_sites, direct_params, intercept_call_sites, recording_site_weights
from qlab.nn.layer import QuantizedLayer, SiteWeight, layer_kind
from qlab.nn.quantizers import QuantStat
from qlab.nn.rules import Rule, as_rules, first_match, resolve_positions
from qlab.nn.surgery import copy_model, find_layer, path_str, quantizable_layers, set_submodule

__all__ = ["quantize_model", "set_input_scale", "applied_rules", "unmatched_rules"]

# the attributes quantize_model leaves on the model it returns (read them with the functions below)
_RULES_ATTR, _UNMATCHED_ATTR = "_qlab_rules", "_qlab_unmatched"


def quantize_model(model: nnx.Module, rules, *, example=None, forward=None, allow_unmatched: bool = False) -> nnx.Module:
    """A quantization-aware copy of an NNX ``model`` (``model`` itself is not changed).

    Args:
        model: any NNX module.
        rules: a :class:`~qlab.nn.Rule` or a sequence of them, tried in order on each layer path
            (see :mod:`qlab.nn.rules` for paths and matching).
        example: an input batch. Read when a rule uses ``@first`` / ``@last``: those then
            name the first / last :func:`~qlab.nn.quantizable_layers` in the order ``model(example)``
            calls them (traced with ``jax.eval_shape``, nothing computed); without it, in graph order.
            Required when a weight rule matches a call site of a user module that holds its own
            ``nnx.Param`` weights (2+ dims): the traced example finds which call site multiplies which
            Param (passed as is, ``self.w[...]``), and each becomes a layer (:class:`QuantizedLayer`
            of a :class:`~qlab.nn.layer.SiteWeight`, path ``<module>/<op>_<k>``) that ``model_size``,
            ``layer_report`` and PTQ (RTN, GPTQ, HQQ) see like any other.
        forward: ``forward(model, example)`` for that trace; default ``model(example)``.
        allow_unmatched: by default a quantizing rule that matches no layer (nor a possible call
            site ``<module>/<op>_<k>``, k < 8, of a user module) raises ValueError; with True it
            is only warned about and listed by :func:`~qlab.nn.layer_report`.

    Returns:
        The same module graph with matching layers replaced by :class:`QuantizedLayer`s. Learnable
        quantizer state is ``QuantParam`` (trained by default optimizers), statistics are
        ``QuantStat``. ``qmodel.eval()`` freezes activation statistics, ``qmodel.train()`` resumes.

    Example:
        >>> import numpy as np
        >>> from flax import nnx
        >>> from qlab.models import MLP
        >>> m = MLP(8, hidden=(16,), out=2, rngs=nnx.Rngs(0))
        >>> qm = quantize_model(m, [Rule("layers/.*", weight="int4/ch", act="int8")])
        >>> type(qm.layers[0]).__name__, type(qm.head).__name__
        ('QuantizedLayer', 'Linear')
        >>> qm = quantize_model(m, [Rule("@first", weight="int8/ch")], example=np.zeros((1, 8)))
        >>> type(qm.layers[0]).__name__, type(qm.head).__name__   # layers/0 runs first, though "head" sorts first
        ('QuantizedLayer', 'Linear')
        >>> try:
        ...     quantize_model(m, [Rule("nothing", weight="int8")])
        ... except ValueError as e:
        ...     print(str(e)[:54])
        rules matched no layer: Rule('nothing', weight='int8')
    """
    rules = as_rules(rules)
    if any(r.uses_positions for r in rules):
        rules = resolve_positions(rules, [p for p, _ in quantizable_layers(model, example)])
    qmodel = copy_model(model)
    mods = list(nnx.iter_modules(qmodel))
    layer_paths, user_paths = [], []
    for p, m in mods:
        if isinstance(m, QuantizedLayer):
            raise ValueError(
                f"quantize_model: the model is already quantized (QuantizedLayer at {path_str(p)!r}); "
                "quantize the float model instead"
            )
    for p, m in mods:
        if any(len(q) < len(p) and p[: len(q)] == q for q, _ in layer_paths):
            continue
        k = layer_kind(m)
        if k is not None:
            layer_paths.append((p, m))
        elif not type(m).__module__.startswith("flax"):
            user_paths.append((p, m))
    matched = set()
    root = qmodel
    for p, m in layer_paths:
        s = path_str(p)
        rule = first_match(rules, s)
        if rule is None:
            continue
        matched.add(rule)
        if rule.is_float:
            continue
        w = QuantizedLayer(m, layer_kind(m), s, rule)
        if p == ():
            root = w
        else:
            set_submodule(qmodel, p, w)
    # user modules: intercept their call sites where some rule may match one
    for p, m in user_paths:
        s = path_str(p)
        hits = {r for r in (first_match(rules, site) for site in candidate_sites(s)) if r is not None}
        matched |= hits
        if any(not r.is_float for r in hits):
            intercept_call_sites(m, s, rules)
    _bind_site_weights(qmodel, rules, [(path_str(p), m) for p, m in user_paths], example, forward)
    unmatched = tuple(r for r in rules if r not in matched)
    bad = [r for r in unmatched if not r.is_float]
    if bad:
        msg = "rules matched no layer: " + ", ".join(map(repr, bad)) + (
            f". Layer paths: {[path_str(p) for p, _ in layer_paths][:20]}"
        )
        if not allow_unmatched:
            raise ValueError(msg + " (pass allow_unmatched=True to continue)")
        warnings.warn(msg, stacklevel=2)
    setattr(root, _RULES_ATTR, rules)
    setattr(root, _UNMATCHED_ATTR, tuple(r.pattern for r in unmatched))
    return root


def _bind_site_weights(qmodel, rules, user_paths, example, forward) -> None:
    """Give each user module's call sites that multiply one of its own Params by a weight rule a
    QuantizedLayer (in ``module.qlab_sites``, sharing the Param), found by tracing ``example``."""
    owners = {}
    for s, m in user_paths:
        weighted = [first_match(rules, site) for site in candidate_sites(s)]
        if direct_params(m) and any(r is not None and r.weight is not None for r in weighted):
            owners[s] = m
    if not owners:
        return
    if example is None:
        shown = {s or "<root>": list(direct_params(m)) for s, m in owners.items()}
        raise ValueError(
            f"quantize_model: weight rules match call sites (jnp.einsum/dot/matmul/dot_general) of modules that hold "
            f"their own Params {shown}; pass example= (an input batch; forward= if the model is not called as "
            "model(example)) so quantize_model can trace which call site multiplies which Param and count it as a layer")
    run = forward if forward is not None else (lambda m, x: m(x))
    graphdef, state = nnx.split(qmodel)
    with recording_site_weights() as found:
        jax.eval_shape(lambda st, x: run(nnx.merge(graphdef, st), x), state, example)
    for (s, local), (pname, eq) in sorted(found.items()):
        m = owners.get(s)
        if m is None:
            continue
        site = f"{s}/{local}" if s else local
        sites = getattr(m, SITES_ATTR, None)
        if sites is None:
            setattr(m, SITES_ATTR, nnx.Dict())
            sites = getattr(m, SITES_ATTR)
        L = QuantizedLayer(SiteWeight(getattr(m, pname), eq), "einsum", site, first_match(rules, site))
        L.call_site = local.rsplit("_", 1)[0]
        sites[local] = L


def applied_rules(qmodel) -> tuple[Rule, ...]:
    """The rules ``qmodel`` was quantized with (``@first`` / ``@last`` resolved); ``()`` for a model
    :func:`quantize_model` did not make.

    Example:
        >>> from flax import nnx
        >>> applied_rules(quantize_model(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), [Rule(".*", weight="int8")]))
        (Rule('.*', weight='int8'),)
    """
    return tuple(getattr(qmodel, _RULES_ATTR, ()))


def unmatched_rules(qmodel) -> tuple[str, ...]:
    """Patterns of the rules that matched no layer when the model was quantized.

    Example:
        >>> import warnings
        >>> from flax import nnx
        >>> with warnings.catch_warnings():
        ...     warnings.simplefilter("ignore")
        ...     qm = quantize_model(nnx.Linear(2, 2, rngs=nnx.Rngs(0)), [Rule("x", weight="int8"), Rule(".*", weight="int8")],
        ...                         allow_unmatched=True)
        >>> unmatched_rules(qm)
        ('x',)
    """
    return tuple(getattr(qmodel, _UNMATCHED_ATTR, ()))


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
