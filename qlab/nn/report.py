"""Per-layer report and honest model size of a quantized model.

Example:
    >>> from flax import nnx
    >>> from qlab.models import MLP
    >>> from qlab.nn import Rule, quantize_model
    >>> qm = quantize_model(MLP(16, hidden=(32,), out=4, rngs=nnx.Rngs(0)), [Rule("layers/.*", weight="int4/g8")])
    >>> layer_report(qm)[["layer", "rule", "weight_spec"]].values.tolist()
    [['head', '<float>', None], ['layers/0', 'layers/.*', 'int4/g8a0']]
"""

from __future__ import annotations

import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from flax import nnx

from qlab.numerics.packing import bits_per_weight, packed_nbytes
from qlab.numerics.metrics import sqnr_db
from qlab.nn.call_sites import SEEN_CALL_SITES
from qlab.nn.layer import WEIGHT_NAMES, layer_kind
from qlab.nn.quantizers import QuantParam
from qlab.nn.rules import first_match
from qlab.nn.surgery import walk_layers
from qlab.nn.transform import applied_rules, unmatched_rules

__all__ = ["layer_report", "model_size", "resident_bytes", "unmatched_rules"]  # unmatched_rules: re-exported from qlab.nn.transform


def layer_report(qmodel, *, sqnr: bool = True, warn: bool = True):
    """One row per weight layer (quantized or left in float; a user module's Param that a weight rule
    quantizes at a ``jnp.einsum`` ... call site is a layer, listed from ``quantize_model`` on) and per
    other call site seen so far (operands that are not Params: 0 bytes, NaN bits).

    Columns: ``layer`` (path), ``kind`` (linear/conv/einsum/embed/call site op), ``rule``
    (pattern or ``"<float>"``), ``weight_spec``, ``act_spec``, ``weight_quantizer``,
    ``act_quantizer``, ``converted``, ``params``, ``bits_per_weight``, ``packed_bytes``,
    ``float_bytes`` (f32), ``sqnr_db`` (quantized vs float weight; NaN when unknown).
    ``df.attrs["unmatched_rules"]`` lists rules that matched nothing (also warned about).

    Example:
        >>> from flax import nnx
        >>> from qlab.nn import Rule, quantize_model
        >>> df = layer_report(quantize_model(nnx.Linear(8, 4, rngs=nnx.Rngs(0)), [Rule(".*", weight="int8/ch")]))
        >>> df[["layer", "weight_spec", "params", "packed_bytes"]].values.tolist()   # 32 codes + 4 f16 scales
        [['', 'int8/ch1', 32, 40]]
    """
    layers = walk_layers(qmodel)
    wrappers, floats = layers.quantized, layers.floating
    rules = applied_rules(qmodel)
    rows = []
    for path, L in wrappers.items():
        w = L.weight[...]
        q = L.qtensor()
        shape = tuple(q.shape) if q is not None else tuple(w.shape)
        n = math.prod(shape)
        if q is not None:
            wspec = q.spec
        elif L.weight_quant is not None:
            wspec = L.weight_quant.spec
        else:
            wspec = None
        bpw = bits_per_weight(wspec, shape) if wspec is not None else 32.0
        pbytes = packed_nbytes(wspec, shape) if wspec is not None else 4 * n
        s = float("nan")
        if sqnr and w.size and wspec is not None:
            ref = w
            if L.input_scale is not None:  # PTQ smoothing quantized w * s: compare against that
                bshape = [1] * w.ndim
                bshape[L.contract_axis] = -1
                ref = w * L.input_scale[...].reshape(bshape)
            s = float(sqnr_db(ref, L.weight_value()))
        rows.append(dict(
            layer=path, kind=L.kind, rule=L.rule.pattern,
            weight_spec=None if wspec is None else str(wspec),
            act_spec=None if L.act_quant is None else str(L.act_quant.spec),
            weight_quantizer=None if wspec is None else ("converted" if q is not None else L.weight_quant.method),
            act_quantizer=None if L.act_quant is None else (
                L.act_quant.method + ("/ema" if L.act_quant.range == "ema" and L.act_quant.method == "ste" else "")),
            converted=q is not None, params=n, bits_per_weight=bpw, packed_bytes=int(pbytes),
            float_bytes=4 * n, sqnr_db=s,
        ))
    for path, m in floats.items():
        w = getattr(m, WEIGHT_NAMES[layer_kind(m)])[...]
        r = first_match(rules, path) if rules else None
        rows.append(dict(
            layer=path, kind=layer_kind(m), rule=r.pattern if r is not None else "<float>",
            weight_spec=None, act_spec=None, weight_quantizer=None, act_quantizer=None, converted=False,
            params=int(w.size), bits_per_weight=32.0, packed_bytes=4 * int(w.size), float_bytes=4 * int(w.size),
            sqnr_db=float("nan"),
        ))
    users = layers.user
    for site, pat in SEEN_CALL_SITES.get(rules, {}).items() if rules else ():
        owner = site.rsplit("/", 1)[0] if "/" in site else ""
        if owner not in users or site in wrappers:
            continue  # a call site of another model quantized with the same rules, or a layer listed above
        r = first_match(rules, site)
        rows.append(dict(
            layer=site, kind="call:" + site.rsplit("/", 1)[-1].rsplit("_", 1)[0], rule=pat,
            weight_spec=None if r.weight is None else str(r.weight), act_spec=None if r.act is None else str(r.act),
            weight_quantizer="ste" if r.weight is not None else None, act_quantizer="ste" if r.act is not None else None,
            converted=False, params=0, bits_per_weight=float("nan"), packed_bytes=0, float_bytes=0,
            sqnr_db=float("nan"),
        ))
    df = pd.DataFrame(rows, columns=[
        "layer", "kind", "rule", "weight_spec", "act_spec", "weight_quantizer", "act_quantizer", "converted",
        "params", "bits_per_weight", "packed_bytes", "float_bytes", "sqnr_db"])
    df = df.sort_values("layer", kind="stable").reset_index(drop=True)
    for col in ("weight_spec", "act_spec", "weight_quantizer", "act_quantizer"):
        df[col] = df[col].astype(object).where(df[col].notna(), None)
    um = unmatched_rules(qmodel)
    df.attrs["unmatched_rules"] = list(um)
    if um and warn:
        warnings.warn(f"rules that matched no layer: {list(um)}", stacklevel=2)
    return df


