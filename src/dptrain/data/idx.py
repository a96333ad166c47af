"""Reading and writing IDX files (the MNIST / Fashion-MNIST on-disk format).

An IDX file is a 4-byte magic ``00 00 <dtype code> <ndim>``, then ``ndim`` big-endian uint32
dimensions, then the payload in C order, big-endian. Files may be gzipped; we detect that by
the gzip magic bytes rather than by the name, because users rename files and torchvision keeps
both ``foo`` and ``foo.gz`` around.

Every problem with a file is a :class:`~dptrain.errors.UsageError` naming the file, since a
corrupt or truncated download is the user's environment, not a bug in dptrain.
"""

from __future__ import annotations

import gzip
import os
import secrets
import zlib
from pathlib import Path
from typing import Literal

import numpy as np

from dptrain.errors import UsageError

GZIP_MAGIC = b"\x1f\x8b"

# IDX dtype codes. The payload is big-endian; we convert to native order on read.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

# Dataset name (as on the command line) -> torchvision directory name under the data root.
DATASET_DIRS: dict[str, str] = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}

# split -> (images file, labels file), the canonical uncompressed names.
SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)


def _fix_hint(path: Path) -> str:
    return f"delete or replace {path} (e.g. run `dptrain data fetch` again)"


def maybe_gunzip(data: bytes, path: Path) -> bytes:
    """Return ``data`` decompressed if it starts with the gzip magic, else unchanged.

    Args:
        data: The raw bytes of a file.
        path: The file they came from, for error messages.

    Returns:
        The decompressed (or original) bytes.

    Raises:
        UsageError: The data looks gzipped but cannot be decompressed (truncated, corrupt).
    """
    if not data.startswith(GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as e:
        raise UsageError(
            f"{path}: corrupt or truncated gzip data ({e}); {_fix_hint(path)}"
        ) from None


def decode_idx(data: bytes, path: Path) -> np.ndarray:
    """Parse the (already decompressed) bytes of an IDX file.

    Args:
        data: The whole uncompressed file content.
        path: The file they came from, for error messages.

    Returns:
        A writable, native-byte-order array with the shape given by the header.

    Raises:
        UsageError: Bad magic, unknown dtype code, or a payload whose size does not match
            the header.
    """
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UsageError(
            f"{path}: not an IDX file (expected magic 00 00 <type> <ndim>, found {data[:4].hex(' ') or 'empty file'}); "
            f"{_fix_hint(path)}"
        )
    code, ndim = data[2], data[3]
    if code not in IDX_DTYPES:
        raise UsageError(
            f"{path}: unknown IDX element type 0x{code:02x} "
            f"(expected one of {', '.join(f'0x{c:02x}' for c in IDX_DTYPES)}); {_fix_hint(path)}"
        )
    if ndim == 0:
        raise UsageError(f"{path}: IDX header declares 0 dimensions; {_fix_hint(path)}")
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise UsageError(
            f"{path}: truncated IDX header (expected {header_len} bytes for {ndim} dimensions, "
            f"found {len(data)}); {_fix_hint(path)}"
        )
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = IDX_DTYPES[code]
    expected = int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    found = len(data) - header_len
    if found != expected:
        what = "truncated" if found < expected else "extra bytes after the data in"
        shape = "x".join(map(str, dims))
        raise UsageError(
            f"{path}: {what} IDX file (header says {shape} {dtype.name} = {expected} payload bytes, "
            f"found {found}); {_fix_hint(path)}"
        )
    arr = np.frombuffer(data, dtype=dtype, count=expected // dtype.itemsize, offset=header_len)
    # Copy: frombuffer over ``bytes`` is read-only (torch.from_numpy warns on that), and we
    # want native byte order for the multi-byte types anyway.
    return arr.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file, gzipped or not (detected from the content, not the name).

    All standard IDX element types are parsed; callers that need uint8 check ``dtype``.

    Args:
        path: The file to read.

    Returns:
        A writable, native-byte-order array with the shape from the header.

    Raises:
        UsageError: The file cannot be read, or is not a well-formed IDX file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UsageError(
            f"cannot read {path}: {e.strerror or e}; check the path and its permissions"
        ) from None
    return decode_idx(maybe_gunzip(data, path), path)


def encode_idx(array: np.ndarray) -> bytes:
    """Serialise a uint8 array as IDX bytes (uncompressed).

    Args:
        array: A uint8 array with at least one dimension, each below 2**32.

    Returns:
        The complete file content.

    Raises:
        TypeError: ``array`` is not uint8 (a programming error, not bad user input).
        ValueError: ``array`` has no dimensions, too many, or one too large for IDX.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        raise TypeError(f"write_idx supports uint8 arrays only, got {array.dtype}")
    if not 1 <= array.ndim <= 255 or any(d >= 2**32 for d in array.shape):
        raise ValueError(f"shape {array.shape} cannot be stored in an IDX file")
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    return header + np.ascontiguousarray(array).tobytes()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and a rename.

    Readers (possibly other ranks or nodes on a shared filesystem) therefore see either the
    old file or the complete new one, never a half-written one.

    Args:
        path: The destination; its directory must exist.
        data: The complete content.

    Raises:
        OSError: The directory is not writable, the disk is full, etc.
    """
    path = Path(path)
    # Not mkstemp: its files are mode 0600, and data dirs are often shared between users
    # and nodes; O_EXCL with a random name plus 0o666 lets the umask decide, like open().
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_idx(path: Path, array: np.ndarray, gzip_: bool = False) -> None:
    """Write a uint8 array as an IDX file, atomically.

    Args:
        path: The destination file.
        array: A uint8 array.
        gzip_: Gzip the content (with a fixed timestamp, so output is reproducible).

    Raises:
        TypeError: ``array`` is not uint8.
        ValueError: ``array`` cannot be represented in IDX.
        OSError: The file cannot be written.
    """
    data = encode_idx(array)
    if gzip_:
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(Path(path), data)


def dataset_dir(name: str) -> str:
    """Map a dataset name to its torchvision directory name.

    Args:
        name: ``"mnist"``/``"fashion-mnist"`` or the directory names ``"MNIST"``/``"FashionMNIST"``.

    Returns:
        ``"MNIST"`` or ``"FashionMNIST"``.

    Raises:
        UsageError: Unknown dataset name.
    """
    if name in DATASET_DIRS.values():
        return name
    try:
        return DATASET_DIRS[name]
    except KeyError:
        raise UsageError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASET_DIRS)}"
        ) from None


