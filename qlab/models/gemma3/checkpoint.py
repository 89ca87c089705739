"""Gemma 3 from the official Hugging Face checkpoint directory (e.g. ``google/gemma-3-270m``), read offline.

The directory is what the Hub repository holds: ``config.json`` (a ``Gemma3TextConfig``, model type
``gemma3_text``, architecture ``Gemma3ForCausalLM``), ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) and ``tokenizer.json``. qlab never downloads it: fetch it yourself after
accepting the Gemma Terms of Use (https://ai.google.dev/gemma/terms), keep it outside the repository, and
pass its path: ``load_gemma3("/path/to/gemma-3-270m")`` or :func:`load_gemma3_checkpoint`.

Weights are read with ``safetensors`` into numpy (bfloat16 is upcast to float32) and renamed to qlab's
GGUF-named layout (:mod:`qlab.models.gemma3.weights`). Both store matrices ``[out, in]``, so nothing is
transposed here. Hugging Face's Gemma RMSNorm computes ``x * (1 + w)`` and stores ``w``; qlab's RMSNorm
multiplies by its weight as stored (the GGUF already holds ``1 + w``), so every norm weight gets ``+1``.

Example (a tiny checkpoint written in this layout)::

    model, tok = load_gemma3_checkpoint("/path/to/gemma-3-270m")
    logits = model(jnp.asarray([tok.encode("It is a truth").ids]))
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from safetensors import safe_open
from tokenizers import Tokenizer

from .model import Gemma3, Gemma3Config, sliding_window_period
from .weights import model_from_weights

__all__ = ["CHECKPOINT_FILES", "is_checkpoint_dir", "checkpoint_config", "hf_weight_names",
           "checkpoint_weights", "checkpoint_tokenizer", "load_gemma3_checkpoint"]

#: The files a checkpoint directory must hold (the weights may instead be shards with an index).
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json")
_INDEX = "model.safetensors.index.json"

# transformers' Gemma3TextConfig defaults, used for keys a config.json leaves out (as transformers does).
_HF_DEFAULTS = dict(vocab_size=262_208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                    num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                    hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131_072, rms_norm_eps=1e-6,
                    pad_token_id=0, eos_token_id=1, bos_token_id=2, tie_word_embeddings=True,
                    rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, attention_bias=False,
                    query_pre_attn_scalar=256, sliding_window=4096, sliding_window_pattern=6,
                    final_logit_softcapping=None, attn_logit_softcapping=None, rope_scaling=None,
                    use_bidirectional_attention=False)

# HF tensor name inside ``model.layers.{i}.`` -> qlab (GGUF) name inside ``blk.{i}.``, and whether it is an
# RMSNorm weight (stored without Gemma's +1).
_HF_BLOCK = (
    ("input_layernorm.weight", "attn_norm.weight", True),
    ("post_attention_layernorm.weight", "post_attention_norm.weight", True),
    ("pre_feedforward_layernorm.weight", "ffn_norm.weight", True),
    ("post_feedforward_layernorm.weight", "post_ffw_norm.weight", True),
    ("self_attn.q_norm.weight", "attn_q_norm.weight", True),
    ("self_attn.k_norm.weight", "attn_k_norm.weight", True),
    ("self_attn.q_proj.weight", "attn_q.weight", False),
    ("self_attn.k_proj.weight", "attn_k.weight", False),
    ("self_attn.v_proj.weight", "attn_v.weight", False),
    ("self_attn.o_proj.weight", "attn_output.weight", False),
    ("mlp.gate_proj.weight", "ffn_gate.weight", False),
    ("mlp.up_proj.weight", "ffn_up.weight", False),
    ("mlp.down_proj.weight", "ffn_down.weight", False),
)


def _name_map(n_layers: int) -> dict[str, tuple[str, bool]]:
    """HF tensor name -> (qlab GGUF name, is an RMSNorm weight)."""
    out = {"model.embed_tokens.weight": ("token_embd.weight", False),
           "model.norm.weight": ("output_norm.weight", True)}
    for i in range(n_layers):
        for hf, ours, is_norm in _HF_BLOCK:
            out[f"model.layers.{i}.{hf}"] = (f"blk.{i}.{ours}", is_norm)
    return out


def is_checkpoint_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory (the layout of a Hugging Face checkpoint), not a single GGUF file.

    Example:
        >>> import tempfile
        >>> is_checkpoint_dir(tempfile.mkdtemp()), is_checkpoint_dir("model.gguf")
        (True, False)
    """
    return Path(path).is_dir()


