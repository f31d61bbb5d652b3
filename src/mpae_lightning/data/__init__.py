"""DataModules, samplers and transforms for MPAE.

Every DataModule yields dict batches: ``image`` (B, 3, S, S) ImageNet-normalised, ``index``
(position in the split, in the dataset's own listing order), ``path`` and ``label`` (-1 if
unknown); evaluation batches of keypoint datasets add ``keypoints`` (B, P, 2) in pixels of the
S×S image and ``visible`` (B, P), mask datasets add ``mask`` (B, mask_size, mask_size) long with
the background as the last label, and object-mask datasets (CUB or Flowers-102 with
``segmentations``) add ``fg_mask`` (B, S, S) bool. Train with ``Trainer(use_distributed_sampler=False)``: the
DataModules shard their batches themselves.
"""

import warnings

# `python -m mpae_lightning.data.synthetic` runs a module this package has already imported (for the
# re-exports below); runpy then warns about the second copy, which is harmless here.
warnings.filterwarnings(
    "ignore", message=r"'mpae_lightning\.data\.synthetic' found in sys\.modules", category=RuntimeWarning
)

from .base import DatasetFormatError, ImageReadError, ImageRecord, ImageRecordDataset, PartDataModule, load_rgb
from .celeba import CelebADataModule
from .cub import CUBDataModule
from .flowers import Flowers102DataModule
from .image_folder import ImageFolderDataModule
from .partimagenet import PartImageNetDataModule
from .samplers import EvalShardSampler, MiniGroupBatchSampler
from .synthetic import NUM_PART_TYPES, PART_NAMES, SyntheticPartsDataModule, SyntheticPartsDataset
from .transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    denormalize,
    eval_transform,
    input_transform,
    normalize,
    scale_keypoints,
    train_transform,
)

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_PART_TYPES",
    "PART_NAMES",
    "CUBDataModule",
    "CelebADataModule",
    "DatasetFormatError",
    "EvalShardSampler",
    "Flowers102DataModule",
    "ImageFolderDataModule",
    "ImageReadError",
    "ImageRecord",
    "ImageRecordDataset",
    "MiniGroupBatchSampler",
    "PartDataModule",
    "PartImageNetDataModule",
    "SyntheticPartsDataModule",
    "SyntheticPartsDataset",
    "denormalize",
    "eval_transform",
    "input_transform",
    "load_rgb",
    "normalize",
    "scale_keypoints",
    "train_transform",
]
