"""Tests for qlab.data: real datasets from Debian/PyPI packages, splits, batch iterators."""

import gzip

import numpy as np
import pytest

from qlab import data
from qlab.data import text as text_mod


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def fashion_test():
    return data.load_fashion_mnist("test")


def test_fashion_mnist_train_shapes_and_counts():
    x, y = data.load_fashion_mnist("train")
    assert x.shape == (60000, 28, 28, 1) and x.dtype == np.float32
    assert y.shape == (60000,) and y.dtype == np.int32
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert np.bincount(y).tolist() == [6000] * 10
    # First labels of the official training file.
    assert y[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]


def test_fashion_mnist_test_split(fashion_test):
    x, y = fashion_test
    assert x.shape == (10000, 28, 28, 1) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [1000] * 10
    # Pixels are k/255: scaling is exact.
    np.testing.assert_allclose(np.round(x[:50] * 255), x[:50] * 255, atol=1e-4)


def test_fashion_mnist_dataset_val_carved_from_train():
    ds = data.fashion_mnist_dataset(val_size=5000, seed=0)
    assert (len(ds.train), len(ds.val), len(ds.test)) == (55000, 5000, 10000)
    assert ds.image_shape == (28, 28, 1) and ds.num_classes == 10
    full_x, _ = data.load_fashion_mnist("train")
    # train + val is a partition of the official train set: pixel sums add up.
    assert np.isclose(ds.train.images.sum() + ds.val.images.sum(), full_x.sum(), rtol=1e-5)
    other = data.fashion_mnist_dataset(val_size=5000, seed=1)
    assert not np.array_equal(ds.val.labels, other.val.labels)


def test_fashion_mnist_missing_names_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_FASHION_MNIST_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        data.load_fashion_mnist("train")
    with pytest.raises(ValueError):
        data.load_fashion_mnist("validation")


def test_fashion_mnist_env_override_reads_plain_idx(tmp_path, monkeypatch):
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    labels = np.array([3, 7], np.uint8)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(
        bytes([0, 0, 8, 3]) + np.array([2, 28, 28], ">u4").tobytes() + images.tobytes()
    )
    with gzip.open(tmp_path / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + np.array([2], ">u4").tobytes() + labels.tobytes())
    monkeypatch.setenv("QLAB_FASHION_MNIST_DIR", str(tmp_path))
    x, y = data.load_fashion_mnist("test")
    assert y.tolist() == [3, 7]
    np.testing.assert_allclose(x[..., 0], images / 255.0, rtol=1e-6)


def test_read_idx_rejects_truncated(tmp_path):
    p = tmp_path / "bad-idx"
    p.write_bytes(bytes([0, 0, 8, 1]) + np.array([10], ">u4").tobytes() + b"\x01\x02")
    with pytest.raises(ValueError, match="truncated"):
        data.read_idx(p)


def test_digits_splits_deterministic_and_disjoint():
    a, b, c = data.digits_dataset(seed=0), data.digits_dataset(seed=0), data.digits_dataset(seed=1)
    assert len(a.train) + len(a.val) + len(a.test) == 1797
    assert a.image_shape == (8, 8, 1)
    for split in ("train", "val", "test"):
        np.testing.assert_array_equal(getattr(a, split).images, getattr(b, split).images)
    assert not np.array_equal(a.test.labels, c.test.labels)
    x = a.train.images
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    assert a.train.labels.dtype == np.int32 and set(a.train.labels.tolist()) == set(range(10))
    # Disjoint: no test image is also a train image (digits has very few exact duplicates).
    flat = lambda s: {r.tobytes() for r in s.images.reshape(len(s), -1)}
    assert len(flat(a.train) & flat(a.test)) <= 2
    xt, yt = data.load_digits("test", seed=0)
    np.testing.assert_array_equal(yt, a.test.labels)
    assert data.image_dataset("digits", seed=1).test.labels.tolist() == c.test.labels.tolist()
    with pytest.raises(ValueError):
        data.image_dataset("cifar10")


# --------------------------------------------------------------------------- text


def test_austen_novels():
    pp = data.load_austen("prideprejudice")
    assert "It is a truth universally acknowledged" in pp
    assert data.load_austen("Pride and Prejudice") == pp
    allsix = data.load_austen()
    assert 3_900_000 < len(allsix) < 4_200_000
    for start in ("SENSE AND SENSIBILITY", "EMMA", "MANSFIELD PARK", "Persuasion", "NORTHANGER ABBEY"):
        assert start in allsix
    assert allsix.startswith("SENSE AND SENSIBILITY")
    with pytest.raises(ValueError, match="unknown novel"):
        data.load_austen("dracula")


def test_austen_missing_names_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(text_mod, "_austen_dirs", lambda: [tmp_path])
    text_mod._austen_lines.cache_clear()
    try:
        with pytest.raises(FileNotFoundError, match="apt-get download r-cran-janeaustenr"):
            data.load_austen()
    finally:
        text_mod._austen_lines.cache_clear()


