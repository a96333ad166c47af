"""Unequal per-rank shares (``--balance auto``): the share arithmetic, and the loader cutting
each global micro-batch at the shares' offsets -- same union per micro-batch as equal shares,
exact sample counts, a change of shares taking effect at the next step (also mid-epoch)."""

from __future__ import annotations

import pytest
import torch

from dptrain.data.loader import CHUNK_FLOATS, DatasetLoader, ShardedLoader
from dptrain.strategies.balance import _Weighted, proportional_shares

N = 1000


def make(world: int, rank: int, batch: int, accum: int = 1, seed: int = 3) -> ShardedLoader:
    x = torch.arange(N, dtype=torch.int64)  # the "image" is its own index
    return ShardedLoader(x, x.clone(), batch_size=batch, rank=rank, world=world, accum=accum,
                         seed=seed, normalize=lambda t: t)


# ------------------------------------------------------------------ the shares
def test_shares_are_proportional_to_speed_when_they_divide_exactly():
    assert proportional_shares([2.0, 1.0], 30) == (20, 10)
    assert proportional_shares([1.0, 1.0, 2.0], 64) == (16, 16, 32)
    assert proportional_shares([3.0, 3.0], 7) == (4, 3)  # a tie goes to the lower rank


def test_shares_round_by_largest_remainder():
    # quotas 7 * [5, 3, 2] / 10 = 3.5, 2.1, 1.4: floors 3, 2, 1 (6), the remaining one goes to
    # the largest remainder (rank 0: .5), not to rank 2 (.4)
    assert proportional_shares([5.0, 3.0, 2.0], 7) == (4, 2, 1)
    # quotas 10 * [1, 1, 1] / 3 = 3.33 each: one extra, to rank 0
    assert proportional_shares([1.0, 1.0, 1.0], 10) == (4, 3, 3)


@pytest.mark.parametrize("total", [2, 3, 17, 64, 1000])
@pytest.mark.parametrize("speeds", [[1.0, 1.0], [1e-6, 1.0], [5351.4, 30019.6],
                                    [1.0, 2.0, 3.0, 1000.0], [7.0] * 5])
def test_shares_sum_exactly_each_at_least_one_and_deterministic(speeds, total):
    if total < len(speeds):
        with pytest.raises(ValueError, match="at least one"):
            proportional_shares(speeds, total)
        return
    shares = proportional_shares(speeds, total)
    assert sum(shares) == total and min(shares) >= 1 and len(shares) == len(speeds)
    assert proportional_shares(list(speeds), total) == shares  # same input, same answer
    # no share is more than one sample away from its quota, except where a rank was raised to 1
    quotas = [total * s / sum(speeds) for s in speeds]
    raised = sum(1 for q in quotas if q < 1)
    assert all(abs(b - q) < 1 + raised for b, q in zip(shares, quotas, strict=True))
    # a faster rank never gets fewer samples than a slower one
    pairs = [(a, b) for a in range(len(speeds)) for b in range(len(speeds))]
    assert all(shares[a] <= shares[b] for a, b in pairs if speeds[a] < speeds[b])


def test_a_far_slower_rank_still_gets_one_sample():
    assert proportional_shares([1e-9, 1.0, 1.0], 4) == (1, 1, 2)  # given by the lower rank
    assert proportional_shares([1.0, 1e-9], 2) == (1, 1)


@pytest.mark.parametrize("speeds", [[1.0, 0.0], [1.0, -2.0], [float("nan"), 1.0],
                                    [float("inf"), 1.0], []])
def test_bad_speeds_are_refused(speeds):
    with pytest.raises(ValueError):
        proportional_shares(speeds, 10)


def test_the_weighted_loss_is_the_loss_times_the_weight():
    class Mean:
        task = "classification"

        def loss(self, out, targets):
            return out.mean()

    w = _Weighted(Mean(), 0.75)
    assert w.loss(torch.tensor([2.0, 4.0]), None).item() == pytest.approx(2.25)
    assert w.task == "classification"  # everything else is the objective's


# ------------------------------------------------------------------ the loader
@pytest.mark.parametrize(("shares", "accum"), [((5, 11), 1), ((1, 15), 3), ((3, 9, 3), 2),
                                               ((1, 1, 13), 1)])
def test_union_of_unequal_shares_is_the_equal_share_union(shares, accum):
    world, per_rank = len(shares), sum(shares) // len(shares)
    equal = [make(world, r, per_rank, accum) for r in range(world)]
    unequal = [make(world, r, per_rank, accum) for r in range(world)]
    for loader in unequal:
        loader.set_shares(shares)
    single = make(1, 0, per_rank * world, accum)
    for epoch in (0, 1):
        ref = list(single.epoch(epoch))
        eq = [list(loader.epoch(epoch)) for loader in equal]
        un = [list(loader.epoch(epoch)) for loader in unequal]
        assert all(len(u) == len(ref) == single.steps_per_epoch for u in un)
        for s, micro in enumerate(ref):
            for k, (xb, yb) in enumerate(micro):
                assert torch.equal(torch.cat([un[r][s][k][0] for r in range(world)]), xb)
                assert torch.equal(torch.cat([eq[r][s][k][0] for r in range(world)]), xb)
                assert [len(un[r][s][k][0]) for r in range(world)] == list(shares)
                assert torch.equal(torch.cat([un[r][s][k][1] for r in range(world)]), yb)


