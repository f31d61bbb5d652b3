"""Samplers that cut one global batch into the processes' slices, and shard evaluation sets.

MPAE's presence loss is computed over consecutive chunks of ``mini_group`` images of a batch.
Under DDP the batch that matters is the global one: ``batch_size`` images on each of the
``world_size`` processes. :class:`MiniGroupBatchSampler` builds the epoch's global batches
exactly as one process with ``batch_size x world_size`` would, and gives process ``r`` the
``r``-th contiguous slice of each, so a mini-group of 64 on 4 processes of 16 is the same 64
images as on one process of 64 (the presence loss gathers what it needs across processes).
Every image also gets its own random seeds from (seed, epoch, global batch, position in the
global batch), never from the rank. :class:`EvalShardSampler` shards evaluation sets without
the padding duplicates of ``DistributedSampler`` so that every test image counts exactly once in
a metric summed over ranks.
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
    "image_seeds",
]


class SeededBatch(list):
    """A batch of indices that carries each image's random seeds.

    ``.seed`` is the seed of the global batch; ``.augment_seeds`` and ``.mask_seeds`` hold one
    seed per image for its augmentation and its patch-mask noise (:func:`image_seeds`). They
    pickle with the batch, so a DataLoader worker seeds each image's transforms from them:
    augmentation and masking then depend on (seed, epoch, global batch, position in it) only,
    not on the worker, the number of workers or the rank.
    """

    seed: int
    augment_seeds: list[int]
    mask_seeds: list[int]


def batch_seed(seed: int, epoch: int, batch: int) -> int:
    """The seed of global batch ``batch`` (position in the epoch) of ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, batch]).generate_state(1, np.uint32)[0])


def image_seeds(seed: int, epoch: int, batch: int, positions: Sequence[int]) -> tuple[list[int], list[int]]:
    """(augmentation seeds, patch-mask seeds) of the images at ``positions`` of global batch ``batch``.

    Two independent 32-bit words per image (NumPy's ``SeedSequence``), so the flip of an image and
    its masking pattern are not drawn from the same stream.
    """
    words = [np.random.SeedSequence([seed, epoch, batch, int(p)]).generate_state(2, np.uint32) for p in positions]
    return [int(w[0]) for w in words], [int(w[1]) for w in words]


