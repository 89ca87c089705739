"""Datasets that work offline (read from Debian / PyPI packages), and deterministic batch iterators.

Images (float32 NHWC in [0, 1], int32 labels):
    ``load_fashion_mnist(split)``, ``fashion_mnist_dataset(val_size, seed)``,
    ``load_digits(split, seed)``, ``digits_dataset(seed)``, ``image_dataset(name, seed)``.
Text:
    ``load_austen(novel)``, ``load_kjv()``, ``load_fortunes()``, ``load_text(name)``,
    ``char_splits(text, val_frac, test_frac, level)`` -> ``CharCorpus``.
Batches:
    ``batches(arrays, batch_size, seed, epochs=..., steps=...)``, ``lm_batches(tokens, seq_len, batch_size, seed)``.

Example:
    >>> from qlab import data
    >>> ds = data.digits_dataset(seed=0)
    >>> x, y = next(data.batches(ds.train, batch_size=32, seed=0))
    >>> x.shape, y.shape
    ((32, 8, 8, 1), (32,))
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from .images import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_INSTALL,
    ImageDataset,
    Split,
    digits_dataset,
    fashion_mnist_dataset,
    image_dataset,
    load_digits,
    load_fashion_mnist,
    read_idx,
)
from .text import (
    AUSTEN_INSTALL,
    AUSTEN_NOVELS,
    FORTUNES_INSTALL,
    KJV_INSTALL,
    CharCorpus,
    cache_dir,
    char_splits,
    load_austen,
    load_fortunes,
    load_kjv,
    load_text,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_INSTALL",
    "ImageDataset",
    "Split",
    "digits_dataset",
    "fashion_mnist_dataset",
    "image_dataset",
    "load_digits",
    "load_fashion_mnist",
    "read_idx",
    "AUSTEN_INSTALL",
    "AUSTEN_NOVELS",
    "FORTUNES_INSTALL",
    "KJV_INSTALL",
    "CharCorpus",
    "cache_dir",
    "char_splits",
    "load_austen",
    "load_fortunes",
    "load_kjv",
    "load_text",
    "batches",
    "lm_batches",
]


def batches(
    arrays: Sequence[np.ndarray] | np.ndarray,
    batch_size: int,
    seed: int = 0,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    shuffle: bool = True,
    drop_remainder: bool = True,
) -> Iterator:
    """Deterministic minibatches of arrays that share their first axis (e.g. a ``Split``).

    Each epoch uses a fresh permutation drawn from ``numpy.random.default_rng(seed)``. Stops after
    ``steps`` batches if given (cycling epochs as needed), else after ``epochs`` epochs (default 1).
    Yields tuples of arrays, or single arrays if ``arrays`` is one array.

    Example:
        >>> import numpy as np
        >>> xs = np.arange(10)
        >>> [b.tolist() for b in batches(xs, 4, seed=0, shuffle=False)]
        [[0, 1, 2, 3], [4, 5, 6, 7]]
        >>> len(list(batches(xs, 4, seed=0, steps=5)))
        5
    """
    single = isinstance(arrays, np.ndarray) or hasattr(arrays, "__array__") and not isinstance(arrays, (tuple, list))
    arrs = [np.asarray(arrays)] if single else [np.asarray(a) for a in arrays]
    n = len(arrs[0])
    if any(len(a) != n for a in arrs):
        raise ValueError("arrays must share their first dimension")
    if batch_size <= 0:
        raise ValueError("batch_size must be positive")
    if drop_remainder and n < batch_size:
        raise ValueError(f"batch_size {batch_size} is larger than the {n} examples")
    if epochs is None and steps is None:
        epochs = 1
    rng = np.random.default_rng(seed)
    step, epoch = 0, 0
    while (steps is None or step < steps) and (epochs is None or epoch < epochs):
        order = rng.permutation(n) if shuffle else np.arange(n)
        stop = n - batch_size + 1 if drop_remainder else n
        for i in range(0, stop, batch_size):
            if steps is not None and step >= steps:
                return
            idx = order[i : i + batch_size]
            out = tuple(a[idx] for a in arrs)
            yield out[0] if single else out
            step += 1
        epoch += 1


def lm_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, seed: int = 0, *, steps: int | None = None
) -> Iterator[np.ndarray]:
    """Random windows of ``seq_len + 1`` tokens, shape (batch_size, seq_len + 1) int32, for next-token training.

    Window starts are drawn uniformly from ``numpy.random.default_rng(seed)``; endless unless ``steps``.

    Example:
        >>> import numpy as np
        >>> b = next(lm_batches(np.arange(100), seq_len=8, batch_size=4, seed=0))
        >>> b.shape, bool((np.diff(b, axis=1) == 1).all())
        ((4, 9), True)
    """
    tokens = np.asarray(tokens, dtype=np.int32)
    n_starts = len(tokens) - seq_len
    if n_starts <= 0:
        raise ValueError(f"{len(tokens)} tokens are too few for seq_len {seq_len}")
    rng = np.random.default_rng(seed)
    offsets = np.arange(seq_len + 1)
    step = 0
    while steps is None or step < steps:
        starts = rng.integers(0, n_starts, size=batch_size)
        yield tokens[starts[:, None] + offsets]
        step += 1
