"""Per-rank model-state memory predicted from shapes (ZeRO formulas, real partitioning)."""

from __future__ import annotations

from dptrain import memory
from dptrain.models import build_model

MLP = [(32, 784), (32,), (10, 32), (10,)]


def test_replicated_zero_and_fsdp_per_rank():
    total = sum(a * (b[0] if b else 1) for a, *b in MLP)
    ddp = memory.predict(MLP, "ddp", 2, states=1)
    assert all(r["total"] == 3 * 4 * total for r in ddp)
    zero = memory.predict(MLP, "zero", 2, states=1)  # whole tensors: 25088 | 320+32+10
    assert [r["optim_bytes"] for r in zero] == [25088 * 4, 362 * 4]
    assert all(r["param_bytes"] == 4 * total for r in zero)
    fsdp = memory.predict(MLP, "fsdp", 3, states=2)  # rows in chunks of ceil(rows / 3)
    assert [r["param_bytes"] // 4 for r in fsdp] == [11 * 784 + 11 + 4 * 32 + 4,
                                                    11 * 784 + 11 + 4 * 32 + 4,
                                                    10 * 784 + 10 + 2 * 32 + 2]
    assert sum(r["param_bytes"] for r in fsdp) == 4 * total
    assert all(r["optim_bytes"] == 2 * r["param_bytes"] for r in fsdp)


def test_more_ranks_than_rows_leave_the_last_ranks_empty():
    assert memory.fsdp_shard((3, 2), 4) == [2, 2, 2, 0]
    assert memory.zero_partition([5, 5, 1], 4) == [5, 5, 1, 0]


def test_fits_from_and_the_table():
    shapes = memory.shapes(build_model("linear"))
    assert shapes == [(10, 784), (10,)]
    one = memory.predict(shapes, "ddp", 1, states=1)[0]["total"]
    assert memory.fits_from(shapes, one, states=1, strategy="ddp") == 1
    assert memory.fits_from(shapes, one - 1, states=1, strategy="ddp") is None
    assert memory.fits_from(shapes, one // 2, states=1, strategy="fsdp") == 2
    rows = memory.table(shapes, states=1, ns=(1, 2))
    assert rows[0]["ddp"] == rows[0]["fsdp"] == one and rows[1]["fsdp"] < one
    assert memory.optimizer_states("sgd", 0.0) == 0 and memory.optimizer_states("adam", 0) == 2
