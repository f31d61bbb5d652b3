"""A training DataLoader that Lightning can checkpoint mid-epoch, with seeded augmentation.

Lightning saves ``state_dict()`` of every training loader that has one and calls
``load_state_dict()`` before it creates the resumed iterator. Together with the per-batch
augmentation seed carried by :class:`~mpae_lightning.data.samplers.SeededBatch`, a resumed run
sees exactly the batches, and exactly the augmented images, that the uninterrupted run saw.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .samplers import MiniGroupBatchSampler

__all__ = ["ResumableDataLoader", "SeededBatchDataset"]


class SeededBatchDataset(Dataset):
    """Wraps a dataset so each batch's random transforms are seeded by the batch's own seed.

    The global torch, NumPy and Python generators are seeded for the batch and restored after it,
    so reading a batch in the main process (``num_workers=0``) leaves the training step's random
    stream untouched, and a worker's state does not carry from one batch into the next.

    Args:
        dataset: The map-style training dataset.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        return self.dataset[index]

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        seed = getattr(indices, "seed", None)
        if seed is None:
            return [self.dataset[i] for i in indices]
        np_state, py_state = np.random.get_state(), random.getstate()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            np.random.seed(seed)
            random.seed(seed)
            try:
                return [self.dataset[i] for i in indices]
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)


class ResumableDataLoader(DataLoader):
    """A DataLoader over a :class:`MiniGroupBatchSampler` that knows how far its epoch got.

    ``state_dict()`` reports the epoch and how many batches this rank has handed out in it (what
    Lightning's loop has trained on when it saves: Lightning does not prefetch sized loaders);
    ``load_state_dict()`` makes the next iterator start at the first batch not yet trained on.
    """

    def __init__(self, dataset: Dataset, batch_sampler: MiniGroupBatchSampler, **kwargs: Any) -> None:
        super().__init__(SeededBatchDataset(dataset), batch_sampler=batch_sampler, **kwargs)
        self._epoch = batch_sampler.epoch
        self._handed_out = 0

    def __iter__(self) -> Iterator[Any]:
        sampler: MiniGroupBatchSampler = self.batch_sampler  # type: ignore[assignment]
        self._epoch, self._handed_out = sampler.epoch, sampler.pending_skip
        return self._count(super().__iter__())

    def _count(self, iterator: Iterator[Any]) -> Iterator[Any]:
        for batch in iterator:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        """Seed, epoch and batches handed out (the sampler's resume point)."""
        sampler: MiniGroupBatchSampler = self.batch_sampler  # type: ignore[assignment]
        return {"seed": sampler.seed, "epoch": self._epoch, "batches_done": self._handed_out}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume from :meth:`state_dict` (called by Lightning before the resumed iterator is made)."""
        self.batch_sampler.load_state_dict(state)  # type: ignore[union-attr]
