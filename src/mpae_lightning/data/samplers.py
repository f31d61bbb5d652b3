"""Samplers that keep MPAE's mini-groups intact under DDP.

MPAE's presence loss is computed over consecutive chunks of ``mini_group``
images inside a batch, so a batch must be built with whole mini-groups and no
mini-group may be split between two processes. :class:`MiniGroupBatchSampler`
shards whole batches across ranks; :class:`EvalShardSampler` shards evaluation
sets without the padding duplicates of ``DistributedSampler`` so that every test
image counts exactly once in a metric summed over ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Literal

import numpy as np
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = [
    "EvalShardSampler",
    "MiniGroupBatchSampler",
    "SeededBatch",
    "batch_seed",
    "check_mini_group",
    "distributed_info",
]


class SeededBatch(list):
    """A batch of indices that carries the seed of its random augmentation (``.seed``).

    It pickles with its seed, so a DataLoader worker can seed the batch's transforms from it:
    augmentation then depends on (seed, epoch, batch) only, not on which worker or how many.
    """

    seed: int


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The augmentation seed of batch ``batch`` (global position in the epoch) of ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, batch]).generate_state(1, np.uint32)[0])


def check_mini_group(batch_size: int, mini_group: int) -> None:
    """Refuse a batch that the presence loss's ``torch.split(batch, mini_group)`` would cut unevenly.

    The authors cut every batch with ``torch.split``, so a mini-group at least as large as the
    batch is one group per batch (the supplement's Table 7 goes up to 128 with a batch of 64); a
    smaller mini-group must divide the batch so that every group has ``mini_group`` images.

    Raises:
        ValueError: ``batch_size`` or ``mini_group`` is not positive, or ``mini_group`` is smaller
            than ``batch_size`` and does not divide it.
    """
    if batch_size < 1 or mini_group < 1:
        raise ValueError(f"batch_size ({batch_size}) and mini_group ({mini_group}) must be positive")
    if mini_group < batch_size and batch_size % mini_group != 0:
        raise ValueError(
            f"batch_size ({batch_size}) must be a multiple of mini_group ({mini_group}), or mini_group >= "
            "batch_size (one group per batch): MPAE's presence loss works on consecutive chunks of "
            "mini_group images of a batch"
        )


def distributed_info(num_replicas: int | None = None, rank: int | None = None) -> tuple[int, int]:
    """Fill in ``(num_replicas, rank)`` from ``torch.distributed`` when not given.

    Args:
        num_replicas: Number of processes, or None to ask ``torch.distributed`` (1 when it is not
            initialised).
        rank: Rank of this process, or None to ask ``torch.distributed`` (0 when it is not
            initialised).

    Returns:
        The pair ``(num_replicas, rank)``.
    """
    initialised = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if initialised else 1
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if num_replicas < 1:
        raise ValueError(f"num_replicas must be >= 1, got {num_replicas}")
    if not 0 <= rank < num_replicas:
        raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
    return int(num_replicas), int(rank)


class _RankIndexSampler(Sampler[int]):
    """The flat index order one rank sees in an epoch of a :class:`MiniGroupBatchSampler`.

    It exists so that Lightning, which calls ``set_epoch`` only on ``dataloader.sampler`` and
    ``dataloader.batch_sampler.sampler`` (``lightning.fabric.utilities.data._set_sampler_epoch``),
    reaches the batch sampler's epoch.
    """

    def __init__(self, parent: MiniGroupBatchSampler) -> None:
        self._parent = parent

    def set_epoch(self, epoch: int) -> None:
        self._parent.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        for batch in self._parent._iter_batches(0):
            yield from batch

    def __len__(self) -> int:
        return sum(len(b) for b in self._parent._iter_batches(0))


class MiniGroupBatchSampler(Sampler[list[int]]):
    """Batches made of whole mini-groups, reshuffled per epoch and sharded by whole batches.

    Every rank computes the same epoch order from ``(seed, epoch)`` and takes every
    ``num_replicas``-th batch starting at its rank, so all ranks get the same number of batches and
    a mini-group (a chunk of consecutive images of one batch) never straddles two ranks. With
    ``group_by="class"`` each mini-group is filled with images of a single class: per class the
    images are shuffled and cut into chunks of ``mini_group``, the chunks are shuffled and then
    concatenated into batches.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)``; the Trainer must run with
    ``use_distributed_sampler=False`` so that Lightning does not replace it. Lightning's epoch
    hook reaches :meth:`set_epoch` through the ``sampler`` attribute.

    Args:
        data_source: The dataset size, or a sequence with one class label per item (needed for
            ``group_by="class"``; labels may be any hashable ints, -1 included).
        batch_size: Images per batch on one rank; a multiple of ``mini_group`` when it is larger.
        mini_group: Chunk size of MPAE's mini-group presence loss; ``mini_group >= batch_size``
            means one group per batch (``group_by="class"`` then fills each batch with one class).
        shuffle: Reshuffle every epoch (deterministically from ``seed`` and the epoch). Without it
            the order is the dataset order.
        seed: Seed shared by all ranks.
        drop_last: Drop the images that do not fill a whole batch on every rank (with
            ``group_by``, also the images that do not fill a whole mini-group of their class), so
            each index appears at most once per epoch. Otherwise the epoch is padded by repeating
            indices from its beginning so that every rank still gets full batches.
        num_replicas: Number of DDP processes (default: from ``torch.distributed``, else 1).
        rank: This process's rank (default: from ``torch.distributed``, else 0).
        group_by: ``"class"`` to fill each mini-group with one class, or None.
    """

    def __init__(
        self,
        data_source: int | Sequence[int],
        batch_size: int,
        mini_group: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = True,
        num_replicas: int | None = None,
        rank: int | None = None,
        group_by: Literal["class"] | None = None,
    ) -> None:
        if isinstance(data_source, (int, np.integer)):
            self.num_samples = int(data_source)
            self.labels: np.ndarray | None = None
        else:
            self.labels = np.asarray(list(data_source), dtype=np.int64)
            self.num_samples = len(self.labels)
        check_mini_group(batch_size, mini_group)
        if group_by not in (None, "class"):
            raise ValueError(f"group_by must be None or 'class', got {group_by!r}")
        if group_by == "class" and self.labels is None:
            raise ValueError("group_by='class' needs one label per item: pass the labels, not the dataset size")
        self.batch_size = int(batch_size)
        self.mini_group = int(mini_group)
        # The groups the loss sees: torch.split(batch, mini_group) gives one group when mini_group >= batch.
        self.group_size = min(self.mini_group, self.batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.group_by = group_by
        self.num_replicas, self.rank = distributed_info(num_replicas, rank)
        self.epoch = 0
        self._skip = 0  # batches of the next iteration already done (set when resuming mid-epoch)
        self.sampler = _RankIndexSampler(self)
        if self._num_batches_per_rank() == 0:
            raise ValueError(
                f"{self.num_samples} images give no full batch of batch_size={self.batch_size} "
                f"(mini_group={self.mini_group}, group_by={self.group_by!r}) on each of "
                f"{self.num_replicas} rank(s); lower batch_size or set drop_last=False"
            )

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order :meth:`__iter__` yields (called by Lightning every epoch)."""
        self.epoch = int(epoch)

    # -- resuming ------------------------------------------------------------------------------
    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from ``{"seed", "epoch", "batches_done"}`` (this rank's batches already trained on):
        the next iteration starts at the first batch not yet trained on.

        A finished epoch resumes at the start of the next one. A different ``seed`` is refused,
        because the saved position would then point into another order.
        """
        if int(state.get("seed", self.seed)) != self.seed:
            raise ValueError(
                f"the checkpoint's training order was drawn with data seed {state['seed']}, this run "
                f"uses seed={self.seed}; set data.init_args.seed={state['seed']} to resume it"
            )
        epoch, done = int(state["epoch"]), int(state["batches_done"])
        if done >= len(self):
            epoch, done = epoch + 1, 0
        self.epoch, self._skip = epoch, done

    @property
    def pending_skip(self) -> int:
        """Batches the next :meth:`__iter__` skips (non-zero only right after :meth:`load_state_dict`)."""
        return self._skip

    # -- sizes ---------------------------------------------------------------------------------
    def _class_counts(self) -> list[int]:
        assert self.labels is not None
        _, counts = np.unique(self.labels, return_counts=True)
        return [int(c) for c in counts]

    def _num_units(self) -> tuple[int, int]:
        """(number of shuffling units in an epoch, units per batch); a unit is an index or a group."""
        if self.group_by is None:
            return self.num_samples, self.batch_size
        rounding = math.floor if self.drop_last else math.ceil
        groups = sum(rounding(c / self.group_size) for c in self._class_counts())
        return groups, self.batch_size // self.group_size

    def _num_batches_per_rank(self) -> int:
        units, per_batch = self._num_units()
        if self.drop_last:
            return units // per_batch // self.num_replicas
        return math.ceil(units / (per_batch * self.num_replicas))

    def __len__(self) -> int:
        return self._num_batches_per_rank()

    # -- order ---------------------------------------------------------------------------------
    def _rng(self) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch])

    def _units(self, rng: np.random.Generator) -> np.ndarray:
        """The epoch's shuffled units: (n,) indices or (G, group_size) groups."""
        if self.group_by is None:
            n = self.num_samples
            return rng.permutation(n) if self.shuffle else np.arange(n)
        assert self.labels is not None
        groups = []
        for cls in np.unique(self.labels):
            idx = np.flatnonzero(self.labels == cls)
            if self.shuffle:
                idx = rng.permutation(idx)
            size = self.group_size
            if self.drop_last:
                idx = idx[: len(idx) // size * size]
            else:
                idx = np.resize(idx, math.ceil(len(idx) / size) * size)
            groups.extend(idx.reshape(-1, size))
        groups_arr = np.stack(groups) if groups else np.zeros((0, self.group_size), dtype=np.int64)
        if self.shuffle:
            groups_arr = groups_arr[rng.permutation(len(groups_arr))]
        return groups_arr

    def epoch_batches(self) -> list[list[int]]:
        """All ranks' batches of the current epoch, in order; rank r gets batches r, r+R, r+2R, ..."""
        units = self._units(self._rng())
        _, per_batch = self._num_units()
        total = self._num_batches_per_rank() * self.num_replicas * per_batch
        # Drop the tail, or pad by cycling from the start of the epoch's order.
        units = units[:total] if self.drop_last else np.resize(units, (total, *units.shape[1:]))
        flat = units.reshape(-1)
        return [flat[i : i + self.batch_size].tolist() for i in range(0, len(flat), self.batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        # The skip is taken when the iterator is created (not lazily), so a resumed epoch skips
        # exactly once, however late the DataLoader asks for the first batch.
        skip, self._skip = self._skip, 0
        return self._iter_batches(skip)

    def _iter_batches(self, skip: int) -> Iterator[list[int]]:
        batches = self.epoch_batches()
        positions = range(self.rank, len(batches), self.num_replicas)
        for pos in list(positions)[skip:]:
            batch = SeededBatch(batches[pos])
            batch.seed = batch_seed(self.seed, self.epoch, pos)
            yield batch


class EvalShardSampler(Sampler[int]):
    """Shards ``range(num_samples)`` across ranks without padding: every index exactly once overall.

    Shard sizes differ by at most one, so ranks may run a different number of evaluation batches
    (at most one apart): accumulate metric states and synchronise them once at epoch end (as
    torchmetrics does) rather than logging with ``sync_dist=True`` on every step.

    Args:
        num_samples: Size of the evaluation set.
        num_replicas: Number of DDP processes (default: from ``torch.distributed``, else 1).
        rank: This process's rank (default: from ``torch.distributed``, else 0).
        mode: ``"contiguous"`` (rank r takes one block; concatenating the ranks' outputs in rank
            order restores the dataset order) or ``"strided"`` (rank r takes r, r+R, ...).
    """

    def __init__(
        self,
        num_samples: int,
        num_replicas: int | None = None,
        rank: int | None = None,
        mode: Literal["contiguous", "strided"] = "contiguous",
    ) -> None:
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if mode not in ("contiguous", "strided"):
            raise ValueError(f"mode must be 'contiguous' or 'strided', got {mode!r}")
        self.num_samples = int(num_samples)
        self.num_replicas, self.rank = distributed_info(num_replicas, rank)
        self.mode = mode

    def indices(self) -> range:
        """This rank's indices, in increasing order."""
        n, r, k = self.num_samples, self.num_replicas, self.rank
        if self.mode == "strided":
            return range(k, n, r)
        return range(k * n // r, (k + 1) * n // r)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices())

    def __len__(self) -> int:
        return len(self.indices())
