"""Unaligned ("wild") CelebA with the paper's landmark split lists (docs/defaults.md §6.2)."""

from __future__ import annotations

import os
from importlib import resources
from typing import Literal

import numpy as np

from .base import (
    DatasetFormatError,
    ImageRecord,
    ImageRecordDataset,
    PartDataModule,
    Split,
    check_files_exist,
    require_file,
    require_root,
)

__all__ = ["CelebADataModule", "default_celeba_list", "read_celeba_list"]

CELEBA_NUM_KEYPOINTS = 5
_LISTS = {"train": "cele_train_lm.txt", "test": "MAFL_test_lm.txt"}
_EXPECTED = "the unaligned CelebA folder with img_celeba/NNNNNN.jpg (the 'In-The-Wild' images)"


def default_celeba_list(split: Literal["train", "test"]) -> str:
    """Path of the shipped split list: ``cele_train_lm.txt`` (45,609) or ``MAFL_test_lm.txt`` (283)."""
    ref = resources.files("mpae_lightning.data").joinpath("celeba", _LISTS[split])
    return str(ref)


def read_celeba_list(path: str, image_dir: str) -> list[ImageRecord]:
    """Parse a ``name,x1,y1,...,x5,y5`` landmark list (original-image pixels) into records.

    Args:
        path: The list file.
        image_dir: Folder holding the listed images.
    """
    require_file(path, "a CelebA landmark list with lines 'name,x1,y1,...,x5,y5'")
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            fields = [f.strip() for f in line.split(",")]
            if len(fields) != 1 + 2 * CELEBA_NUM_KEYPOINTS:
                raise DatasetFormatError(
                    f"{path} line {lineno}: expected 'name,x1,y1,...,x5,y5' (11 comma-separated fields), "
                    f"got {len(fields)}: {line!r}"
                )
            try:
                coords = np.asarray([float(v) for v in fields[1:]], dtype=np.float64).reshape(-1, 2)
            except ValueError:
                raise DatasetFormatError(
                    f"{path} line {lineno}: landmark coordinates must be numbers: {line!r}"
                ) from None
            if not np.isfinite(coords).all():
                raise DatasetFormatError(
                    f"{path} line {lineno}: landmark coordinates must be finite numbers (a missing landmark would be "
                    f"scored at pixel (0, 0)): {line!r}"
                )
            records.append(
                ImageRecord(
                    path=os.path.join(image_dir, fields[0]),
                    keypoints=coords,
                    visible=np.ones(CELEBA_NUM_KEYPOINTS, dtype=bool),
                )
            )
    check_files_exist([r.path for r in records], path, image_dir)
    return records


class CelebADataModule(PartDataModule):
    """Unaligned CelebA with 5 landmarks (keypoint evaluation mode, all 5 keypoints count).

    Images are read from ``root/img_celeba/``; the splits are the paper's landmark lists shipped
    with the package (45,609 training images, 283 MAFL test images) unless ``train_list`` /
    ``test_list`` are given, in the same ``name,x1,y1,...,x5,y5`` syntax. Validation, test and
    predict use the test list; ``index`` is the line position in the list. As in the authors'
    loader, every image is first squashed to S×S (bilinear without antialiasing, like their
    ``cv2.resize``) on both splits; training then flips and applies the random affine to the
    squashed image. Evaluation items carry ``keypoints`` (5, 2) (eyes, nose, mouth corners) in
    pixels of the S×S image (x·S/W, y·S/H) and ``visible`` (all True). ``label`` is -1.

    Args:
        root: The CelebA folder that contains ``img_celeba/``.
        train_list: A training landmark list instead of the shipped ``cele_train_lm.txt``.
        test_list: A test landmark list instead of the shipped ``MAFL_test_lm.txt``.
        image_size: Side S of the square input (paper: 224).
        batch_size: Training images per batch and per process; a multiple of ``mini_group`` when it is larger.
        mini_group: Chunk size of the mini-group presence loss (paper: 8).
        eval_batch_size: Images per batch for validation, test and predict.
        num_workers: DataLoader worker processes.
        seed: Seed of the training order.
        group_by: ``"class"`` groups by label; CelebA has none (all -1), so this changes nothing.
        mask_size: Unused (CelebA has no part masks); kept for a uniform interface.
        val_fraction: Share of the training list held out for validation (with landmarks) instead of
            the test list (0: the test list, as the authors do; logged as ``val_on_test``).
    """

    #: Keypoint regression error (KPR) divides by the inter-ocular distance (keypoints 0 and 1), as PDiscoNet.
    keypoint_normalization = "interocular"

    def __init__(
        self,
        root: str,
        train_list: str | None = None,
        test_list: str | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        mini_group: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 2,
        seed: int = 0,
        group_by: Literal["class"] | None = None,
        mask_size: int = 128,
        val_fraction: float = 0.0,
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
        self.train_list = train_list
        self.test_list = test_list
        self.has_keypoints = True
        self.num_keypoints = CELEBA_NUM_KEYPOINTS

    def _image_dir(self) -> str:
        root = require_root(self.root, "CelebA", _EXPECTED)
        image_dir = os.path.join(root, "img_celeba")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"CelebA root {root} does not contain img_celeba/; expected {_EXPECTED}")
        return image_dir

    def split_source(self, split: Split) -> Split:
        """Validation and prediction read the test split (the authors validate on it)."""
        return "train" if split == "train" else "test"

    def build_dataset(self, split: Split) -> ImageRecordDataset:
        if split == "train":
            path = self.train_list or default_celeba_list("train")
            return ImageRecordDataset(
                read_celeba_list(path, self._image_dir()), self.image_size, train=True, squash=True
            )
        path = self.test_list or default_celeba_list("test")
        return ImageRecordDataset(read_celeba_list(path, self._image_dir()), self.image_size, train=False, squash=True)

    def build_train_eval_dataset(self) -> ImageRecordDataset:
        path = self.train_list or default_celeba_list("train")
        return ImageRecordDataset(read_celeba_list(path, self._image_dir()), self.image_size, train=False, squash=True)
