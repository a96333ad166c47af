"""Leftover files named by their creator (pid namespace + pid): only a dead creator's, in our
namespace and with our prefix, are swept."""

from __future__ import annotations

import os
import subprocess
import sys

from dptrain.procs import pid_namespace, stamped_path, sweep_dead


def test_only_files_of_dead_creators_in_our_namespace_are_swept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    ns = pid_namespace()
    names = {
        "dead": f"dptrain-x-{ns}-{dead}-ab12",
        "dead_tmp": f"dptrain-x-{ns}-{dead}-ab12.tmp",
        "mine": os.path.basename(stamped_path(str(tmp_path), "dptrain-x-")),
        "other_ns": f"dptrain-x-{ns}9-{dead}-ab12",
        "other_prefix": f"dptrain-y-{ns}-{dead}-ab12",
    }
    for name in names.values():
        (tmp_path / name).write_text("x")
    assert sweep_dead(str(tmp_path), "dptrain-x-") == [str(tmp_path / names["dead"])]
    assert sweep_dead(str(tmp_path), "dptrain-x-", suffix=".tmp") == [
        str(tmp_path / names["dead_tmp"])]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        names[k] for k in ("mine", "other_ns", "other_prefix"))
    assert names["mine"].startswith(f"dptrain-x-{ns}-{os.getpid()}-")
    assert sweep_dead(str(tmp_path / "missing"), "dptrain-x-") == []