def test_exact_sample_counts_and_no_sample_twice():
    shares = (3, 13)
    loaders = [make(2, r, 8, accum=2) for r in range(2)]
    for loader in loaders:
        loader.set_shares(shares)
    for r, loader in enumerate(loaders):
        used = torch.cat([xb for micro in loader.epoch(0) for xb, _ in micro])
        assert len(used) == loader.steps_per_epoch * 2 * shares[r]
        assert len(used.unique()) == len(used)
    both = torch.cat([xb for loader in loaders for micro in loader.epoch(0) for xb, _ in micro])
    assert len(both.unique()) == len(both) == loaders[0].steps_per_epoch * 32


def test_equal_shares_are_the_default_path():
    loader = make(2, 1, 8)
    before = list(loader.epoch(0))
    loader.set_shares((8, 8))
    assert loader.shares is None and (loader.local_batch, loader.offset) == (8, 8)
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(before, loader.epoch(0)))
    loader.set_shares((2, 14))
    assert loader.shares == (2, 14) and (loader.local_batch, loader.offset) == (14, 2)
    loader.set_shares(None)
    assert (loader.local_batch, loader.offset) == (8, 8)


@pytest.mark.parametrize("shares", [(8,), (8, 7), (0, 16), (17, -1), (4, 4, 8)])
def test_shares_that_do_not_cut_the_micro_batch_are_refused(shares):
    loader = make(2, 0, 8)
    with pytest.raises(ValueError, match="summing to 16"):
        loader.set_shares(shares)
    assert loader.shares is None and loader.local_batch == 8  # unchanged


@pytest.mark.parametrize("at", [0, 3, 13])
def test_a_change_mid_epoch_applies_from_the_next_step(at):
    """Shares changed after step ``at`` -- inside a gathered chunk -- give the equal-share
    batches up to ``at`` and the new shares' batches from ``at + 1``, for every rank."""
    shares, accum = (5, 27), 2
    union_ref = list(make(1, 0, 32, accum).epoch(1))
    got: list[list[list[torch.Tensor]]] = []
    for r in range(2):
        loader = make(2, r, 16, accum)
        assert CHUNK_FLOATS // (16 * accum) > at + 1  # the change falls inside one chunk
        steps = []
        for s, micro in enumerate(loader.epoch(1)):
            steps.append([xb for xb, _ in micro])
            if s == at:
                loader.set_shares(shares)
        got.append(steps)
        fresh = make(2, r, 16, accum)
        fresh.set_shares(shares)
        after = list(fresh.epoch(1, start_step=at + 1))
        assert all(torch.equal(a[k][0], b[k]) for a, b in zip(after, steps[at + 1:])
                   for k in range(accum))
    assert len(got[0]) == len(union_ref)
    for s, micro in enumerate(union_ref):
        sizes = (16, 16) if s <= at else shares
        for k, (xb, _) in enumerate(micro):
            assert [len(got[r][s][k]) for r in range(2)] == list(sizes)
            assert torch.equal(torch.cat([got[0][s][k], got[1][s][k]]), xb)


def test_shares_persist_into_the_next_epoch_and_a_resume():
    loader = make(2, 0, 16)
    loader.set_shares((4, 28))
    assert all(len(m[0][0]) == 4 for m in loader.epoch(2, start_step=7))


class _Indexed(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 200

    def __getitem__(self, i: int):
        return torch.tensor([float(i)]), i


@pytest.mark.parametrize("workers", [0, 1])
def test_dataset_loader_takes_the_shares_and_a_change_mid_epoch(workers):
    def loader(rank: int) -> DatasetLoader:
        return DatasetLoader(_Indexed(), batch_size=8, rank=rank, world=2, accum=1, seed=1,
                             normalize=lambda t: t, device=torch.device("cpu"),
                             num_workers=workers)

    ref = ShardedLoader(torch.arange(200), torch.arange(200), batch_size=16, rank=0, world=1,
                        accum=1, seed=1, normalize=lambda t: t)
    expect = [micro[0][1] for micro in ref.epoch(0)]
    got = []
    for r in range(2):
        ld = loader(r)
        ys = []
        for s, micro in enumerate(ld.epoch(0)):
            ys.append(micro[0][1])
            if s == 2:
                ld.set_shares((3, 13))
        got.append(ys)
        assert [len(y) for y in ys] == [8, 8, 8] + [(3, 13)[r]] * (len(expect) - 3)
    for s, y in enumerate(expect):
        assert torch.equal(torch.cat([got[0][s], got[1][s]]), y)
