"""A training DataLoader that Lightning can checkpoint mid-epoch, with seeded augmentation.

Lightning saves ``state_dict()`` of every training loader that has one and calls
``load_state_dict()`` before it creates the resumed iterator. Together with the per-image
augmentation and masking seeds carried by :class:`~mpae_lightning.data.samplers.SeededBatch`, a resumed run
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
    """Wraps a dataset so each image's random transforms are seeded by the image's own seed.

    The seeds come with the :class:`~mpae_lightning.data.samplers.SeededBatch` (one per position
    in the global batch), so an image is augmented the same way whichever process, worker or
    neighbours it is read with. Dict items also get ``"mask_seed"``, the seed of the image's
    patch-mask noise, which :class:`~mpae_lightning.MPAEModule` draws from in its training step.
    The global torch, NumPy and Python generators are seeded per image and restored after the
    batch, so reading a batch in the main process (``num_workers=0``) leaves the training step's
    random stream untouched, and a worker's state does not carry from one image into the next.

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
        augment_seeds = getattr(indices, "augment_seeds", None)
        if augment_seeds is None:
            return [self.dataset[i] for i in indices]
        mask_seeds = indices.mask_seeds  # type: ignore[attr-defined]
        np_state, py_state = np.random.get_state(), random.getstate()
        items = []
        with torch.random.fork_rng(devices=[]):
            try:
                for index, seed, mask_seed in zip(indices, augment_seeds, mask_seeds):
                    torch.manual_seed(seed)
                    np.random.seed(seed)
                    random.seed(seed)
                    item = self.dataset[index]
                    if isinstance(item, dict):
                        item["mask_seed"] = mask_seed
                    items.append(item)
            finally:
                np.random.set_state(np_state)
                random.setstate(py_state)
        return items


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