def _require(path: Path, name: str) -> Path:
    f = path / name
    if not f.is_file():
        raise FileNotFoundError(f"{f} not found: a Hugging Face Gemma 3 checkpoint directory holds "
                                f"{', '.join(CHECKPOINT_FILES)} (e.g. a download of google/gemma-3-270m)")
    return f


def _rope_theta(config: dict, layer_type: str, legacy_key: str) -> float:
    """RoPE base of ``layer_type`` layers: newer configs nest it in ``rope_parameters``, older ones are flat."""
    params = (config.get("rope_parameters") or {}).get(layer_type) or {}
    if params.get("rope_type", "default") != "default":
        raise ValueError(f"rope_parameters[{layer_type!r}] = {params}: only the default RoPE is supported")
    return float(params.get("rope_theta", config.get(legacy_key, _HF_DEFAULTS[legacy_key])))


def checkpoint_config(config: dict) -> Gemma3Config:
    """Gemma3Config from a checkpoint's ``config.json`` (as a dict), with what qlab's model lacks refused.

    Field names follow transformers' ``Gemma3TextConfig``; absent keys take its defaults. The layer pattern
    comes from ``layer_types`` when present, else from ``sliding_window_pattern``; the RoPE bases from
    ``rope_parameters`` (newer transformers) or ``rope_theta`` / ``rope_local_base_freq``.

    Example:
        >>> cfg = checkpoint_config({"model_type": "gemma3_text", "hidden_size": 640, "num_hidden_layers": 2,
        ...     "num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 2048,
        ...     "vocab_size": 262144, "sliding_window": 512,
        ...     "layer_types": ["sliding_attention", "full_attention"]})
        >>> cfg.d_model, cfg.sliding_window_pattern, cfg.rope_base_local, cfg.rope_base_global
        (640, 2, 10000.0, 1000000.0)
    """
    model_type = config.get("model_type")
    if model_type != "gemma3_text":
        hint = (" (the multimodal Gemma3ForConditionalGeneration; qlab reads the text-only Gemma3ForCausalLM "
                "checkpoints such as gemma-3-270m and gemma-3-1b)" if model_type == "gemma3" else "")
        raise ValueError(f"config.json has model_type {model_type!r} (architectures "
                         f"{config.get('architectures')}): expected 'gemma3_text'{hint}")
    c = {**_HF_DEFAULTS, **config}
    unsupported = {
        "hidden_activation": c["hidden_activation"] != "gelu_pytorch_tanh",
        "final_logit_softcapping": c["final_logit_softcapping"] is not None,
        "attn_logit_softcapping": c["attn_logit_softcapping"] is not None,
        "rope_scaling": c["rope_scaling"] not in (None, {}) and c["rope_scaling"].get("rope_type") != "default",
        "attention_bias": bool(c["attention_bias"]),
        "use_bidirectional_attention": bool(c["use_bidirectional_attention"]),
        "tie_word_embeddings": not c["tie_word_embeddings"],
        "sliding_window": c["sliding_window"] is None,
    }
    bad = [f"{k}={c[k]!r}" for k, is_bad in unsupported.items() if is_bad]
    if bad:
        raise ValueError(f"config.json sets {', '.join(bad)}, which qlab's Gemma 3 does not implement")
    n_layers = int(c["num_hidden_layers"])
    if config.get("layer_types") is not None:
        types = list(config["layer_types"])
        if len(types) != n_layers or not set(types) <= {"sliding_attention", "full_attention"}:
            raise ValueError(f"config.json layer_types {types} do not describe {n_layers} layers of "
                             f"'sliding_attention' / 'full_attention'")
        pattern = sliding_window_period([t == "sliding_attention" for t in types])
    else:
        pattern = int(c["sliding_window_pattern"])
    eos = c["eos_token_id"]
    return Gemma3Config(
        vocab_size=int(c["vocab_size"]),
        d_model=int(c["hidden_size"]),
        n_layers=n_layers,
        n_heads=int(c["num_attention_heads"]),
        n_kv_heads=int(c["num_key_value_heads"]),
        head_dim=int(c["head_dim"]),
        ffn_dim=int(c["intermediate_size"]),
        sliding_window=int(c["sliding_window"]),
        sliding_window_pattern=pattern,
        rope_base_local=_rope_theta(c, "sliding_attention", "rope_local_base_freq"),
        rope_base_global=_rope_theta(c, "full_attention", "rope_theta"),
        rms_eps=float(c["rms_norm_eps"]),
        query_pre_attn_scalar=float(c["query_pre_attn_scalar"]),
        context_length=int(c["max_position_embeddings"]),
        bos_id=int(c["bos_token_id"]),
        eos_id=int(eos[0] if isinstance(eos, list) else eos),  # generation stops at the first listed one
        pad_id=int(c["pad_token_id"]),
        native_dtype=_checkpoint_dtype(config, c),
    )


