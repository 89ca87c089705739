"""Text corpora from Debian packages, and character/byte-level token splits.

* Jane Austen's six novels: Debian ``r-cran-janeaustenr`` (R lazy-load DB, parsed with PyPI ``rdata``;
  ``make data`` unpacks the .deb without installing R).
* King James Bible: Debian ``bible-kjv`` (dumped once with ``bible -f``, cached under ``~/.cache/qlab``).
* fortunes: Debian ``fortunes`` (labelled by category, e.g. for a classification probe).

Example:
    >>> from qlab.data import load_austen, char_splits
    >>> corpus = char_splits(load_austen("prideprejudice"), val_frac=0.05, test_frac=0.05)
    >>> corpus.decode(corpus.encode("It is a truth"))
    'It is a truth'
"""

from __future__ import annotations

import bz2
import dataclasses
import functools
import lzma
import os
import pathlib
import shutil
import struct
import subprocess
import zlib

import numpy as np

__all__ = [
    "AUSTEN_NOVELS",
    "AUSTEN_INSTALL",
    "KJV_INSTALL",
    "FORTUNES_INSTALL",
    "cache_dir",
    "load_austen",
    "load_kjv",
    "load_fortunes",
    "fortune_topics",
    "load_text",
    "CharCorpus",
    "char_splits",
]

#: The six novels, in publication order, by their janeaustenr names.
AUSTEN_NOVELS = (
    "sensesensibility",
    "prideprejudice",
    "mansfieldpark",
    "emma",
    "northangerabbey",
    "persuasion",
)
AUSTEN_INSTALL = (
    "`make data` (runs: apt-get download r-cran-janeaustenr && dpkg-deb -x r-cran-janeaustenr_*.deb "
    "~/.cache/qlab/debian), or apt-get install r-cran-janeaustenr"
)
KJV_INSTALL = "apt-get install bible-kjv (or `make data`)"
FORTUNES_INSTALL = "apt-get install fortunes (or `make data`)"
FORTUNES_DEFAULT_DIR = "/usr/share/games/fortunes"


def cache_dir() -> pathlib.Path:
    """qlab's cache folder: ``$QLAB_CACHE_DIR`` or ``~/.cache/qlab``.

    Example:
        >>> (cache_dir() / "kjv.txt").name
        'kjv.txt'
    """
    return pathlib.Path(os.environ.get("QLAB_CACHE_DIR", pathlib.Path.home() / ".cache" / "qlab"))


# --------------------------------------------------------------------------- Jane Austen


def _austen_dirs() -> list[pathlib.Path]:
    dirs = []
    if "QLAB_JANEAUSTENR_DIR" in os.environ:
        dirs.append(pathlib.Path(os.environ["QLAB_JANEAUSTENR_DIR"]))
    rel = pathlib.Path("usr/lib/R/site-library/janeaustenr/data")
    dirs.append(cache_dir() / "debian" / rel)
    dirs.append(pathlib.Path("/") / rel)
    return dirs


