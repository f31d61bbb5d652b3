"""Any folder of images, no annotations: train MPAE on your own data and predict its parts."""

from __future__ import annotations

import os
from typing import Literal

import numpy as np

from .base import ImageRecord, ImageRecordDataset, PartDataModule, Split, require_root

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataModule", "list_images"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(root: str) -> list[str]:
    """All image files under ``root`` (recursively, hidden entries skipped), sorted by relative path."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                found.append(os.path.join(dirpath, name))
    return sorted(found, key=lambda p: os.path.relpath(p, root))


class ImageFolderDataModule(PartDataModule):
    """Every image found under ``root`` (jpg, jpeg, png, bmp, webp; searched recursively).

    There are no annotations (``has_keypoints = has_masks = False``, ``label`` = -1), so
    validation can report only the losses. With ``val_fraction > 0`` a seeded random subset is
    held out for validation (and test); otherwise validation and test reuse all images.
    Predict always runs on all images. ``index`` is the position in the split, whose order is the
    sorted relative path; ``path`` traces a prediction back to its file.

    Args:
        root: Folder searched recursively for images.
        val_fraction: Share of the images held out for validation/test (0 reuses all images).
        image_size: Side S of the square input (a multiple of the backbone patch 14, e.g. 224).
        batch_size: Training images per batch and per process; a multiple of ``mini_group`` when it is larger.
        mini_group: Chunk size of the mini-group presence loss (8 for one object category,
            64 for many).
        eval_batch_size: Images per batch for validation, test and predict.
        num_workers: DataLoader worker processes.
        seed: Seed of the training order and of the validation hold-out.
        group_by: Must stay None: the images have no class labels.
        mask_size: Unused (no masks); kept for a uniform interface.
    """

    #: Without a hold-out, validation runs on the training images (logged as ``val_on_train``).
    default_val_split = "train"

    def __init__(
        self,
        root: str,
        val_fraction: float = 0.0,
        image_size: int = 224,
        batch_size: int = 64,
        mini_group: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 2,
        seed: int = 0,
        group_by: Literal["class"] | None = None,
        mask_size: int = 128,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            mini_group=mini_group,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            group_by=group_by,
            image_size=image_size,
            mask_size=mask_size,
            val_fraction=val_fraction,
        )
        self.save_hyperparameters()
        self.root = root
        self._files: list[str] | None = None

    def files(self) -> list[str]:
        """All images, sorted (listed once)."""
        if self._files is None:
            root = require_root(self.root, "Image folder", "a folder containing images (jpg, jpeg, png, bmp, webp)")
            files = list_images(root)
            if not files:
                raise FileNotFoundError(
                    f"image folder {root} contains no images; expected files ending in {', '.join(IMAGE_EXTENSIONS)} "
                    "(searched recursively)"
                )
            self._files = files
        return self._files

    def split_files(self, split: Split) -> list[str]:
        """The files of ``split`` in sorted order."""
        files = self.files()
        if split == "predict" or self.val_fraction == 0.0:
            return files
        keep, held_out = self.holdout_indices(len(files))
        return [files[i] for i in (keep if split == "train" else held_out)]

    def split_source(self, split: Split) -> Split:
        """Validation and test read the same images: the held-out ones, or all without a hold-out."""
        if self.val_fraction > 0:
            return "val" if split == "test" else split
        return "test" if split == "val" else split

    def build_dataset(self, split: Split) -> ImageRecordDataset:
        # All images: with a hold-out, the base class splits "train" and the evaluation copy itself.
        return ImageRecordDataset([ImageRecord(path=p) for p in self.files()], self.image_size, train=split == "train")

    def build_train_eval_dataset(self) -> ImageRecordDataset:
        return self.build_dataset("val")