def test_kjv_dump_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_CACHE_DIR", str(tmp_path))
    kjv = data.load_kjv()
    assert kjv.startswith("Ge1:1 In the beginning God created the heaven and the earth.")
    assert "Rev22:21 The grace of our Lord Jesus Christ be with you all. Amen." in kjv
    assert 4_300_000 < len(kjv) < 4_500_000 and kjv.count("\n") == 31102
    assert (tmp_path / "kjv.txt").read_text() == kjv


def test_kjv_missing_names_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install bible-kjv"):
        data.load_kjv()


def test_fortunes_categories():
    pairs = data.load_fortunes()
    cats = {c for c, _ in pairs}
    assert len(cats) >= 40 and "science" in cats and "computers" in cats
    assert not any(c.endswith((".dat", ".u8")) for c in cats)
    assert len(pairs) > 10000
    assert all(t.strip() and "\n%\n" not in t for _, t in pairs)


def test_fortunes_missing_names_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("QLAB_FORTUNES_DIR", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        data.load_fortunes()


def test_fortunes_parsing(tmp_path):
    (tmp_path / "tiny").write_text("one\nline\n%\ntwo\n%\n")
    (tmp_path / "tiny.dat").write_bytes(b"\x00\x01")
    assert data.load_fortunes(tmp_path) == [("tiny", "one\nline"), ("tiny", "two")]


def test_char_splits_roundtrip_and_contiguous():
    text = data.load_austen("persuasion")
    c = data.char_splits(text, val_frac=0.1, test_frac=0.05)
    assert list(c.vocab) == sorted(set(text))
    assert c.train.dtype == np.int32
    assert len(c.train) + len(c.val) + len(c.test) == len(text)
    assert abs(len(c.val) - 0.1 * len(text)) <= 1 and abs(len(c.test) - 0.05 * len(text)) <= 1
    assert c.decode(np.concatenate([c.train, c.val, c.test])) == text
    np.testing.assert_array_equal(c.encode(text[:1000]), c.train[:1000])


def test_char_splits_byte_level_and_unicode():
    text = "naïve café — ok 𝄞"
    c = data.char_splits(text, val_frac=0.0, test_frac=0.0, level="byte")
    assert c.vocab_size == 256 and len(c.train) == len(text.encode("utf-8"))
    assert c.decode(c.train) == text
    ch = data.char_splits(text, val_frac=0.0, test_frac=0.0)
    assert ch.decode(ch.train) == text and len(ch.train) == len(text)
    with pytest.raises(ValueError):
        data.char_splits(text, level="word")


# --------------------------------------------------------------------------- batches


def test_batches_deterministic_epochs_cover_once():
    x = np.arange(100)
    y = x * 2
    a = list(data.batches((x, y), 10, seed=3, epochs=2))
    b = list(data.batches((x, y), 10, seed=3, epochs=2))
    assert len(a) == 20
    for (xa, ya), (xb, yb) in zip(a, b):
        np.testing.assert_array_equal(xa, xb)
        np.testing.assert_array_equal(ya, xa * 2)
    first_epoch = np.concatenate([xb for xb, _ in a[:10]])
    assert sorted(first_epoch.tolist()) == list(range(100))
    assert not np.array_equal(first_epoch, np.arange(100))  # shuffled
    assert not np.array_equal(first_epoch, np.concatenate([xb for xb, _ in a[10:]]))  # reshuffled
    c = list(data.batches((x, y), 10, seed=4, epochs=1))
    assert not np.array_equal(c[0][0], a[0][0])


def test_batches_steps_and_remainder():
    x = np.arange(10)
    assert len(list(data.batches(x, 4, steps=7))) == 7
    assert [len(b) for b in data.batches(x, 4, drop_remainder=False)] == [4, 4, 2]
    with pytest.raises(ValueError):
        list(data.batches((x, x[:5]), 2))
    split = data.digits_dataset().val
    xb, yb = next(data.batches(split, 16))
    assert xb.shape == (16, 8, 8, 1) and yb.shape == (16,)


def test_lm_batches():
    tokens = np.arange(1000)
    bs = list(data.lm_batches(tokens, seq_len=16, batch_size=8, seed=0, steps=3))
    assert len(bs) == 3 and bs[0].shape == (8, 17) and bs[0].dtype == np.int32
    assert all((np.diff(b, axis=1) == 1).all() for b in bs)
    again = list(data.lm_batches(tokens, seq_len=16, batch_size=8, seed=0, steps=3))
    assert all(np.array_equal(a, b) for a, b in zip(bs, again))
    with pytest.raises(ValueError):
        next(data.lm_batches(np.arange(5), seq_len=16, batch_size=2))
