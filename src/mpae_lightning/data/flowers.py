"""Oxford Flowers-102 in torchvision's layout, with PDiscoFormer's foreground masks (docs/defaults.md §6.7)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .base import (
    DatasetFormatError,
    ImageRecord,
    ImageRecordDataset,
    PartDataModule,
    Split,
    check_files_exist,
    check_masks_exist,
    object_mask_dataset,
    read_segmentation,
    require_file,
    require_root,
)

__all__ = [
    "FLOWERS102_SPLITS",
    "Flowers102DataModule",
    "flowers102_foreground",
    "flowers102_mask_paths",
    "load_flowers102_foreground_mask",
    "read_flowers102",
]

#: Our split name -> the array of ``setid.mat`` that lists it (torchvision's and PDiscoFormer's).
FLOWERS102_SPLITS = {"train": "trnid", "val": "valid", "test": "tstid"}
_EXPECTED = (
    "the flowers-102 folder of torchvision's Flowers102 download (jpg/image_NNNNN.jpg, imagelabels.mat, setid.mat)"
)
_SEGMENTATIONS = (
    "the segmentations download of Oxford Flowers-102 (102segmentations.tgz: segmim/segmim_NNNNN.jpg, one per image, "
    "background pure blue)"
)


def _resolve_root(root: str) -> str:
    """The folder with ``setid.mat``: ``root`` itself or its ``flowers-102`` (torchvision's root)."""
    root = require_root(root, "Flowers-102", _EXPECTED)
    if not os.path.isfile(os.path.join(root, "setid.mat")):
        nested = os.path.join(root, "flowers-102")
        if os.path.isfile(os.path.join(nested, "setid.mat")):
            return nested
        raise FileNotFoundError(f"Flowers-102 root {root} does not contain setid.mat; expected {_EXPECTED}")
    return root


def _mat_array(path: str, key: str, what: str) -> np.ndarray:
    """Array ``key`` of a MATLAB file as 1-D positive integers (``scipy.io.loadmat``, as torchvision reads it)."""
    from scipy.io import loadmat

    require_file(path, what)
    try:
        content = loadmat(path, squeeze_me=True)
    except Exception as err:  # noqa: BLE001 - MatReadError, ValueError, IndexError ... on other files
        raise DatasetFormatError(
            f"cannot read {path} as a MATLAB file ({type(err).__name__}: {err}); expected {what}"
        ) from None
    if key not in content:
        found = ", ".join(sorted(k for k in content if not k.startswith("__"))) or "none"
        raise DatasetFormatError(f"{path} has no array {key!r} (found: {found}); expected {what}")
    values = np.atleast_1d(np.asarray(content[key]))
    numeric = values.ndim == 1 and np.issubdtype(values.dtype, np.number) and bool(np.all(np.isfinite(values)))
    if not numeric or not np.all(values == np.round(values)) or (values.size and values.min() < 1):
        raise DatasetFormatError(f"{path}: {key!r} must be a vector of positive integers; expected {what}")
    return values.astype(np.int64)


def read_flowers102(root: str, split: Literal["train", "val", "test"]) -> list[ImageRecord]:
    """Read one split of Oxford Flowers-102 in ``setid.mat`` order, as ``torchvision.datasets.Flowers102``.

    Args:
        root: The ``flowers-102`` folder (or the folder that contains it, torchvision's ``root``).
        split: ``"train"`` (``trnid``, 1,020 images), ``"val"`` (``valid``, 1,020) or ``"test"``
            (``tstid``, 6,149).

    Returns:
        One record per image, ``jpg/image_<id:05d>.jpg``, with its 0-based class from
        ``imagelabels.mat``; no keypoints.
    """
    if split not in FLOWERS102_SPLITS:
        raise ValueError(f"split must be one of {', '.join(FLOWERS102_SPLITS)}, got {split!r}")
    root = _resolve_root(root)
    setid = os.path.join(root, "setid.mat")
    labels_mat = os.path.join(root, "imagelabels.mat")
    ids = _mat_array(setid, FLOWERS102_SPLITS[split], f"the split lists of {_EXPECTED}")
    labels = _mat_array(labels_mat, "labels", f"the 1-based class of every image of {_EXPECTED}")
    if ids.size and ids.max() > labels.size:
        raise DatasetFormatError(
            f"{setid}: image id {int(ids.max())} of {FLOWERS102_SPLITS[split]!r} has no class in {labels_mat} "
            f"({labels.size} labels)"
        )
    records = [
        ImageRecord(path=os.path.join(root, "jpg", f"image_{i:05d}.jpg"), label=int(labels[i - 1]) - 1) for i in ids
    ]
    check_files_exist([r.path for r in records], setid, os.path.join(root, "jpg"))
    return records


def _resolve_segmentations(folder: str) -> str:
    """The folder of the ``segmim_*.jpg`` files: ``folder``, its ``segmim`` or its ``flowers-102/segmim``."""
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"Flowers-102 segmentations folder {folder} does not exist or is not a folder; expected {_SEGMENTATIONS}"
        )
    for nested in (os.path.join(folder, "segmim"), os.path.join(folder, "flowers-102", "segmim")):
        if os.path.isdir(nested):
            return nested
    return folder