def check_mini_group(batch_size: int, mini_group: int, world_size: int = 1) -> None:
    """Refuse a global batch that the presence loss's ``torch.split(batch, mini_group)`` would cut unevenly.

    The authors cut every batch with ``torch.split``, so a mini-group at least as large as the
    batch is one group per batch (the supplement's Table 7 goes up to 128 with a batch of 64); a
    smaller mini-group must divide the batch so that every group has ``mini_group`` images.
    The batch is the global one, ``batch_size x world_size`` (a mini-group may span processes).

    Raises:
        ValueError: ``batch_size`` or ``mini_group`` is not positive, or ``mini_group`` is smaller
            than ``batch_size`` and does not divide it.
    """
    if batch_size < 1 or mini_group < 1:
        raise ValueError(f"batch_size ({batch_size}) and mini_group ({mini_group}) must be positive")
    total = batch_size * world_size
    if mini_group < total and total % mini_group != 0:
        where = "" if world_size == 1 else f" x {world_size} processes = {total} images per step"
        raise ValueError(
            f"batch_size ({batch_size}{where}) must be a multiple of mini_group ({mini_group}), or mini_group >= "
            "the global batch (one group per batch): MPAE's presence loss works on consecutive chunks of "
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
        parent = self._parent
        batches = parent.epoch_batches()[: len(parent)]
        return sum(len(b) // parent.num_replicas for b in batches)


class MiniGroupBatchSampler(Sampler[list[int]]):
    """This process's slice of each global batch, reshuffled per epoch; mini-groups may span processes.

    Every rank computes the same epoch order from ``(seed, epoch)`` and cuts it into global
    batches of ``batch_size x num_replicas`` images, exactly the batches one process with that
    batch size would get; rank ``r`` takes the ``r``-th contiguous slice of ``batch_size`` images
    of each. A mini-group is a chunk of ``mini_group`` consecutive images of the global batch, so
    it lies inside one process when ``mini_group`` divides ``batch_size`` and spans neighbouring
    processes otherwise (the presence loss then gathers the group's part peaks across them).

    With ``group_by="class"`` each mini-group is filled with images of a single class: per class
    the images are shuffled and cut into chunks of ``mini_group``, the chunks are shuffled and
    then concatenated into global batches.

    Every yielded batch is a :class:`SeededBatch`: each image carries seeds for its augmentation
    and its patch-mask noise drawn from (seed, epoch, global batch, position in the global batch),
    so 1 and N processes draw the same random numbers for the same image.

    Use it as ``DataLoader(dataset, batch_sampler=sampler)``; the Trainer must run with
    ``use_distributed_sampler=False`` so that Lightning does not replace it. Lightning's epoch
    hook reaches :meth:`set_epoch` through the ``sampler`` attribute.

    Args:
        data_source: The dataset size, or a sequence with one class label per item (needed for
            ``group_by="class"``; labels may be any hashable ints, -1 included).
        batch_size: Images per batch on one rank; the global batch ``batch_size x num_replicas``
            is a multiple of ``mini_group`` when it is larger.
        mini_group: Chunk size of MPAE's mini-group presence loss; ``mini_group >=`` the global
            batch means one group per batch (``group_by="class"`` then fills each batch with one class).
        shuffle: Reshuffle every epoch (deterministically from ``seed`` and the epoch). Without it
            the order is the dataset order.
        seed: Seed shared by all ranks.
        drop_last: Drop the images that do not fill a whole global batch (with ``group_by``, also
            the images that do not fill a whole mini-group of their class), so each index appears
            at most once per epoch. Otherwise, as the authors' ``DataLoader`` does, the
            ``n mod (batch_size x num_replicas)`` images left make one last, smaller global batch:
            on one process all of them; on R processes each rank takes ``floor(rest / R)`` of them
            (equal slices, so the gradient average stays exact) and the ``rest mod R`` images after
            those (fewer than R) are left out of this epoch. With ``group_by="class"`` the epoch is
            instead padded by repeating groups from its beginning, so every batch is full.
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
        if group_by not in (None, "class"):
            raise ValueError(f"group_by must be None or 'class', got {group_by!r}")
        if group_by == "class" and self.labels is None:
            raise ValueError("group_by='class' needs one label per item: pass the labels, not the dataset size")
        self.num_replicas, self.rank = distributed_info(num_replicas, rank)
        check_mini_group(batch_size, mini_group, self.num_replicas)
        self.batch_size = int(batch_size)
        self.mini_group = int(mini_group)
        self.global_batch_size = self.batch_size * self.num_replicas
        # The groups the loss sees: torch.split(global batch, mini_group) is one group when mini_group >= it.
        self.group_size = min(self.mini_group, self.global_batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.drop_last = bool(drop_last)
        self.group_by = group_by
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
        """(number of shuffling units in an epoch, units per global batch); a unit is an index or a group."""
        if self.group_by is None:
            return self.num_samples, self.global_batch_size
        rounding = math.floor if self.drop_last else math.ceil
        groups = sum(rounding(c / self.group_size) for c in self._class_counts())
        return groups, self.global_batch_size // self.group_size

    def _num_batches_per_rank(self) -> int:
        units, per_batch = self._num_units()
        full = units // per_batch
        if self.drop_last:
            return full
        if self.group_by is not None:  # padded to full batches
            return math.ceil(units / per_batch)
        return full + int(units - full * per_batch >= self.num_replicas)  # the smaller last batch

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
        """The global batches of the current epoch, in order (what one process with
        ``batch_size x num_replicas`` trains on); rank r takes the r-th slice of each."""
        units = self._units(self._rng())
        _, per_batch = self._num_units()
        full = len(units) // per_batch * per_batch
        if self.drop_last:
            units = units[:full]
        elif self.group_by is not None:  # pad by cycling from the start of the epoch's order
            units = np.resize(units, (self._num_batches_per_rank() * per_batch, *units.shape[1:]))
        flat = units.reshape(-1)
        size = self.global_batch_size
        return [flat[i : i + size].tolist() for i in range(0, len(flat), size)]

    def __iter__(self) -> Iterator[list[int]]:
        # The skip is taken when the iterator is created (not lazily), so a resumed epoch skips
        # exactly once, however late the DataLoader asks for the first batch.
        skip, self._skip = self._skip, 0
        return self._iter_batches(skip)

    def _iter_batches(self, skip: int) -> Iterator[list[int]]:
        batches = self.epoch_batches()[: self._num_batches_per_rank()]
        for pos in range(skip, len(batches)):
            whole = batches[pos]
            share = len(whole) // self.num_replicas  # batch_size, or floor(rest / R) for the last one
            start = self.rank * share
            batch = SeededBatch(whole[start : start + share])
            batch.seed = batch_seed(self.seed, self.epoch, pos)
            batch.augment_seeds, batch.mask_seeds = image_seeds(self.seed, self.epoch, pos, range(start, start + share))
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
