import itertools

import numpy as np
import pytest
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader, Dataset

from mpae_lightning.data.samplers import EvalShardSampler, MiniGroupBatchSampler


def _rank_batches(n_or_labels, world, epoch=0, **kw):
    out = []
    for rank in range(world):
        s = MiniGroupBatchSampler(n_or_labels, num_replicas=world, rank=rank, **kw)
        s.set_epoch(epoch)
        out.append(list(s))
    return out


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_every_index_once_per_epoch(world):
    n = 96 * world
    per_rank = _rank_batches(n, world, batch_size=16, mini_group=8, seed=3)
    flat = [i for batches in per_rank for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    assert all(len(b) == 16 for batches in per_rank for b in batches)
    assert len({len(batches) for batches in per_rank}) == 1  # same number of batches on every rank


def test_uneven_size_drops_tail_at_most_once_and_ranks_equal():
    per_rank = _rank_batches(100, 3, batch_size=8, mini_group=4, seed=0)
    flat = [i for batches in per_rank for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 3 * (100 // 8 // 3) * 8
    assert [len(b) for b in per_rank] == [4, 4, 4]
    assert len(MiniGroupBatchSampler(100, 8, 4, num_replicas=3, rank=1)) == 4


def test_mini_groups_never_straddle_ranks():
    world, batch, group = 4, 16, 8
    per_rank = _rank_batches(320, world, batch_size=batch, mini_group=group, seed=1, epoch=5)
    owner = {}
    for rank, batches in enumerate(per_rank):
        for b in batches:
            assert len(b) % group == 0
            for chunk in range(0, len(b), group):
                for i in b[chunk : chunk + group]:
                    owner.setdefault(i, set()).add(rank)
    assert all(len(r) == 1 for r in owner.values())
    # each rank's mini-groups are whole chunks of one of that rank's batches
    for batches in per_rank:
        assert all(len(b) == batch for b in batches)


def test_order_changes_with_epoch_and_is_reproducible():
    s = MiniGroupBatchSampler(64, batch_size=8, mini_group=4, seed=7)
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(1)
    e1 = list(s)
    assert e0 != e1
    assert sorted(itertools.chain(*e0)) == sorted(itertools.chain(*e1)) == list(range(64))
    s2 = MiniGroupBatchSampler(64, batch_size=8, mini_group=4, seed=7)
    s2.set_epoch(1)
    assert list(s2) == e1
    s3 = MiniGroupBatchSampler(64, batch_size=8, mini_group=4, seed=8)
    s3.set_epoch(1)
    assert list(s3) != e1


def test_no_shuffle_keeps_dataset_order():
    s = MiniGroupBatchSampler(32, batch_size=8, mini_group=4, shuffle=False)
    assert list(itertools.chain(*s)) == list(range(32))


@pytest.mark.parametrize("world", [1, 2])
def test_group_by_class_fills_each_mini_group_with_one_class(world):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=300).tolist() + [-1] * 13
    per_rank = _rank_batches(labels, world, batch_size=16, mini_group=4, group_by="class", seed=2, epoch=3)
    seen = []
    for batches in per_rank:
        for b in batches:
            assert len(b) == 16
            for chunk in range(0, 16, 4):
                group = b[chunk : chunk + 4]
                assert len({labels[i] for i in group}) == 1
            seen.extend(b)
    assert len(seen) == len(set(seen))  # drop_last: at most once
    assert len({len(b) for b in per_rank}) == 1
    # at most mini_group - 1 left out per class, plus what does not fill whole batches on all ranks
    assert len(seen) >= len(labels) - 6 * 3 - 16 * world


def test_group_by_pads_without_drop_last():
    labels = [0] * 5 + [1] * 3
    s = MiniGroupBatchSampler(labels, batch_size=4, mini_group=2, group_by="class", drop_last=False, seed=0)
    batches = list(s)
    assert set(itertools.chain(*batches)) == set(range(8))
    for b in batches:
        for chunk in range(0, 4, 2):
            assert len({labels[i] for i in b[chunk : chunk + 2]}) == 1


def test_without_drop_last_one_process_keeps_the_smaller_last_batch():
    # As the authors' DataLoader (drop_last=False): 50 images in batches of 8 are 6 of 8 and one of 2.
    batches = list(MiniGroupBatchSampler(50, batch_size=8, mini_group=4, drop_last=False, seed=0))
    assert [len(b) for b in batches] == [8] * 6 + [2]
    assert sorted(i for b in batches for i in b) == list(range(50))


def test_without_drop_last_ranks_split_the_rest_evenly_and_leave_out_fewer_than_world():
    # 3 ranks of 8: 55 = 2 global batches of 24 + 7; each rank takes 2 of the 7, one is left out.
    per_rank = _rank_batches(55, 3, batch_size=8, mini_group=4, drop_last=False, seed=0)
    assert [[len(b) for b in batches] for batches in per_rank] == [[8, 8, 2]] * 3
    flat = [i for batches in per_rank for b in batches for i in b]
    assert len(flat) == len(set(flat)) == 54
    single = list(MiniGroupBatchSampler(55, batch_size=24, mini_group=4, drop_last=False, seed=0))
    assert single[-1][:6] == [i for batches in per_rank for i in batches[-1]]  # the same rest, minus its tail
    # fewer images left than ranks: no last batch (every rank must run the same number of steps)
    per_rank = _rank_batches(50, 3, batch_size=8, mini_group=4, drop_last=False, seed=0)
    assert [len(batches) for batches in per_rank] == [2, 2, 2]
    assert all(len(b) == 8 for batches in per_rank for b in batches)
    assert len(MiniGroupBatchSampler(50, 8, 4, drop_last=False, num_replicas=3, rank=2)) == 2


@pytest.mark.parametrize("world, mini_group", [(2, 16), (4, 8), (2, 4), (4, 64)])
def test_ranks_slice_the_one_process_batch_with_the_same_image_seeds(world, mini_group):
    # A global batch of 16 on 1 process or on `world` processes: the same images, in the same
    # places, with the same augmentation and masking seeds; mini-groups may span processes.
    kw = dict(mini_group=mini_group, seed=5, drop_last=False, shuffle=True)
    single = MiniGroupBatchSampler(72, batch_size=16, **kw)  # 4 x 16 + a last batch of 8
    single.set_epoch(2)
    ref = list(single)
    per_rank = _rank_batches(72, world, epoch=2, batch_size=16 // world, **kw)
    assert [len(batches) for batches in per_rank] == [len(ref)] * world
    for step, whole in enumerate(ref):
        slices = [batches[step] for batches in per_rank]
        assert [i for b in slices for i in b] == list(whole)
        assert [s for b in slices for s in b.augment_seeds] == whole.augment_seeds
        assert [s for b in slices for s in b.mask_seeds] == whole.mask_seeds
        assert len(set(whole.mask_seeds) | set(whole.augment_seeds)) == 2 * len(whole)
    # another epoch, other seeds
    single.set_epoch(3)
    assert next(iter(single)).mask_seeds != ref[0].mask_seeds


def test_seeded_batches_augment_each_image_from_its_own_seed():
    from mpae_lightning.data.resumable import SeededBatchDataset

    class Noisy(Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, i):
            return {"image": torch.rand(3), "index": i}

    single = MiniGroupBatchSampler(32, batch_size=8, mini_group=8, seed=1)
    halves = [MiniGroupBatchSampler(32, batch_size=4, mini_group=8, seed=1, num_replicas=2, rank=r) for r in (0, 1)]
    data = SeededBatchDataset(Noisy())
    whole = data.__getitems__(next(iter(single)))
    split = [item for s in halves for item in data.__getitems__(next(iter(s)))]
    assert torch.equal(torch.stack([x["image"] for x in whole]), torch.stack([x["image"] for x in split]))
    assert [x["mask_seed"] for x in whole] == [x["mask_seed"] for x in split]


def test_errors():
    with pytest.raises(ValueError, match=r"batch_size \(12\) must be a multiple of mini_group \(8\), or mini_group >="):
        MiniGroupBatchSampler(100, batch_size=12, mini_group=8)
    with pytest.raises(ValueError, match="labels"):
        MiniGroupBatchSampler(100, batch_size=8, mini_group=8, group_by="class")
    with pytest.raises(ValueError, match="no full batch"):
        MiniGroupBatchSampler(10, batch_size=8, mini_group=8, num_replicas=2, rank=0)
    with pytest.raises(ValueError, match="rank"):
        MiniGroupBatchSampler(100, batch_size=8, mini_group=8, num_replicas=2, rank=2)
    # the global batch (8 x 4 = 32) is cut by mini_group: 24 would leave an uneven group
    with pytest.raises(ValueError, match=r"batch_size \(8 x 4 processes = 32 images per step\) must be a multiple"):
        MiniGroupBatchSampler(100, batch_size=8, mini_group=24, num_replicas=4, rank=0)


class _Range(Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def test_lightning_set_epoch_helper_reaches_the_sampler():
    sampler = MiniGroupBatchSampler(40, batch_size=8, mini_group=4, seed=0)
    loader = DataLoader(_Range(40), batch_sampler=sampler)
    first = [b.tolist() for b in loader]
    _set_sampler_epoch(loader, 3)
    assert sampler.epoch == 3
    third = [b.tolist() for b in loader]
    assert first != third
    assert sorted(itertools.chain(*third)) == list(range(40))
    # the flat view seen as batch_sampler.sampler follows the same epoch
    assert list(loader.batch_sampler.sampler) == list(itertools.chain(*third))
    assert len(loader) == 5


@pytest.mark.parametrize("mode", ["contiguous", "strided"])
@pytest.mark.parametrize("n,world", [(0, 2), (1, 3), (10, 1), (65, 2), (283, 4), (7, 8)])
def test_eval_shards_cover_every_sample_exactly_once(n, world, mode):
    shards = [list(EvalShardSampler(n, num_replicas=world, rank=r, mode=mode)) for r in range(world)]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(n))
    assert len(flat) == n  # no padding duplicates
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1
    if mode == "contiguous":
        assert flat == list(range(n))
    for s in shards:
        assert s == sorted(s)


def test_eval_shard_defaults_to_single_process():
    s = EvalShardSampler(5)
    assert (s.num_replicas, s.rank) == (1, 0)
    assert list(s) == [0, 1, 2, 3, 4]
    assert torch.utils.data.DataLoader(_Range(5), sampler=s, batch_size=2).__len__() == 3


@pytest.mark.parametrize("mini_group", [16, 24, 128])
def test_mini_group_at_least_the_batch_is_one_group_per_batch(mini_group):
    # The authors cut batches with torch.split(batch, mini_group): a mini-group >= the batch is the whole batch.
    s = MiniGroupBatchSampler(100, batch_size=16, mini_group=mini_group, seed=0)
    batches = list(s)
    assert len(batches) == len(s) == 6 and all(len(b) == 16 for b in batches)
    assert len({i for b in batches for i in b}) == 96
    labels = [i % 5 for i in range(100)]
    by_class = MiniGroupBatchSampler(labels, batch_size=8, mini_group=mini_group, seed=0, group_by="class")
    batches = list(by_class)
    assert len(batches) == len(by_class) == 5 * (20 // 8)
    assert all(len(b) == 8 and len({labels[i] for i in b}) == 1 for b in batches)


def test_presence_loss_with_mini_group_at_least_the_batch_is_one_group():
    from mpae_lightning.losses.presence import MiniGroupPresenceLoss

    sim = torch.rand(6, 5, 8, 8, generator=torch.Generator().manual_seed(0))
    whole = MiniGroupPresenceLoss(6)(sim)
    assert torch.equal(MiniGroupPresenceLoss(8)(sim), whole)
    assert torch.equal(MiniGroupPresenceLoss(128)(sim), whole)
    assert not torch.equal(MiniGroupPresenceLoss(3)(sim), whole)