def _checkpoint_dtype(config: dict, text_config: dict) -> str:
    """The release dtype config.json names (``torch_dtype``, or ``dtype`` in newer files), else bfloat16."""
    for c in (text_config, config):
        for key in ("dtype", "torch_dtype"):
            if isinstance(c.get(key), str) and c[key] in ("bfloat16", "float16", "float32"):
                return c[key]
    return Gemma3Config.native_dtype


def hf_weight_names(cfg: Gemma3Config) -> list[str]:
    """The Hugging Face tensor names a checkpoint of ``cfg`` holds (``lm_head.weight`` aside: it is tied).

    Example:
        >>> hf_weight_names(Gemma3Config.tiny(n_layers=1))[:3]
        ['model.embed_tokens.weight', 'model.norm.weight', 'model.layers.0.input_layernorm.weight']
    """
    return list(_name_map(cfg.n_layers))


def _weight_files(path: Path) -> list[Path]:
    if (path / _INDEX).is_file():
        shards = sorted(set(json.loads((path / _INDEX).read_text())["weight_map"].values()))
        return [_require(path, s) for s in shards]
    return [_require(path, "model.safetensors")]


def checkpoint_weights(path: str | os.PathLike, cfg: Gemma3Config) -> dict[str, np.ndarray]:
    """float32 weights of the checkpoint directory ``path``, renamed to qlab's GGUF names, norms given +1.

    Raises KeyError naming missing tensors, and ValueError naming tensors qlab's model has no place for
    (a tied ``lm_head.weight`` equal to the embedding is accepted and dropped). Example::

        cfg = checkpoint_config(json.loads(Path("gemma-3-270m/config.json").read_text()))
        model = model_from_weights(cfg, checkpoint_weights("gemma-3-270m", cfg))   # = load_gemma3_checkpoint
    """
    path = Path(path)
    names = _name_map(cfg.n_layers)
    raw: dict[str, np.ndarray] = {}
    for f in _weight_files(path):
        with safe_open(str(f), "np") as st:
            for k in st.keys():
                raw[k] = st.get_tensor(k)
    missing = [k for k in names if k not in raw]
    if missing:
        raise KeyError(f"{path} is missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    head = raw.pop("lm_head.weight", None)
    if head is not None and not np.array_equal(head, raw["model.embed_tokens.weight"]):
        raise ValueError(f"{path}: lm_head.weight differs from model.embed_tokens.weight; qlab ties them")
    extra = sorted(set(raw) - set(names))
    if extra:
        raise ValueError(f"{path} has tensors qlab's Gemma 3 has no place for: {extra[:5]}"
                         f"{' ...' if len(extra) > 5 else ''}")
    out = {}
    for hf, (ours, is_norm) in names.items():
        w = raw.pop(hf).astype(np.float32)
        out[ours] = 1.0 + w if is_norm else w  # HF Gemma norms compute x * (1 + w); qlab's use w as stored
    return out


def checkpoint_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """The checkpoint's own tokenizer, from ``tokenizer.json`` (it prepends BOS, as Gemma's tokenizer does).

    Example::

        checkpoint_tokenizer("gemma-3-270m").encode("It is").ids      # starts with BOS (2)
    """
    return Tokenizer.from_file(str(_require(Path(path), "tokenizer.json")))


def load_gemma3_checkpoint(path: str | os.PathLike) -> tuple[Gemma3, Tokenizer]:
    """(model, tokenizer) from a Hugging Face Gemma 3 checkpoint directory, in float32.

    Errors name what is wrong: a missing file (FileNotFoundError), another architecture or an unsupported
    setting (ValueError), a missing tensor (KeyError).

    Example:
        >>> import tempfile
        >>> load_gemma3_checkpoint(tempfile.mkdtemp())  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        FileNotFoundError: .../config.json not found: a Hugging Face Gemma 3 checkpoint directory holds ...
    """
    path = Path(path)
    cfg = checkpoint_config(json.loads(_require(path, "config.json").read_text()))
    tokenizer = checkpoint_tokenizer(path)  # before the weights, so a missing file fails fast
    return model_from_weights(cfg, checkpoint_weights(path, cfg)), tokenizer
