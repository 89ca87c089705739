"""Image classification datasets: Fashion-MNIST (Debian) and scikit-learn digits.

Nothing is downloaded at run time. Images come back as float32 in ``[0, 1]`` with a
trailing channel axis (NHWC, ready for ``nnx.Conv``), labels as int32.

Example:
    >>> from qlab.data import digits_dataset
    >>> ds = digits_dataset(seed=0)
    >>> ds.train.images.shape[1:], ds.num_classes
    ((8, 8, 1), 10)
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import pathlib
from typing import Iterator

import numpy as np

__all__ = [
    "Split",
    "ImageDataset",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_INSTALL",
    "load_fashion_mnist",
    "fashion_mnist_dataset",
    "load_digits",
    "digits_dataset",
    "image_dataset",
    "read_idx",
]

FASHION_MNIST_INSTALL = "apt-get install dataset-fashion-mnist (or `make data`)"
FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split of an image dataset: ``images`` (N, H, W, C) float32, ``labels`` (N,) int32.

    Unpacks like a tuple.

    Example:
        >>> from qlab.data import digits_dataset
        >>> x, y = digits_dataset().test
        >>> x.dtype, y.dtype
        (dtype('float32'), dtype('int32'))
    """

    images: np.ndarray
    labels: np.ndarray

    def __post_init__(self):
        if len(self.images) != len(self.labels):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def __iter__(self) -> Iterator[np.ndarray]:
        return iter((self.images, self.labels))


@dataclasses.dataclass(frozen=True, eq=False)
class ImageDataset:
    """Train/validation/test splits of a labelled image dataset.

    Example:
        >>> from qlab.data import digits_dataset
        >>> ds = digits_dataset(seed=0)
        >>> len(ds.train) + len(ds.val) + len(ds.test)
        1797
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int

    @property
    def image_shape(self) -> tuple[int, ...]:
        """Shape of one image, (H, W, C).

        Example:
            >>> from qlab.data import digits_dataset
            >>> digits_dataset().image_shape
            (8, 8, 1)
        """
        return tuple(self.train.images.shape[1:])


# --------------------------------------------------------------------------- idx files


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (the MNIST format), gzipped or not, into a numpy array.

    Example:
        >>> x = read_idx("/usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz")
        >>> x.shape, x.dtype
        ((10000,), dtype('uint8'))
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file")
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    dtype = np.dtype(dtypes[data[2]])
    ndim = data[3]
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    count = int(np.prod(shape)) if shape else 1
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"{path}: truncated idx file")
    arr = np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def _fashion_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("QLAB_FASHION_MNIST_DIR", FASHION_MNIST_DEFAULT_DIR))


def _find(directory: pathlib.Path, stem: str) -> pathlib.Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def load_fashion_mnist(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load the official Fashion-MNIST ``"train"`` (60,000) or ``"test"`` (10,000) split.

    Reads the idx files of Debian's ``dataset-fashion-mnist`` from
    ``/usr/share/datasets/fashion-mnist`` (override with ``$QLAB_FASHION_MNIST_DIR``).
    Returns ``(images, labels)``: float32 (N, 28, 28, 1) in [0, 1] and int32 (N,).

    Example:
        >>> x, y = load_fashion_mnist("test")
        >>> x.shape, y.shape, float(x.max())
        ((10000, 28, 28, 1), (10000,), 1.0)
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = _fashion_dir()
    paths = [_find(directory, stem) for stem in _FASHION_FILES[split]]
    if any(p is None for p in paths):
        raise FileNotFoundError(
            f"Fashion-MNIST {split} files not found in {directory}. "
            f"Install them with: {FASHION_MNIST_INSTALL}; or set QLAB_FASHION_MNIST_DIR "
            "to a folder holding the idx(.gz) files."
        )
    images = read_idx(paths[0])
    labels = read_idx(paths[1])
    images = (images.astype(np.float32) / 255.0)[..., None]
    return images, labels.astype(np.int32)


def _carve(n: int, sizes: tuple[int, ...], seed: int) -> list[np.ndarray]:
    """Split ``range(n)`` by a seeded permutation into parts of the given sizes (+ the rest first)."""
    perm = np.random.default_rng(seed).permutation(n)
    rest = n - sum(sizes)
    if rest < 0:
        raise ValueError(f"split sizes {sizes} exceed {n} examples")
    bounds = np.cumsum((rest,) + sizes)
    return np.split(perm, bounds[:-1])


def fashion_mnist_dataset(val_size: int = 5000, seed: int = 0) -> ImageDataset:
    """Fashion-MNIST with a validation split carved (seeded) from the official training set.

    The official test set is kept as ``test``.

    Example:
        >>> ds = fashion_mnist_dataset(val_size=5000, seed=0)
        >>> len(ds.train), len(ds.val), len(ds.test)
        (55000, 5000, 10000)
    """
    x, y = load_fashion_mnist("train")
    xt, yt = load_fashion_mnist("test")
    tr, va = _carve(len(y), (val_size,), seed)
    tr.sort(), va.sort()
    return ImageDataset(
        name="fashion_mnist",
        train=Split(x[tr], y[tr]),
        val=Split(x[va], y[va]),
        test=Split(xt, yt),
        num_classes=10,
    )


# --------------------------------------------------------------------------- digits


def digits_dataset(seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.2) -> ImageDataset:
    """scikit-learn's 1,797 8x8 digits, split train/val/test by a seeded permutation.

    Pixel values 0..16 are scaled to [0, 1]; images are (N, 8, 8, 1) float32.

    Example:
        >>> ds = digits_dataset(seed=0)
        >>> len(ds.train), len(ds.val), len(ds.test)
        (1258, 180, 359)
    """
    from sklearn.datasets import load_digits as _sk_load_digits  # deferred: scikit-learn takes ~1 s to import

    d = _sk_load_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int32)
    n = len(y)
    n_val, n_test = int(round(n * val_frac)), int(round(n * test_frac))
    tr, va, te = _carve(n, (n_val, n_test), seed)
    return ImageDataset(
        name="digits",
        train=Split(x[tr], y[tr]),
        val=Split(x[va], y[va]),
        test=Split(x[te], y[te]),
        num_classes=10,
    )


def load_digits(
    split: str = "train", seed: int = 0, val_frac: float = 0.1, test_frac: float = 0.2
) -> tuple[np.ndarray, np.ndarray]:
    """One split (``"train"``, ``"val"`` or ``"test"``) of :func:`digits_dataset` as arrays.

    Example:
        >>> x, y = load_digits("test", seed=0)
        >>> x.shape, y.dtype
        ((359, 8, 8, 1), dtype('int32'))
    """
    if split not in ("train", "val", "test"):
        raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
    return tuple(getattr(digits_dataset(seed, val_frac, test_frac), split))


def image_dataset(name: str, seed: int = 0, **kwargs) -> ImageDataset:
    """Look an image dataset up by name (``"digits"`` or ``"fashion_mnist"``), e.g. from a config.

    Example:
        >>> image_dataset("digits", seed=1).name
        'digits'
    """
    key = name.lower().replace("-", "_")
    if key == "digits":
        return digits_dataset(seed=seed, **kwargs)
    if key in ("fashion_mnist", "fashionmnist"):
        return fashion_mnist_dataset(seed=seed, **kwargs)
    raise ValueError(f"unknown image dataset {name!r}; known: 'digits', 'fashion_mnist'")
