"""safetensors export of any quantized NNX model, and the loader that rebuilds it.

Each converted layer is stored as one uint8 tensor ``<layer path>#qtensor``: its packed codes, scales and
zero points exactly as ``qlab.numerics.packing.pack_qtensor`` lays them out (codes at ``bits`` bits, scales
in their storage dtype), so its size is the layer's ``packed_nbytes``. Every other variable of the model
(float weights, norms, biases, input scales of AWQ/SmoothQuant, activation-quantizer state) is stored as
it is, in its own dtype; the float copy a converted layer may keep is left out. Metadata (JSON strings):
``qlab_version``, ``qlab_layers`` (path -> spec string, shape, dtype and the rule's other fields) and
``qlab_paths`` (tensor key -> the variable's path in the model). For a weight-only model in float32 the
file is ``qlab.nn.model_size(qmodel)["packed_bytes"]`` plus the header.

Example:
    >>> import tempfile, pathlib
    >>> import jax.numpy as jnp
    >>> from flax import nnx
    >>> from qlab.models import MLP
    >>> from qlab.nn import Rule
    >>> from qlab import ptq
    >>> m = MLP(64, hidden=(32,), out=4, rngs=nnx.Rngs(0))
    >>> qm = ptq.rtn(m, [Rule("layers/0", weight="int4/g32")])
    >>> p = export_safetensors(qm, pathlib.Path(tempfile.mkdtemp()) / "m.safetensors")
    >>> back = load_safetensors(MLP(64, hidden=(32,), out=4, rngs=nnx.Rngs(1)), p)
    >>> x = jnp.ones((2, 64))
    >>> bool((back(x) == qm(x)).all())
    True
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from qlab import nn as qnn
from qlab.export.gguf import check_writable, converted_layers
from qlab.models.cache import atomic_write
from qlab.numerics.packing import pack_qtensor, unpack_qtensor
from qlab.numerics.spec import parse_spec

__all__ = ["export_safetensors", "load_safetensors", "read_safetensors_metadata"]

_Q_ATTRS = ("q_codes", "q_scale", "q_zero", "q_tscale")


def _key(path) -> str:
    return "/".join(map(str, path))


def _layer_of(path, layers) -> tuple[str, str] | None:
    """``(layer path, attribute under it)`` when the state path lies inside a quantized layer."""
    s = _key(path)
    for p in layers:
        prefix = f"{p}/" if p else ""
        if s.startswith(prefix):
            return p, s[len(prefix):]
    return None


def _rule_fields(rule) -> dict:
    d = {f.name: getattr(rule, f.name) for f in dataclasses.fields(rule) if f.name != "pattern"}
    return {k: (str(v) if k in ("weight", "act") and v is not None else v) for k, v in d.items()}


def export_safetensors(qmodel, path) -> Path:
    """Write quantized ``qmodel`` (PTQ result or converted QAT model; still fake-quantized layers are converted
    first) to ``path``; returns the path. See the module docstring for the layout. Written under a
    temporary name and renamed: a failed export leaves no file. Errors: an unwritable folder, a model with
    no quantized layers, a layer using LLM.int8 outlier decomposition (it needs the float weight).
    """
    from qlab import __version__  # the package root imports qlab.export: deferred to avoid the cycle

    path = check_writable(path)
    qmodel, layers = converted_layers(qmodel, "safetensors export")
    tensors, paths, meta_layers = {}, {}, {}
    for p, L in layers.items():
        if L.outlier_threshold is not None:
            raise ValueError(f"{p}: outlier decomposition (outlier_threshold) needs the float weight; not exportable")
        q = L.qtensor()
        tensors[f"{p}#qtensor"] = np.frombuffer(pack_qtensor(q), np.uint8)
        meta_layers[p] = {"spec": str(q.spec), "shape": list(q.shape), "dtype": np.dtype(q.dtype).name,
                          "rule": _rule_fields(L.rule)}
    all_layers = qnn.quantized_layers(qmodel)
    for path_t, var in nnx.to_flat_state(nnx.state(qmodel)):
        inside = _layer_of(path_t, all_layers)
        if inside is not None:
            lp, attr = inside
            wname = f"layer/{all_layers[lp].weight_name}"
            if attr in _Q_ATTRS or attr.startswith("capture_stats") or (lp in layers and attr == wname):
                continue
        value = np.asarray(var.get_value() if hasattr(var, "get_value") else var.value)
        k = _key(path_t)
        tensors[k] = np.ascontiguousarray(value)
        paths[k] = list(path_t)
    meta = {"qlab_version": __version__, "qlab_layers": json.dumps(meta_layers), "qlab_paths": json.dumps(paths),
            "format": "qlab"}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_safetensors_metadata(path) -> dict:
    """The qlab metadata of an exported file: ``{"qlab_version", "layers", "paths"}`` (a ValueError when the
    file is not a safetensors file qlab wrote).

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.safetensors"
        >>> _ = p.write_bytes(b"\\x00" * 4)
        >>> read_safetensors_metadata(p)
        Traceback (most recent call last):
        ...
        ValueError: ...: not a readable safetensors file (...)
    """
    try:
        with safe_open(str(path), "np") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors raises its own SafetensorError on damaged headers
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    if "qlab_layers" not in meta:
        raise ValueError(f"{path}: a safetensors file without qlab metadata (not written by qlab.export)")
    return {"qlab_version": meta.get("qlab_version"), "layers": json.loads(meta["qlab_layers"]),
            "paths": json.loads(meta["qlab_paths"])}


def load_safetensors(model, path):
    """Rebuild the quantized model stored at ``path`` on ``model``, a float model of the same architecture
    (its weights are replaced by the file's): each stored layer gets its rule (spec and options, matched
    to its path alone), its packed QTensor (no float copy kept) and the other variables as stored. The
    result computes bit-identical outputs to the model that was exported (see the module example).
    """
    info = read_safetensors_metadata(path)
    rules = [qnn.Rule(f"^{re.escape(p)}$", **d["rule"]) for p, d in info["layers"].items()]
    qmodel = qnn.quantize_model(model, rules)
    qts = {}
    with safe_open(str(path), "np") as f:
        for p, d in info["layers"].items():
            data = f.get_tensor(f"{p}#qtensor").tobytes()
            qts[p] = unpack_qtensor(data, parse_spec(d["spec"]), tuple(d["shape"]), np.dtype(d["dtype"]))
        layers = qnn.quantized_layers(qmodel)
        for k, pth in info["paths"].items():
            inside = _layer_of(pth, layers)
            if inside is not None and inside[1] == "input_scale":
                qnn.set_input_scale(qmodel, inside[0], f.get_tensor(k))
        qnn.load_quantized_weights(qmodel, qts, keep_float=False)
        state = nnx.state(qmodel)
        flat = dict(nnx.to_flat_state(state))
        for k, pth in info["paths"].items():
            key = tuple(pth)
            if key not in flat:
                raise ValueError(f"{path}: variable {k} has no place in the given model (another architecture?)")
            v = f.get_tensor(k)
            if tuple(v.shape) != tuple(flat[key].value.shape):
                raise ValueError(f"{path}: variable {k} has shape {v.shape}, the model's is {flat[key].value.shape}")
            flat[key].value = jnp.asarray(v)
    nnx.update(qmodel, nnx.from_flat_state(flat))
    return qmodel
