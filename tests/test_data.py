"""Tests for nnlab.data: IDX files, image/text/tabular loaders and their error messages."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from nnlab.data import (
    ByteTokenizer,
    CharTokenizer,
    get_lm_batch,
    load_images,
    load_tabular,
    load_text,
    read_idx,
    tokenizer_from_json,
    write_idx,
)
from nnlab.errors import DataError, NnlabError

FASHION_TRAIN = "/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"
SHAKESPEARE = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, NnlabError)
    return msg


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_idx_round_trip(tmp_path, compress, dtype):
    a = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype) if dtype != np.uint8 \
        else np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    p = tmp_path / "a.idx"  # no .gz suffix even when compressed: detection is by content
    write_idx(p, a, gzip=compress)
    assert (p.read_bytes()[:2] == b"\x1f\x8b") == compress
    b = read_idx(p)
    assert b.dtype == a.dtype and b.shape == a.shape and np.array_equal(a, b)
    b[0, 0, 0] = 1  # writable, so torch.from_numpy is happy


def test_idx_missing_file(tmp_path):
    with pytest.raises(DataError) as e:
        read_idx(tmp_path / "nope")
    assert "nope: no such file" in one_line(e)


def test_idx_wrong_magic(tmp_path):
    p = tmp_path / "train-images-idx3-ubyte.gz"
    p.write_bytes(gzip.compress(b"\x00" * 32))
    with pytest.raises(DataError) as e:
        read_idx(p, dtype="uint8", ndim=3)
    msg = one_line(e)
    assert str(p) in msg and "wrong IDX magic number 0x00000000" in msg and "0x00000803" in msg
    p.write_bytes(b"<html>not idx</html>")
    with pytest.raises(DataError, match="wrong IDX magic number"):
        read_idx(p)


def test_idx_wrong_kind_is_rejected(tmp_path):
    p = tmp_path / "labels"
    write_idx(p, np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="expected 0x00000803 for uint8 images"):
        read_idx(p, dtype="uint8", ndim=3)


@pytest.mark.parametrize("compress", [False, True])
def test_idx_truncated(tmp_path, compress):
    p = tmp_path / "x"
    write_idx(p, np.ones((4, 5, 5), np.uint8))
    raw = p.read_bytes()[:-10]
    p.write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert "truncated: expected 100 bytes of data, found 90" in one_line(e)


def test_idx_corrupt_gzip(tmp_path):
    p = tmp_path / "x.gz"
    write_idx(p, np.ones((50, 5, 5), np.uint8), gzip=True)
    p.write_bytes(p.read_bytes()[:20])  # cut the compressed stream
    with pytest.raises(DataError) as e:
        read_idx(p)
    assert "corrupt gzip" in one_line(e)


# ---------------------------------------------------------------- images


def make_mnist_dir(d: Path, n_train=6, n_test=4, n_labels=None, bad_label=False, compress=True):
    rng = np.random.default_rng(0)
    d.mkdir(exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n_labels or n).astype(np.uint8)
        if bad_label:
            labels[1] = 12
        ext = ".gz" if compress else ""
        write_idx(d / f"{split}-images-idx3-ubyte{ext}", rng.integers(0, 256, (n, 28, 28)).astype(np.uint8), compress)
        write_idx(d / f"{split}-labels-idx1-ubyte{ext}", labels, compress)
    return d


@pytest.mark.parametrize("compress", [False, True])
def test_load_idx_images(tmp_path, compress):
    d = load_images("mnist", dir=str(make_mnist_dir(tmp_path / "m", compress=compress)))
    assert d.x_train.shape == (6, 1, 28, 28) and d.x_test.shape == (4, 1, 28, 28)
    assert d.x_train.dtype == torch.uint8 and d.y_train.dtype == torch.int64
    pix = d.x_train.double() / 255
    assert d.mean == pytest.approx(pix.mean().item()) and d.std == pytest.approx(pix.std(unbiased=False).item())
    z = d.normalize(d.x_train)
    assert z.dtype == torch.float32 and abs(z.mean().item()) < 1e-5 and z.std().item() == pytest.approx(1, abs=0.01)
    small = load_images("mnist", dir=str(tmp_path / "m"), limit=2, image_size=14)
    assert small.x_train.shape == (2, 1, 14, 14) and small.x_test.shape == (2, 1, 14, 14)


def test_image_label_count_mismatch(tmp_path):
    d = make_mnist_dir(tmp_path / "m", n_labels=5)
    with pytest.raises(DataError) as e:
        load_images("mnist", dir=str(d))
    msg = one_line(e)
    assert "train-images-idx3-ubyte" in msg and "train-labels-idx1-ubyte" in msg and "6 images" in msg and "5 labels" in msg


def test_label_out_of_range(tmp_path):
    with pytest.raises(DataError, match="label 12 at index 1 is outside 0..9"):
        load_images("mnist", dir=str(make_mnist_dir(tmp_path / "m", bad_label=True)))


def test_missing_image_files(tmp_path):
    with pytest.raises(DataError) as e:
        load_images("fashion-mnist", dir=str(tmp_path / "absent"))
    assert "no such directory" in one_line(e) and "apt-get install dataset-fashion-mnist" in str(e.value)
    with pytest.raises(DataError) as e:
        load_images("fashion-mnist", dir=str(tmp_path))
    assert "train-images-idx3-ubyte" in one_line(e) and "no such file" in str(e.value)
    with pytest.raises(DataError, match="data.dir"):
        load_images("mnist")
    with pytest.raises(DataError, match="unknown image data set"):
        load_images("cifar")


def test_digits_shapes_and_resize():
    d = load_images("digits", seed=0)
    assert d.x_train.shape == (1437, 1, 8, 8) and d.x_test.shape == (360, 1, 8, 8)
    assert d.x_train.dtype == torch.uint8 and int(d.x_train.max()) == 255
    assert d.classes == [str(i) for i in range(10)] and set(d.y_test.tolist()) == set(range(10))
    again = load_images("digits", seed=0)
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.y_test, again.y_test)
    big = load_images("digits", image_size=28, limit=50)
    assert big.x_train.shape == (50, 1, 28, 28) and big.x_test.shape == (50, 1, 28, 28)
    assert big.x_train.dtype == torch.uint8 and big.x_train.float().mean() > 0


def test_real_fashion_mnist():
    if not os.path.exists(FASHION_TRAIN):
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)")
    d = load_images("fashion-mnist")
    assert d.x_train.shape == (60000, 1, 28, 28) and d.x_test.shape == (10000, 1, 28, 28)
    assert d.mean == pytest.approx(0.286, abs=0.001) and d.std == pytest.approx(0.353, abs=0.001)
    assert d.classes[0] == "T-shirt/top" and d.classes[9] == "Ankle boot"
    assert torch.bincount(d.y_train).tolist() == [6000] * 10


# ---------------------------------------------------------------- text


def test_char_tokenizer_round_trip():
    tok = CharTokenizer.from_text("hello world")
    assert tok.vocab_size == 8 and tok.chars == " dehlorw"
    assert tok.decode(tok.encode("world hello")) == "world hello"
    again = tokenizer_from_json(tok.to_json())
    assert again == tok and tok.to_json() == {"kind": "char", "chars": " dehlorw"}
    with pytest.raises(DataError) as e:
        tok.encode("hex")
    assert "'x'" in one_line(e)
    with pytest.raises(DataError):
        tok.decode([99])


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "naïve café — 日本語 🙂"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256 and tok.vocab_size == 256
    assert tok.decode(ids) == text
    assert tok.decode(ids[:-1]).endswith("\ufffd")  # a cut multi-byte character is replaced, not raised
    assert isinstance(tokenizer_from_json(tok.to_json()), ByteTokenizer)
    with pytest.raises(DataError, match="unknown tokenizer kind"):
        tokenizer_from_json({"kind": "bpe"})


def test_load_text_split(tmp_path):
    p = tmp_path / "t.txt"
    text = "abcdefghij" * 10 + "xyz"  # 103 characters; 'xyz' lands only in validation
    p.write_text(text, encoding="utf-8")
    d = load_text(p)
    assert len(d.train) == 92 and len(d.val) == 11 and d.train.dtype == torch.int64
    assert d.tokenizer.vocab_size == 13  # the vocabulary covers the whole text
    assert d.tokenizer.decode(d.train.tolist()) + d.tokenizer.decode(d.val.tolist()) == text
    b = load_text(p, tokenizer="byte", limit_chars=50)
    assert len(b.train) == 45 and len(b.val) == 5 and b.tokenizer.vocab_size == 256


def test_load_text_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_text(tmp_path / "none.txt")
    p = tmp_path / "t.txt"
    p.write_text("  \n\t ")
    with pytest.raises(DataError) as e:
        load_text(p)
    assert "empty text" in one_line(e)
    p.write_bytes(b"hello \xff world")
    with pytest.raises(DataError) as e:
        load_text(p)
    assert "not valid UTF-8" in one_line(e) and "byte offset 6" in str(e.value)
    p.write_text("abc")
    with pytest.raises(DataError, match="too short to split"):
        load_text(p)


def test_get_lm_batch_shifts_by_one():
    data = torch.arange(100, dtype=torch.int64)
    x, y = get_lm_batch(data, 4, 8, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 8) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1) and int(y.max()) <= 99
    x2, _ = get_lm_batch(data, 4, 8, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)  # same generator state, same batch
    x, y = get_lm_batch(torch.arange(9), 16, 8, torch.Generator())  # exactly block_size + 1 tokens
    assert torch.equal(x[0], torch.arange(8)) and torch.equal(y[0], torch.arange(1, 9))
    with pytest.raises(DataError, match="too few"):
        get_lm_batch(torch.arange(8), 2, 8, torch.Generator())


def test_tiny_shakespeare():
    if not SHAKESPEARE.exists():
        pytest.skip(f"{SHAKESPEARE} not present")
    d = load_text(SHAKESPEARE)
    assert len(d.train) + len(d.val) == 1_115_394 and len(d.train) == int(0.9 * 1_115_394)
    assert d.tokenizer.vocab_size == 65
    assert d.tokenizer.decode(d.train[:14].tolist()) == "First Citizen:"


# ---------------------------------------------------------------- tabular


def test_diabetes_split_and_stats():
    d = load_tabular("diabetes", seed=0)
    assert d.x_train.shape == (354, 10) and d.x_test.shape == (88, 10) and d.y_train.shape == (354,)
    assert d.x_train.dtype == torch.float32 and d.feature_names[0] == "age" and d.target == "target"
    assert torch.allclose(d.x_mean, d.x_train.mean(0), rtol=1e-5)
    assert torch.allclose(d.x_std, d.x_train.std(0, unbiased=False), rtol=1e-4)
    assert d.y_mean == pytest.approx(d.y_train.mean().item(), rel=1e-5)
    z = d.normalize_x(d.x_train)
    assert torch.allclose(z.mean(0), torch.zeros(10), atol=1e-4)
    assert torch.allclose(d.denormalize_y(d.normalize_y(d.y_test)), d.y_test, atol=1e-3)
    assert torch.equal(load_tabular(seed=0).y_test, d.y_test) and not torch.equal(load_tabular(seed=1).y_test, d.y_test)


def test_csv(tmp_path):
    p = tmp_path / "t.csv"
    rows = "\n".join(f"{i},{2 * i},{i % 3}" for i in range(10))
    p.write_text(f"a,b,y\n{rows}\n")
    d = load_tabular("csv", path=str(p), target="b", test_frac=0.2)
    assert d.feature_names == ["a", "y"] and d.target == "b"
    assert d.x_train.shape == (8, 2) and d.x_test.shape == (2, 2)
    assert torch.equal(d.y_train, 2 * d.x_train[:, 0])  # rows stay intact through the shuffle
    assert load_tabular("csv", path=str(p)).target == "y"  # default: the last column


def test_csv_errors(tmp_path):
    p = tmp_path / "t.csv"
    with pytest.raises(DataError, match="no such file"):
        load_tabular("csv", path=str(p))
    p.write_text("")
    with pytest.raises(DataError, match="empty file"):
        load_tabular("csv", path=str(p))
    p.write_text("a,b,y\n1,2,3\n4,oops,6\n7,8,9\n")
    with pytest.raises(DataError) as e:
        load_tabular("csv", path=str(p), target="y")
    msg = one_line(e)
    assert str(p) in msg and "row 3" in msg and "'b'" in msg and "'oops'" in msg
    with pytest.raises(DataError) as e:
        load_tabular("csv", path=str(p), target="price")
    assert "'price'" in one_line(e) and "columns: a, b, y" in str(e.value)


def test_task_arrays_are_what_the_model_sees(fmnist_dir):
    """Baselines fit on Task.arrays(): the same split and preprocessing the deep model trains on."""
    from nnlab.config import load_config
    from nnlab.tasks import make_task

    task = make_task(load_config("seed-cnn", overrides=[f"data.dir={fmnist_dir}"]))
    x_tr, y_tr, x_te, y_te = task.arrays()
    assert x_tr.shape == (len(task.x_train), 28 * 28) and x_te.shape == (len(task.x_test), 28 * 28)
    np.testing.assert_array_equal(x_tr[3], task.x_train[3].flatten().numpy())  # normalised, not raw pixels
    assert abs(float(x_tr.mean())) < 1 and set(np.unique(y_tr)) <= set(range(10)) and len(y_te) == len(x_te)

    task = make_task(load_config("mlp-regression"))
    x_tr, y_tr, x_te, y_te = task.arrays()
    assert not task.classification and x_tr.shape[1] == 10
    np.testing.assert_allclose(x_tr.mean(0), 0, atol=1e-5)  # standardised on the training split
    np.testing.assert_array_equal(y_te, task.data.y_test.numpy())  # targets in their own units