def model_size(qmodel, native_dtype=None) -> dict:
    """``{"params", "packed_bytes", "float_bytes", "packed_mib", "float_mib", "native_dtype",
    "float_native_bytes", "float_native_mib"}`` over ALL parameters.

    Quantized weights count at their packed size (codes + scales); every other ``nnx.Param``
    (biases, norms, float layers) counts at 32 bits. Quantizer parameters (``QuantParam``) and
    statistics are not model weights and are not counted; a converted layer's kept float copy
    is not counted either. ``float_bytes`` is the float baseline in float32; ``float_native_bytes``
    the same parameters in the model's own dtype: ``native_dtype`` if given, else the model's
    ``native_dtype`` attribute (e.g. ``"bfloat16"`` for Gemma 3, whose released weights are bf16),
    else float32.

    Example:
        >>> from flax import nnx
        >>> from qlab.nn import Rule, quantize_model
        >>> qm = quantize_model(nnx.Linear(128, 8, rngs=nnx.Rngs(0)), [Rule(".*", weight="int8/ch")])
        >>> model_size(qm)["packed_bytes"]   # 1024 int8 codes + 8 f16 scales + 8 f32 biases
        1072
        >>> size = model_size(qm, native_dtype="bfloat16")
        >>> size["float_bytes"], size["float_native_bytes"]   # 1032 params at 4 and at 2 bytes
        (4128, 2064)
    """
    dtype = native_dtype if native_dtype is not None else getattr(qmodel, "native_dtype", None) or "float32"
    try:
        dt = jnp.dtype(dtype)
    except TypeError:
        dt = None
    if dt is None or not jnp.issubdtype(dt, jnp.floating):
        raise ValueError(f"model_size: native_dtype={dtype!r} is not a float dtype; use e.g. 'float32', "
                         "'bfloat16', 'float16'")
    wrappers = walk_layers(qmodel).quantized
    skip = set()  # the wrapped weights (by identity: a call site's weight is also its module's own Param)
    params = packed = 0
    for path, L in wrappers.items():
        skip.add(id(L.weight))
        q = L.packed()
        shape = tuple(q.shape) if q is not None else tuple(L.weight[...].shape)
        n = math.prod(shape)
        spec = q.spec if q is not None else (L.weight_quant.spec if L.weight_quant is not None else None)
        params += n
        packed += packed_nbytes(spec, shape) if spec is not None else 4 * n
    for p, var in nnx.to_flat_state(nnx.state(qmodel, nnx.Param)):
        if isinstance(var, QuantParam) or id(var) in skip:
            continue
        n = int(np.size(var[...]))
        params += n
        packed += 4 * n
    return {
        "params": int(params),
        "packed_bytes": int(packed),
        "float_bytes": int(4 * params),
        "packed_mib": packed / 2**20,
        "float_mib": 4 * params / 2**20,
        "native_dtype": dt.name,
        "float_native_bytes": int(dt.itemsize * params),
        "float_native_mib": dt.itemsize * params / 2**20,
    }


def resident_bytes(model) -> int:
    """Bytes of the JAX arrays a model holds (every Variable in ``nnx.state(model)``): what its weights
    occupy in memory. A converted layer holds its codes packed (``qlab.numerics.packing.PackedQTensor``),
    so this is within a few bytes per layer of :func:`model_size`'s ``packed_bytes`` (plus quantizer
    statistics, and any float copy kept by ``convert(..., keep_float=True)``).

    Example:
        >>> from flax import nnx
        >>> from qlab.nn import Rule, convert, quantize_model
        >>> qm = quantize_model(nnx.Linear(256, 8, use_bias=False, rngs=nnx.Rngs(0)), [Rule(".*", weight="int4/g128")])
        >>> resident_bytes(qm), resident_bytes(convert(qm)), model_size(convert(qm))["packed_bytes"]
        (8192, 1056, 1056)
    """
    return int(sum(np.dtype(a.dtype).itemsize * int(np.size(a))
                   for a in jax.tree_util.tree_leaves(nnx.state(model)) if hasattr(a, "dtype")))
