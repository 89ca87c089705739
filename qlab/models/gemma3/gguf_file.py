"""Gemma 3 as a GGUF file (llama.cpp's format): read its config, weights and tokenizer; write tiny ones.

Reading works for any ``gemma3`` GGUF, the real Q4_K_M file among them: every tensor is dequantized to
float32 with ``gguf`` (that is qlab's float baseline), and the dequantized weights can be cached as
safetensors so later loads skip the slow GGUF parse. Writing produces the real file's tensor names and
metadata keys, for tests and for round trips (F32 by default, or a ``gguf`` quantization type).

The GGUF does not store the local RoPE base nor the 5:1 layer pattern (llama.cpp hard-codes both for gemma3);
they are read when present (``gemma3.rope.freq_base_swa``, ``gemma3.attention.sliding_window_pattern``).

Example:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from flax import nnx
    >>> from qlab.models.gemma3.model import Gemma3, Gemma3Config
    >>> path = write_gguf(Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0)), Path(tempfile.mkdtemp()) / "t.gguf")
    >>> read_gguf_config(path) == Gemma3Config.tiny()
    True
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import gguf
import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file, save_file
from tokenizers import Tokenizer

from ..cache import atomic_write, cache_dir, file_key
from .model import Gemma3, Gemma3Config, sliding_window_period
from .tokenizer import build_tokenizer, tiny_vocab
from .weights import model_weights

__all__ = ["ARCH", "CACHE_FORMAT", "gguf_field", "read_gguf_config", "load_gguf_weights", "gguf_tokenizer",
           "write_gguf"]

ARCH = "gemma3"
#: Salt of the cache keys: bump when what is cached (weights layout, config fields, tokenizer build) changes.
CACHE_FORMAT = 2


def _reader(reader_or_path) -> gguf.GGUFReader:
    return reader_or_path if hasattr(reader_or_path, "fields") else gguf.GGUFReader(str(reader_or_path))


def gguf_field(reader: gguf.GGUFReader, key: str, default=None):
    """The decoded value of metadata field ``key``, or ``default`` when the file lacks it.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from flax import nnx
        >>> from qlab.models.gemma3.model import Gemma3, Gemma3Config
        >>> path = write_gguf(Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0)), Path(tempfile.mkdtemp()) / "t.gguf")
        >>> r = gguf.GGUFReader(str(path))
        >>> gguf_field(r, "general.architecture"), gguf_field(r, "no.such.key", 7)
        ('gemma3', 7)
    """
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _f32(v) -> float:
    """A float32 metadata value as the short decimal it was written from (1e-06, not 9.99999997e-07)."""
    return float(str(np.float32(v)))


def _native_dtype(reader) -> str:
    """The release dtype a GGUF records: its embedding in BF16 or F16 says so; an F32 or quantized file
    (Q4_K_M) does not record what it came from, and gemma3 is released in bfloat16."""
    t = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    types = {gguf.GGMLQuantizationType.BF16: "bfloat16", gguf.GGMLQuantizationType.F16: "float16"}
    return types.get(None if t is None else t.tensor_type, Gemma3Config.native_dtype)


def read_gguf_config(reader) -> Gemma3Config:
    """Gemma3Config from GGUF metadata (``reader``: a ``gguf.GGUFReader`` or a path), with consistency checks.

    Raises ValueError for another architecture or for features this implementation lacks (see the module
    example for a round trip).
    """
    reader = _reader(reader)
    arch = gguf_field(reader, "general.architecture")
    if arch != ARCH:
        raise ValueError(f"expected a {ARCH!r} GGUF, got architecture {arch!r}")
    g = lambda k, d=None: gguf_field(reader, f"{ARCH}.{k}", d)  # noqa: E731
    head_dim = int(g("attention.key_length"))
    if int(g("attention.value_length", head_dim)) != head_dim:
        raise ValueError("key_length != value_length is not supported")
    n_layers = int(g("block_count"))
    pattern = g("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):  # per-layer booleans, True = sliding window
        pattern = sliding_window_period(pattern)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    cfg = Gemma3Config(
        vocab_size=len(tokens.data),
        d_model=int(g("embedding_length")),
        n_layers=n_layers,
        n_heads=int(g("attention.head_count")),
        n_kv_heads=int(g("attention.head_count_kv")),
        head_dim=head_dim,
        ffn_dim=int(g("feed_forward_length")),
        sliding_window=int(g("attention.sliding_window")),
        sliding_window_pattern=int(pattern),
        rope_base_local=_f32(g("rope.freq_base_swa", 10_000.0)),
        rope_base_global=_f32(g("rope.freq_base", 1_000_000.0)),
        rms_eps=_f32(g("attention.layer_norm_rms_epsilon")),
        # llama.cpp: f_attention_scale = 1/sqrt(head_dim) for every gemma3 size except 27B; honoured if stored.
        query_pre_attn_scalar=(float(head_dim) if g("attention.scale") is None
                               else float(f"{float(g('attention.scale')) ** -2:.6g}")),
        context_length=int(g("context_length", 32_768)),
        bos_id=int(gguf_field(reader, "tokenizer.ggml.bos_token_id", 2)),
        eos_id=int(gguf_field(reader, "tokenizer.ggml.eos_token_id", 1)),
        pad_id=int(gguf_field(reader, "tokenizer.ggml.padding_token_id", 0)),
        native_dtype=_native_dtype(reader),
    )
    for key in ("final_logit_softcapping", "attn_logit_softcapping", "rope.scaling.type"):
        if g(key) is not None:
            raise ValueError(f"{ARCH}.{key} is set in the GGUF, which this implementation does not support")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    if [int(s) for s in emb.shape] != [cfg.d_model, cfg.vocab_size]:
        raise ValueError(f"token_embd shape {list(emb.shape)} does not match d_model/vocab {cfg}")
    if any(t.name == "output.weight" for t in reader.tensors):
        raise ValueError("GGUF has an untied output.weight; this implementation ties it to token_embd")
    return cfg


def _dequantize_all(reader: gguf.GGUFReader) -> dict[str, np.ndarray]:
    out = {}
    for t in reader.tensors:
        shape = tuple(int(s) for s in reversed(t.shape))  # gguf lists ne0 (fastest) first
        out[t.name] = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type),
                                           dtype=np.float32).reshape(shape)
    return out


def load_gguf_weights(path: str | os.PathLike, *, cache: str | os.PathLike | None = None,
                      cache_float: bool = False):
    """(config, float32 weights by GGUF name) from a GGUF file; optionally cache the dequantized weights.

    ``cache_float=True`` keeps the float32 weights as safetensors in ``cache`` (default: the qlab cache dir),
    keyed by the file's path, size and mtime, and reads them from there next time.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from flax import nnx
        >>> from qlab.models.gemma3.model import Gemma3, Gemma3Config
        >>> path = write_gguf(Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0)), Path(tempfile.mkdtemp()) / "t.gguf")
        >>> cfg, weights = load_gguf_weights(path)
        >>> weights["blk.0.ffn_up.weight"].shape, weights["blk.0.ffn_up.weight"].dtype
        ((64, 32), dtype('float32'))
    """
    path = Path(path)
    cached = (cache_dir(cache) / f"{path.stem}.{file_key(path, str(CACHE_FORMAT))}.f32.safetensors"
              if cache_float else None)
    if cached is not None and cached.exists():  # GGUFReader takes ~15 s on the real file: skip it entirely
        with safe_open(str(cached), "np") as f:
            cfg = Gemma3Config(**json.loads(f.metadata()["qlab_gemma3_config"]))
        return cfg, load_file(str(cached))
    reader = gguf.GGUFReader(str(path))
    cfg = read_gguf_config(reader)
    weights = _dequantize_all(reader)
    if cached is not None:
        meta = {"source": path.name, "qlab_gemma3_config": json.dumps(dataclasses.asdict(cfg))}
        atomic_write(cached, lambda p: save_file(weights, str(p), metadata=meta))
    return cfg, weights


def gguf_tokenizer(reader) -> Tokenizer:
    """The Gemma tokenizer built from a GGUF's vocabulary (``reader``: a ``gguf.GGUFReader`` or a path).

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from flax import nnx
        >>> from qlab.models.gemma3.model import Gemma3, Gemma3Config
        >>> path = write_gguf(Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0)), Path(tempfile.mkdtemp()) / "t.gguf")
        >>> gguf_tokenizer(path).encode("the cat").ids
        [2, 266, 270]
    """
    reader = _reader(reader)
    f = lambda k, d=None: gguf_field(reader, k, d)  # noqa: E731
    model_kind = f("tokenizer.ggml.model")
    if model_kind != "llama":
        raise ValueError(f"expected a SentencePiece ('llama') tokenizer in the GGUF, got {model_kind!r}")
    if f("tokenizer.ggml.add_space_prefix", False):
        raise ValueError("add_space_prefix=True is not supported (Gemma 3 does not use it)")
    return build_tokenizer(f("tokenizer.ggml.tokens"), f("tokenizer.ggml.scores"), f("tokenizer.ggml.token_type"),
                           bos_id=int(f("tokenizer.ggml.bos_token_id", 2)),
                           eos_id=int(f("tokenizer.ggml.eos_token_id", 1)),
                           unk_id=int(f("tokenizer.ggml.unknown_token_id", 3)),
                           pad_id=int(f("tokenizer.ggml.padding_token_id", 0)),
                           add_bos=bool(f("tokenizer.ggml.add_bos_token", True)))


def write_gguf(model: Gemma3, path: str | os.PathLike, *, vocab=None, qtype=None) -> Path:
    """Write ``model`` as a gemma3 GGUF with the real file's tensor names and metadata keys.

    ``vocab``: (tokens, scores, types), default ``tiny_vocab(cfg.vocab_size)``. ``qtype``: a
    ``gguf.GGMLQuantizationType`` for the 2-D weights (default F32: exact round trip); norms stay F32.
    See the module example.
    """
    cfg = model.config
    tokens, scores, types = vocab if vocab is not None else tiny_vocab(cfg.vocab_size)
    if len(tokens) != cfg.vocab_size:
        raise ValueError(f"vocab has {len(tokens)} tokens, model has {cfg.vocab_size}")
    w = gguf.GGUFWriter(str(path), ARCH)
    w.add_type("model")
    w.add_name("qlab tiny gemma3")
    w.add_context_length(cfg.context_length)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base_global)
    w.add_sliding_window(cfg.sliding_window)
    w.add_head_count_kv(cfg.n_kv_heads)
    defaults = Gemma3Config()
    if cfg.rope_base_local != defaults.rope_base_local:
        w.add_rope_freq_base_swa(cfg.rope_base_local)
    if cfg.sliding_window_pattern != defaults.sliding_window_pattern:
        w.add_sliding_window_pattern([cfg.is_local(i) for i in range(cfg.n_layers)])
    if cfg.query_pre_attn_scalar != cfg.head_dim:
        w.add_attention_scale(cfg.query_scale)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(list(tokens))
    w.add_token_scores([float(s) for s in scores])
    w.add_token_types([int(t) for t in types])
    w.add_bos_token_id(cfg.bos_id)
    w.add_eos_token_id(cfg.eos_id)
    w.add_unk_token_id(3)
    w.add_pad_token_id(cfg.pad_id)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)
    for name, arr in sorted(model_weights(model).items()):
        if qtype is None or qtype == gguf.GGMLQuantizationType.F32 or arr.ndim == 1:
            w.add_tensor(name, arr)
        else:
            w.add_tensor(name, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
