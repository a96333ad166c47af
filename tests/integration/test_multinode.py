"""Two "hosts" -- network namespaces joined by a veth pair -- one launcher per node.

Skipped, with the reason, where namespaces cannot be created (not root, no iproute2, no
CAP_SYS_ADMIN). tests/infra/netns_up.sh makes dpt_a (10.77.0.1) and dpt_b (10.77.0.2).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dptrain.dist import free_port
from tests.conftest import ROOT, clean_env, run_cli

INFRA = ROOT / "tests" / "infra"
ARGS = ["--dataset", "synthetic", "--model", "myplugins:mlp", "--max-steps", "20", "--seed", "4",
        "--batch-size", "16", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def namespaces():
    up = subprocess.run(["bash", str(INFRA / "netns_up.sh")], capture_output=True, text=True,
                        timeout=120)
    if up.returncode != 0:
        pytest.skip(f"cannot create network namespaces here: {up.stderr.strip()[-300:]}")
    yield
    subprocess.run(["bash", str(INFRA / "netns_down.sh")], capture_output=True, timeout=60)


def params(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["model"]


def test_two_nodes_match_one_node(namespaces, tmp_path):
    port = free_port()
    env = clean_env(GLOO_SOCKET_IFNAME="dpt0")
    common = ["--nnodes", "2", "--nproc", "1", "--master-addr", "10.77.0.1",
              "--master-port", str(port), "--timeout-s", "60", *ARGS]
    procs = []
    for ns, node_rank in (("dpt_a", 0), ("dpt_b", 1)):
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "dptrain", "train",
               "--node-rank", str(node_rank), *common, "--out", str(tmp_path / "two")]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, env=env))
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (_, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
    assert "ddp x 2" in outs[0][0]  # node 0 hosts global rank 0 and prints the result
    one = run_cli("train", "--nproc", "2", *ARGS, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = params(tmp_path / "two"), params(tmp_path / "one")
    assert all(torch.allclose(a[k], b[k], rtol=0, atol=1e-6) for k in a)
