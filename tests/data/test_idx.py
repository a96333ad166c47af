"""IDX reading/writing and MNIST split loading, on small synthetic files."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pytest

from dptrain.data.idx import (
    encode_idx,
    load_mnist_split,
    read_idx,
    write_idx,
)
from dptrain.errors import UsageError


def _images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


def _labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, size=(n,), dtype=np.uint8)


def _make_split(root: Path, split: str = "train", n: int = 5, *, gz: bool = False, name="MNIST"):
    raw = root / name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    prefix = "train" if split == "train" else "t10k"
    suffix = ".gz" if gz else ""
    images, labels = _images(n), _labels(n)
    write_idx(raw / f"{prefix}-images-idx3-ubyte{suffix}", images, gzip_=gz)
    write_idx(raw / f"{prefix}-labels-idx1-ubyte{suffix}", labels, gzip_=gz)
    return raw, images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_round_trip(tmp_path, gz):
    arr = _images(3)
    path = tmp_path / "x"
    write_idx(path, arr, gzip_=gz)
    assert path.read_bytes().startswith(b"\x1f\x8b") == gz
    out = read_idx(path)
    assert out.dtype == np.uint8 and out.shape == (3, 28, 28)
    np.testing.assert_array_equal(out, arr)
    assert out.flags.writeable  # torch.from_numpy warns on read-only arrays


def test_gzip_detected_by_content_not_name(tmp_path):
    arr = _labels(7)
    misnamed_gz = tmp_path / "labels"  # gzipped, no .gz
    misnamed_gz.write_bytes(gzip.compress(encode_idx(arr)))
    misnamed_raw = tmp_path / "labels.gz"  # plain, with .gz
    misnamed_raw.write_bytes(encode_idx(arr))
    np.testing.assert_array_equal(read_idx(misnamed_gz), arr)
    np.testing.assert_array_equal(read_idx(misnamed_raw), arr)


def test_header_layout_is_canonical():
    data = encode_idx(np.zeros((2, 3), dtype=np.uint8))
    assert data[:4] == b"\x00\x00\x08\x02"
    assert data[4:12] == (2).to_bytes(4, "big") + (3).to_bytes(4, "big")
    assert len(data) == 12 + 6


def test_parses_other_element_types(tmp_path):
    # Big-endian int32 payload (code 0x0C) comes back as native int32 with the right values.
    values = np.array([[1, -2], [70000, 3]], dtype=">i4")
    path = tmp_path / "i4"
    path.write_bytes(b"\x00\x00\x0c\x02" + (2).to_bytes(4, "big") * 2 + values.tobytes())
    out = read_idx(path)
    assert out.dtype == np.dtype(np.int32) and out.dtype.isnative
    np.testing.assert_array_equal(out, values)


def test_write_idx_uint8_only(tmp_path):
    with pytest.raises(TypeError):
        write_idx(tmp_path / "f", np.zeros(3, dtype=np.float32))
    assert not (tmp_path / "f").exists()


def test_write_is_atomic_and_respects_umask(tmp_path):
    path = tmp_path / "out"
    path.write_bytes(b"old")
    write_idx(path, _labels(4))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp file left behind
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def _write(tmp_path: Path, data: bytes) -> Path:
    path = tmp_path / "bad-idx"
    path.write_bytes(data)
    return path


GOOD = encode_idx(np.arange(12, dtype=np.uint8).reshape(3, 4))


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"", "not an IDX file"),
        (b"\x01\x00\x08\x01" + GOOD[4:], "not an IDX file"),
        (b"\x00\x00\x07\x02" + GOOD[4:], "unknown IDX element type 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
        (b"\x00\x00\x08\x03" + (3).to_bytes(4, "big"), "truncated IDX header"),
        (GOOD[:-1], "truncated IDX file"),
        (GOOD + b"\x00", "extra bytes"),
        # Header claims 3x5 but the payload holds 3x4: inconsistent dims.
        (
            GOOD[:8] + (5).to_bytes(4, "big") + GOOD[12:],
            "header says 3x5 uint8 = 15 payload bytes, found 12",
        ),
        (gzip.compress(GOOD)[:-10], "corrupt or truncated gzip"),
    ],
    ids=["empty", "magic", "dtype", "ndim0", "short-header", "truncated", "extra", "dims", "gzip"],
)
def test_corrupt_files(tmp_path, data, needle):
    path = _write(tmp_path, data)
    with pytest.raises(UsageError) as exc:
        read_idx(path)
    msg = str(exc.value)
    assert needle in msg
    assert str(path) in msg and "\n" not in msg


def test_truncated_message_says_expected_and_found(tmp_path):
    path = _write(tmp_path, GOOD[:-2])
    with pytest.raises(UsageError, match=r"3x4 uint8 = 12 payload bytes, found 10"):
        read_idx(path)


def test_missing_file(tmp_path):
    with pytest.raises(UsageError, match="cannot read"):
        read_idx(tmp_path / "nope")


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("split", ["train", "test"])
def test_load_split(tmp_path, gz, split):
    _, images, labels = _make_split(tmp_path, split, gz=gz)
    x, y = load_mnist_split(tmp_path, split)
    np.testing.assert_array_equal(x, images)
    np.testing.assert_array_equal(y, labels)
    assert x.dtype == y.dtype == np.uint8


def test_load_split_fashion_names(tmp_path):
    _make_split(tmp_path, "test", name="FashionMNIST")
    for name in ("FashionMNIST", "fashion-mnist"):
        x, _ = load_mnist_split(tmp_path, "test", name=name)
        assert x.shape == (5, 28, 28)
    with pytest.raises(UsageError, match="unknown dataset"):
        load_mnist_split(tmp_path, "test", name="cifar")


def test_load_split_prefers_uncompressed_but_takes_gz(tmp_path):
    raw, images, _ = _make_split(tmp_path, "train", gz=True)
    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(5, dtype=np.uint8))  # both forms
    x, y = load_mnist_split(tmp_path, "train")
    np.testing.assert_array_equal(x, images)
    assert not y.any()


def test_load_split_missing(tmp_path):
    with pytest.raises(UsageError, match=r"not found; run `dptrain data fetch mnist --root"):
        load_mnist_split(tmp_path, "train")


def test_count_mismatch(tmp_path):
    raw, _, _ = _make_split(tmp_path)
    write_idx(raw / "train-labels-idx1-ubyte", _labels(4))
    with pytest.raises(UsageError, match="has 5 images but train-labels-idx1-ubyte has 4 labels"):
        load_mnist_split(tmp_path, "train")


def test_bad_label_value(tmp_path):
    raw, _, labels = _make_split(tmp_path)
    labels[3] = 10
    write_idx(raw / "train-labels-idx1-ubyte", labels)
    with pytest.raises(UsageError, match="label 10 at index 3 is outside 0..9"):
        load_mnist_split(tmp_path, "train")


def test_wrong_image_shape(tmp_path):
    raw, _, _ = _make_split(tmp_path)
    write_idx(raw / "train-images-idx3-ubyte", np.zeros((5, 28, 27), dtype=np.uint8))
    with pytest.raises(UsageError, match="Nx28x28, found uint8 5x28x27"):
        load_mnist_split(tmp_path, "train")


def test_non_uint8_labels_rejected(tmp_path):
    raw, _, _ = _make_split(tmp_path)
    path = raw / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x0c\x01" + (5).to_bytes(4, "big") + bytes(20))
    with pytest.raises(UsageError, match="1-D uint8 label vector, found int32"):
        load_mnist_split(tmp_path, "train")


def test_bad_split_name(tmp_path):
    with pytest.raises(UsageError, match="unknown split"):
        load_mnist_split(tmp_path, "valid")  # type: ignore[arg-type]
