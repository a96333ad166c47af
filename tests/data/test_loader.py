"""The sharding arithmetic: the union of rank shards at every step is the 1-process batch."""

from __future__ import annotations

import pytest
import torch

from dptrain.data.loader import Normalizer, ShardedLoader, eval_shard, random_shift

N = 1000


def make(world: int, rank: int, batch: int, accum: int = 1, seed: int = 3) -> ShardedLoader:
    x = torch.arange(N, dtype=torch.int64)  # the "image" is its own index
    return ShardedLoader(x, x.clone(), batch_size=batch, rank=rank, world=world, accum=accum,
                         seed=seed, normalize=lambda t: t)


@pytest.mark.parametrize("world", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("accum", [1, 3])
def test_union_of_shards_is_the_single_process_batch(world: int, accum: int):
    per_rank = 8
    single = make(1, 0, per_rank * world, accum)
    ranks = [make(world, r, per_rank, accum) for r in range(world)]
    assert all(r.steps_per_epoch == single.steps_per_epoch for r in ranks)
    assert single.steps_per_epoch == N // (per_rank * world * accum)
    for epoch in (0, 1):
        steps = list(single.epoch(epoch))
        shards = [list(r.epoch(epoch)) for r in ranks]
        assert len(steps) == single.steps_per_epoch
        for s, micro in enumerate(steps):
            for k, (xb, _) in enumerate(micro):
                union = torch.cat([shards[r][s][k][0] for r in range(world)])
                assert torch.equal(union, xb)  # same samples, same order
    # no sample twice within an epoch; exactly steps*global samples used (drop-last)
    used = torch.cat([xb for micro in single.epoch(0) for xb, _ in micro])
    assert len(used.unique()) == len(used) == single.steps_per_epoch * single.samples_per_step


def test_permutation_depends_on_seed_and_epoch_only():
    a, b = make(1, 0, 10), make(1, 0, 10)
    assert torch.equal(a.permutation(2), b.permutation(2))
    assert not torch.equal(a.permutation(0), a.permutation(1))
    assert not torch.equal(a.permutation(0), make(1, 0, 10, seed=4).permutation(0))


def test_resuming_mid_epoch_yields_the_remaining_steps():
    loader = make(2, 1, 16)
    full = list(loader.epoch(1))
    tail = list(loader.epoch(1, start_step=5))
    assert len(tail) == len(full) - 5
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(full[5:], tail))


@pytest.mark.parametrize("n", [10_000, 9_999, 7, 1])
@pytest.mark.parametrize("world", [1, 2, 3, 7, 16])
def test_eval_shards_count_every_sample_once(n: int, world: int):
    spans = [eval_shard(n, r, world) for r in range(world)]
    covered = [i for start, end in spans for i in range(start, end)]
    assert covered == list(range(n))
    sizes = [end - start for start, end in spans]
    assert max(sizes) - min(sizes) <= 1


def test_normalizer_matches_the_tutorial_transform():
    x = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    got = Normalizer(0.1307, 0.3081)(x)
    want = ((x.float() / 255.0 - 0.1307) / 0.3081).unsqueeze(1)
    assert got.shape == (4, 1, 28, 28)
    assert torch.allclose(got, want, atol=1e-5)


def test_random_shift_is_deterministic_and_a_translation():
    x = torch.zeros(3, 28, 28, dtype=torch.uint8)
    x[:, 10, 10] = 255
    a = random_shift(x, 0, 0, 5, 0, 0)
    assert torch.equal(a, random_shift(x, 0, 0, 5, 0, 0))
    for img in a:
        (r, c), = (img == 255).nonzero().tolist()
        assert abs(r - 10) <= 2 and abs(c - 10) <= 2
        assert int((img > 0).sum()) == 1


@pytest.mark.parametrize("chunk", [1, 300, 1 << 20])  # values per chunk: 1 step, a few, all
@pytest.mark.parametrize("world, rank, accum, augment",
                         [(1, 0, 1, "none"), (3, 2, 2, "none"), (2, 1, 1, "shift")])
def test_chunked_gather_equals_one_gather_per_micro_batch(monkeypatch, chunk, world, rank,
                                                          accum, augment):
    import dptrain.data.loader as loader_module

    monkeypatch.setattr(loader_module, "CHUNK_FLOATS", chunk)
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (500, 28, 28), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (500,), generator=gen)
    norm = Normalizer(0.1307, 0.3081)
    loader = ShardedLoader(x, y, batch_size=16, rank=rank, world=world, accum=accum, seed=5,
                           normalize=norm, augment=augment)
    for start in (0, 3):
        got = list(loader.epoch(1, start))
        assert len(got) == loader.steps_per_epoch - start
        perm = loader.permutation(1)
        for step, micro in zip(range(start, loader.steps_per_epoch), got, strict=True):
            assert len(micro) == accum
            for k, (xb, yb) in enumerate(micro):
                idx = loader.indices(perm, step, k)
                raw = x.index_select(0, idx)
                if augment == "shift":
                    raw = random_shift(raw, 5, 1, step, k, rank)
                assert torch.equal(xb, norm(raw)) and torch.equal(yb, y.index_select(0, idx))


class _Squares(torch.utils.data.Dataset):
    """A deterministic map-style Dataset: sample i is (uint8 image of value i % 256, i)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        g = torch.Generator().manual_seed(i)
        return torch.randint(0, 256, (28, 28), generator=g, dtype=torch.uint8), i


def _dataset_batches(workers: int, rank: int = 0, world: int = 2, epochs: int = 2,
                     start_step: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from dptrain.data.loader import DatasetLoader

    loader = DatasetLoader(_Squares(203), batch_size=8, rank=rank, world=world, accum=2, seed=5,
                           normalize=Normalizer(0.1307, 0.3081), device=torch.device("cpu"),
                           num_workers=workers)
    assert loader.loader().persistent_workers is (workers > 0)
    assert loader.loader().pin_memory is False  # CPU device: nothing to pin for
    out = []
    for epoch in range(epochs):
        for micro in loader.epoch(epoch, start_step if epoch == 0 else 0):
            out.extend(micro)
    return out


@pytest.mark.parametrize("rank", [0, 1])
def test_dataset_workers_give_bitwise_the_same_batches(rank):
    plain = _dataset_batches(0, rank)
    workers = _dataset_batches(2, rank)
    assert len(plain) == len(workers) == 2 * (203 // 32) * 2
    for (x0, y0), (x1, y1) in zip(plain, workers, strict=True):
        assert torch.equal(y0, y1)
        assert torch.equal(x0, x1) and x0.dtype == torch.float32


def test_dataset_loader_uses_the_tensor_paths_indices():
    """The Dataset path yields, per rank, exactly the samples the tensor path would."""
    data = _Squares(203)
    x = torch.stack([data[i][0] for i in range(len(data))])
    y = torch.arange(len(data))
    norm = Normalizer(0.1307, 0.3081)
    tensor = ShardedLoader(x, y, batch_size=8, rank=1, world=2, accum=2, seed=5, normalize=norm)
    want = [b for e in range(2) for m in tensor.epoch(e) for b in m]
    got = _dataset_batches(2, rank=1)
    for (xw, yw), (xg, yg) in zip(want, got, strict=True):
        assert torch.equal(yw, yg) and torch.equal(xw, xg)


def test_dataset_workers_resume_mid_epoch():
    full = _dataset_batches(2, 0, epochs=1)
    resumed = _dataset_batches(2, 0, epochs=1, start_step=3)
    assert [y.tolist() for _, y in resumed] == [y.tolist() for _, y in full[3 * 2:]]