def _read_lazyload_db(directory: pathlib.Path, name: str = "Rdata") -> dict[str, object]:
    """Read every object of an R lazy-load database (``<name>.rdx`` index + ``<name>.rdb`` blobs)."""
    import rdata  # deferred: only the Austen loader reads R data

    def parse(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    index = parse((directory / f"{name}.rdx").read_bytes())
    blob = (directory / f"{name}.rdb").read_bytes()
    compressed = np.asarray(index["compressed"]).ravel()[0]
    out = {}
    for var, (offset, length) in index["variables"].items():
        chunk = blob[int(offset) : int(offset) + int(length)]
        (size,) = struct.unpack(">I", chunk[:4])
        if compressed is True or compressed == 1:  # R's compress=TRUE: zlib, no type byte
            raw = zlib.decompress(chunk[4:])
        else:  # compress=2/3: a type byte, then the stream
            kind, body = chunk[4:5], chunk[5:]
            if kind == b"Z":
                raw = lzma.decompress(body)
            elif kind == b"2":
                raw = bz2.decompress(body)
            elif kind == b"1":
                raw = zlib.decompress(body)
            else:
                raw = body
        if len(raw) != size:
            raise ValueError(f"{directory}/{name}.rdb: object {var} is {len(raw)} bytes, index says {size}")
        out[str(var)] = parse(raw)
    return out


@functools.lru_cache(maxsize=None)
def _austen_lines() -> dict[str, tuple[str, ...]]:
    searched = _austen_dirs()
    for d in searched:
        if (d / "Rdata.rdx").is_file() and (d / "Rdata.rdb").is_file():
            objs = _read_lazyload_db(d)
            return {
                k: tuple("" if (s is None or (isinstance(s, float) and np.isnan(s))) else str(s) for s in v)
                for k, v in objs.items()
                if k in AUSTEN_NOVELS
            }
    raise FileNotFoundError(
        "Jane Austen's novels (janeaustenr Rdata.rdx/.rdb) not found in "
        + ", ".join(map(str, searched))
        + f". Install with: {AUSTEN_INSTALL}; or set QLAB_JANEAUSTENR_DIR to the package's data folder."
    )


def load_austen(novel: str | None = None) -> str:
    """The text of one Austen novel (janeaustenr name, e.g. ``"emma"``), or all six joined.

    With ``novel=None`` the six novels are joined in publication order (see ``AUSTEN_NOVELS``),
    separated by blank lines. Lines are joined with ``"\\n"``.

    Example:
        >>> text = load_austen("prideprejudice")
        >>> "It is a truth universally acknowledged" in text
        True
    """
    lines = _austen_lines()
    if novel is None:
        return "\n\n\n".join("\n".join(lines[n]) for n in AUSTEN_NOVELS)
    key = novel.lower().replace(" ", "").replace("_", "").replace("and", "")
    if key not in lines:
        raise ValueError(f"unknown novel {novel!r}; choose from {AUSTEN_NOVELS}")
    return "\n".join(lines[key])


# --------------------------------------------------------------------------- King James Bible


def load_kjv() -> str:
    """The King James Bible, one verse a line (``"Ge1:1 In the beginning God created ..."``).

    Dumped once with ``bible -f gen1:1-rev22:21`` (Debian ``bible-kjv``) and cached as
    ``~/.cache/qlab/kjv.txt``.

    Example:
        >>> text = load_kjv()
        >>> "In the beginning God created the heaven and the earth." in text
        True
    """
    path = cache_dir() / "kjv.txt"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    exe = shutil.which("bible")
    if exe is None:
        raise FileNotFoundError(f"the `bible` program (King James Bible) is missing. Install with: {KJV_INSTALL}")
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    proc = subprocess.run(
        [exe, "-f", "gen1:1-rev22:21"], capture_output=True, env=env, check=False, stdin=subprocess.DEVNULL
    )
    text = proc.stdout.decode("utf-8", errors="replace")
    if proc.returncode != 0 or "Rev22:21" not in text:
        raise RuntimeError(
            f"`bible -f gen1:1-rev22:21` failed (rc={proc.returncode}): {proc.stderr.decode()[:500]!r}. "
            f"Reinstall with: {KJV_INSTALL}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return text


# --------------------------------------------------------------------------- fortunes


def load_fortunes(directory: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """All fortunes as ``(category, text)`` pairs, category = the file name (e.g. ``"science"``).

    Reads ``/usr/share/games/fortunes/<category>`` (Debian ``fortunes``; override with
    ``$QLAB_FORTUNES_DIR`` or ``directory``), skipping ``.dat``/``.u8`` files and empty entries.
    Entries are split on lines holding a single ``%``.

    Example:
        >>> pairs = load_fortunes()
        >>> len({c for c, _ in pairs}) > 20
        True
    """
    d = pathlib.Path(directory or os.environ.get("QLAB_FORTUNES_DIR", FORTUNES_DEFAULT_DIR))
    files = (
        sorted(p for p in d.iterdir() if p.is_file() and not p.is_symlink() and p.suffix not in (".dat", ".u8"))
        if d.is_dir()
        else []
    )
    if not files:
        raise FileNotFoundError(f"no fortune files in {d}. Install with: {FORTUNES_INSTALL}")
    out = []
    for p in files:
        text = p.read_bytes().decode("utf-8", errors="replace").replace("\r\n", "\n")
        for entry in ("\n" + text).split("\n%\n"):
            entry = entry.strip("\n")
            if entry.strip() and entry.strip() != "%":
                out.append((p.name, entry))
    return out


def fortune_topics(n_calib: int, n_eval: int, *, topics: int = 8, max_chars: int = 600, seed: int = 0,
                   directory: str | os.PathLike | None = None):
    """A seeded split of the fortunes of the ``topics`` largest categories (entries under ``max_chars``), for
    sentence-embedding studies: ``(calib_texts, eval_texts, eval_labels, topic_names)``, where ``eval_labels``
    index ``topic_names``. The first ``n_calib`` entries of one permutation calibrate, the next ``n_eval``
    evaluate (a linear probe on their embeddings measures what a model keeps of the topic).

    Example:
        >>> calib, texts, labels, names = fortune_topics(4, 6, topics=3)
        >>> len(calib), len(texts), labels.shape, len(names), int(labels.max()) < 3
        (4, 6, (6,), 3, True)
    """
    pairs = [(c, t) for c, t in load_fortunes(directory) if len(t) < max_chars]
    sizes: dict[str, int] = {}
    for c, _ in pairs:
        sizes[c] = sizes.get(c, 0) + 1
    names = sorted(sizes, key=lambda c: -sizes[c])[:topics]
    pairs = [(c, t) for c, t in pairs if c in names]
    order = np.random.default_rng(seed).permutation(len(pairs))
    pairs = [pairs[i] for i in order]
    ev = pairs[n_calib:n_calib + n_eval]
    labels = np.array([names.index(c) for c, _ in ev], np.int64)
    return [t for _, t in pairs[:n_calib]], [t for _, t in ev], labels, names


def load_text(name: str) -> str:
    """A corpus by name, for configs: ``"austen"``, an Austen novel name, ``"kjv"`` or ``"fortunes"``.

    ``"fortunes"`` joins all entries with ``"\\n%\\n"``.

    Example:
        >>> load_text("emma")[:4]
        'EMMA'
    """
    key = name.lower()
    if key in ("austen", "janeausten", "jane_austen"):
        return load_austen()
    if key in ("kjv", "bible", "king_james"):
        return load_kjv()
    if key == "fortunes":
        return "\n%\n".join(t for _, t in load_fortunes())
    return load_austen(key)


# --------------------------------------------------------------------------- tokens


@dataclasses.dataclass(frozen=True, eq=False)
class CharCorpus:
    """Character- or byte-level token splits of a text, with the vocabulary.

    ``train``/``val``/``test`` are contiguous int32 token arrays (in that order in the text).
    ``vocab`` is a tuple of characters (``level="char"``) or of the 256 byte values (``level="byte"``).

    Example:
        >>> c = char_splits("hello world, hello there", val_frac=0.25, test_frac=0.25)
        >>> c.vocab_size, len(c.train) + len(c.val) + len(c.test)
        (10, 24)
    """

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    vocab: tuple
    level: str = "char"

    @property
    def vocab_size(self) -> int:
        """Number of distinct tokens (256 for bytes).

        Example:
            >>> char_splits("abca").vocab_size
            3
        """
        return len(self.vocab)

    @functools.cached_property
    def _index(self) -> dict:
        return {c: i for i, c in enumerate(self.vocab)}

    def encode(self, text: str) -> np.ndarray:
        """Text -> int32 tokens (raises ``KeyError`` on a character outside the vocabulary).

        Example:
            >>> char_splits("abc").encode("cab").tolist()
            [2, 0, 1]
        """
        if self.level == "byte":
            return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
        idx = self._index
        return np.array([idx[c] for c in text], dtype=np.int32)

    def decode(self, tokens) -> str:
        """Tokens -> text.

        Example:
            >>> c = char_splits("abc", level="byte")
            >>> c.decode(c.encode("héllo"))
            'héllo'
        """
        tokens = np.asarray(tokens).ravel().tolist()
        if self.level == "byte":
            return bytes(tokens).decode("utf-8", errors="replace")
        return "".join(self.vocab[t] for t in tokens)


def char_splits(text: str, val_frac: float = 0.05, test_frac: float = 0.05, level: str = "char") -> CharCorpus:
    """Tokenize ``text`` per character (vocabulary = sorted distinct characters) or per UTF-8 byte,
    and cut it into contiguous train / validation / test parts (validation and test at the end).

    Example:
        >>> c = char_splits(load_austen("emma"), val_frac=0.1, test_frac=0.1)
        >>> round(len(c.val) / (len(c.train) + len(c.val) + len(c.test)), 2)
        0.1
    """
    if level == "char":
        vocab = tuple(sorted(set(text)))
        lut = {c: i for i, c in enumerate(vocab)}
        if max(map(ord, vocab), default=0) < 1 << 16:
            codes = np.frombuffer(text.encode("utf-16-le"), np.uint16) if text else np.zeros(0, np.uint16)
            table = np.zeros(1 << 16, np.int32)
            for c, i in lut.items():
                table[ord(c)] = i
            tokens = table[codes]
        else:
            tokens = np.array([lut[c] for c in text], dtype=np.int32)
    elif level == "byte":
        vocab = tuple(range(256))
        tokens = np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    else:
        raise ValueError(f"level must be 'char' or 'byte', got {level!r}")
    if not (0 <= val_frac and 0 <= test_frac and val_frac + test_frac < 1):
        raise ValueError("need 0 <= val_frac, test_frac and val_frac + test_frac < 1")
    n = len(tokens)
    n_val, n_test = int(round(n * val_frac)), int(round(n * test_frac))
    n_train = n - n_val - n_test
    tokens = tokens.astype(np.int32)
    return CharCorpus(
        train=tokens[:n_train],
        val=tokens[n_train : n_train + n_val],
        test=tokens[n_train + n_val :],
        vocab=vocab,
        level=level,
    )
