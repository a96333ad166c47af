"""benchmarks/gpu_check.sh: valid bash, and a clean refusal where torch sees no CUDA GPU."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    full.update(GPU_CHECK_RESULTS=str(tmp_path / "results"), GPU_CHECK_WORK=str(tmp_path / "w"),
                **env)
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=full,
                          timeout=300, cwd=tmp_path)


def test_syntax():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_embedded_python_compiles():
    text = SCRIPT.read_text()
    body = re.search(r"<<'PYEOF'.*?\n(.*?)\nPYEOF\n", text, re.S)
    assert body is not None
    compile(body.group(1), "gpu_check.sh:results", "exec")


def test_no_cuda_fails_cleanly(tmp_path: Path):
    # this interpreter's torch, with every GPU hidden: torch.cuda.is_available() is False
    r = _run(tmp_path, PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no CUDA GPU is visible to torch in ")
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "w").exists()


def test_python_without_torch_fails_cleanly(tmp_path: Path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'ModuleNotFoundError: No module named torch' >&2\nexit 1\n")
    fake.chmod(0o755)
    r = _run(tmp_path, PYTHON=str(fake))
    assert r.returncode == 2 and r.stderr.startswith("error: no CUDA GPU is visible to torch")


@pytest.mark.slow  # imports torch in two interpreters: ~5-15 s
@pytest.mark.skipif(shutil.which("nvidia-smi") is not None,
                    reason="a GPU machine: without PYTHON the script would build a CUDA venv")
def test_no_gpu_at_all_fails_cleanly(tmp_path: Path):
    r = _run(tmp_path, CUDA_VISIBLE_DEVICES="")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "error: no CUDA GPU is visible (nvidia-smi finds none, and no Python here has a torch "
        "that sees one); run this on a machine with an NVIDIA GPU"]