def find_idx_file(raw_dir: Path, stem: str) -> Path | None:
    """Return ``raw_dir/stem`` or ``raw_dir/stem.gz``, preferring the uncompressed one.

    Args:
        raw_dir: The ``<root>/<NAME>/raw`` directory.
        stem: A canonical file name such as ``"train-images-idx3-ubyte"``.

    Returns:
        The existing file, or None.
    """
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def load_mnist_split(
    root: Path, split: Literal["train", "test"], name: str = "MNIST"
) -> tuple[np.ndarray, np.ndarray]:
    """Load one split of MNIST or Fashion-MNIST from the torchvision layout.

    Files are looked up in ``root/<NAME>/raw/``, uncompressed or with ``.gz``.

    Args:
        root: The data root (``--data-root``).
        split: ``"train"`` or ``"test"`` (the ``t10k-*`` files).
        name: ``"MNIST"``/``"FashionMNIST"``, or ``"mnist"``/``"fashion-mnist"``.

    Returns:
        ``(images, labels)``: uint8 arrays of shape ``(N, 28, 28)`` and ``(N,)``, labels in 0..9.

    Raises:
        UsageError: Missing files, malformed files, wrong shapes or types, a count mismatch
            between images and labels, or a label outside 0..9.
    """
    if split not in SPLIT_FILES:
        raise UsageError(f"unknown split {split!r}; use 'train' or 'test'")
    dirname = dataset_dir(name)
    raw_dir = Path(root) / dirname / "raw"
    cli_name = next((k for k, v in DATASET_DIRS.items() if v == dirname), dirname)
    paths = []
    for stem in SPLIT_FILES[split]:
        p = find_idx_file(raw_dir, stem)
        if p is None:
            raise UsageError(
                f"{raw_dir / stem} (or .gz) not found; run `dptrain data fetch {cli_name} --root {root}`"
            )
        paths.append(p)
    images_path, labels_path = paths
    images, labels = read_idx(images_path), read_idx(labels_path)

    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
        raise UsageError(
            f"{images_path}: expected uint8 images of shape Nx28x28, found {images.dtype} "
            f"{'x'.join(map(str, images.shape))}; {_fix_hint(images_path)}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise UsageError(
            f"{labels_path}: expected a 1-D uint8 label vector, found {labels.dtype} "
            f"{'x'.join(map(str, labels.shape))}; {_fix_hint(labels_path)}"
        )
    if len(images) != len(labels):
        raise UsageError(
            f"{images_path.name} has {len(images)} images but {labels_path.name} has {len(labels)} "
            f"labels; the files in {raw_dir} do not belong together, {_fix_hint(raw_dir)}"
        )
    if labels.size and int(labels.max()) >= NUM_CLASSES:
        bad = int(np.argmax(labels >= NUM_CLASSES))
        raise UsageError(
            f"{labels_path}: label {int(labels[bad])} at index {bad} is outside 0..{NUM_CLASSES - 1}; "
            f"{_fix_hint(labels_path)}"
        )
    return images, labels