def flowers102_mask_paths(records: Sequence[ImageRecord], segmentations: str) -> list[str]:
    """``segmim_<id>.jpg`` of each ``image_<id>.jpg`` record, under ``segmentations``.

    Raises:
        FileNotFoundError: The folder or some of the segmentations do not exist; one line naming them.
    """
    folder = _resolve_segmentations(segmentations)
    paths = [os.path.join(folder, "segmim_" + os.path.basename(r.path).split("_")[-1]) for r in records]
    check_masks_exist(paths, "segmentation images", _SEGMENTATIONS, folder)
    return paths


def _median5(mask: np.ndarray) -> np.ndarray:
    """5×5 median of a binary image with replicated borders (``cv2.medianBlur(mask, 5)``): 13 of 25 set."""
    padded = np.pad(mask.astype(np.int32), 2, mode="edge")
    table = np.pad(padded.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    counts = table[5:, 5:] - table[:-5, 5:] - table[5:, :-5] + table[:-5, :-5]
    return counts >= 13


def flowers102_foreground(rgb: np.ndarray) -> np.ndarray:
    """The flower of a ``segmim`` image as PDiscoFormer's ``Flowers102Seg`` derives it (docs/evaluation.md §10).

    Background where blue exceeds 100 times green + red, ``B / (G + R + 1e-6) > 100``, with
    ``G + R`` summed in uint8 as theirs (it wraps at 256: a bright pixel with ``G + R`` of 256 to
    258 can count as background); this keeps the pure-blue background and its JPEG noise
    (e.g. (2, 0, 250)) out of the flower. The foreground is the rest, then 5×5-median filtered
    (``cv2.medianBlur``, replicated borders) when it has both values.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB.

    Returns:
        ``(H, W)`` bool, True on the flower.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 RGB image, got shape {rgb.shape} {rgb.dtype}")
    red, green, blue = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    green_red = green + red  # uint8: wraps as in their code
    foreground = ~(blue / (green_red + 1e-6) > 100)
    if foreground.any() and not foreground.all():
        foreground = _median5(foreground)
    return foreground


def load_flowers102_foreground_mask(
    path: str, image_size: int, image_wh: tuple[int, int] | None = None
) -> torch.Tensor:
    """A ``segmim`` image as the binary foreground of the S×S evaluation input.

    :func:`flowers102_foreground` at the original size (the file read as PIL's RGB, as theirs),
    then squashed to S×S like the evaluation image, nearest, by PyTorch's rule
    (``F.interpolate(mode="nearest")``, what their torchvision ``Resize(NEAREST)`` of the mask
    tensor runs).

    Args:
        path: The ``segmim_NNNNN.jpg`` file.
        image_size: Side S of the evaluation input.
        image_wh: The image's (width, height); a segmentation of another size is refused.

    Returns:
        ``(S, S)`` bool.

    Raises:
        FileNotFoundError: The file does not exist.
        ImageReadError: The file cannot be decoded.
        DatasetFormatError: Its size is not the image's.
    """
    rgb = read_segmentation(path, "RGB", "segmentation image", f"a JPEG of {_SEGMENTATIONS}", image_wh)
    mask = torch.from_numpy(flowers102_foreground(rgb).astype(np.float32))[None, None]
    return F.interpolate(mask, size=(image_size, image_size), mode="nearest")[0, 0] > 0.5


class Flowers102DataModule(PartDataModule):
    """Oxford Flowers-102 (102 classes, no part annotations), scored by foreground IoU as PDiscoFormer.

    Reads ``root`` in the layout ``torchvision.datasets.Flowers102`` downloads (PDiscoFormer's
    ``--data_path``): ``flowers-102/jpg/image_NNNNN.jpg``, ``imagelabels.mat`` and ``setid.mat``.
    As PDiscoFormer, training uses the ``train`` split (``trnid``, 1,020 images) and validation,
    test and predict the ``test`` split (``tstid``, 6,149 images; ``val_fraction`` holds out
    training images instead); ``index`` is the position in ``setid.mat``'s order, ``label`` the
    0-based class. With ``segmentations`` (the dataset's separate ``102segmentations.tgz``),
    evaluation items carry ``fg_mask`` (S, S) bool, the flower as PDiscoFormer's
    ``Flowers102Seg`` derives it from ``segmim/segmim_NNNNN.jpg`` (:func:`flowers102_foreground`),
    squashed to S×S like the image, and ``mpae test`` / validation log ``fg_iou`` and ``bg_iou``
    (docs/evaluation.md §10). Without it there is nothing to score (``mpae test`` refuses).

    Args:
        root: The ``flowers-102`` folder, or the folder that contains it.
        image_size: Side S of the square input (PDiscoFormer on Flowers: 224).
        batch_size: Training images per batch and per process; a multiple of ``mini_group`` when it is larger.
        mini_group: Chunk size of the mini-group presence loss (8: one kind of object).
        eval_batch_size: Images per batch for validation, test and predict.
        num_workers: DataLoader worker processes.
        seed: Seed of the training order.
        group_by: ``"class"`` to fill each training mini-group with one flower species, or None.
        mask_size: Unused (no part masks; ``fg_mask`` is S×S, as the protocol compares at the input
            size); kept for a uniform interface.
        val_fraction: Share of the training split held out for validation instead of the test split
            (0: the test split, as PDiscoFormer; logged as ``val_on_test``).
        drop_last: Drop the training images that do not fill a whole global batch (see
            :class:`PartDataModule`).
        input_antialias: Resize to S×S with antialiasing (default; PDiscoFormer's torchvision
            ``Resize`` of PIL images antialiases) or without (see :class:`PartDataModule`); with
            ``--ckpt_path`` and not given, the checkpoint's value.
        segmentations: The folder of the ``segmim_NNNNN.jpg`` files, or a folder that contains
            ``segmim/`` (e.g. ``root``, as PDiscoFormer's README lays it out); every evaluation image
            needs its segmentation. Default None: no foreground masks (not looked for, so the scores
            never depend on what else lies in ``root``).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 64,
        mini_group: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 2,
        seed: int = 0,
        group_by: Literal["class"] | None = None,
        mask_size: int = 128,
        val_fraction: float = 0.0,
        drop_last: bool = False,
        input_antialias: bool = True,
        segmentations: str | None = None,
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
            drop_last=drop_last,
            input_antialias=input_antialias,
        )
        self.save_hyperparameters()
        self.root = root
        self.segmentations = segmentations
        #: Evaluation items carry ``fg_mask``; MPAEModule then logs ``fg_iou`` / ``bg_iou``.
        self.has_fg_masks = segmentations is not None

    def split_source(self, split: Split) -> Split:
        """Validation and prediction read the test split (PDiscoFormer evaluates on it)."""
        return "train" if split == "train" else "test"

    def build_dataset(self, split: Split) -> ImageRecordDataset:
        if split == "train":
            return ImageRecordDataset(read_flowers102(self.root, "train"), self.image_size, train=True,
                                      squash=not self.input_antialias)
        return self._eval_dataset("test")

    def build_train_eval_dataset(self) -> ImageRecordDataset:
        return self._eval_dataset("train")

    def _eval_dataset(self, split: Literal["train", "test"]) -> ImageRecordDataset:
        """Evaluation images of ``split``, with their foreground masks when ``segmentations`` is set."""
        records = read_flowers102(self.root, split)
        paths = None if self.segmentations is None else flowers102_mask_paths(records, self.segmentations)
        return object_mask_dataset(records, self.image_size, not self.input_antialias, paths,
                                   load_flowers102_foreground_mask)
