"""CUB-200-2011 read from the folder as it ships (docs/defaults.md §6.1)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch

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
    "CUBDataModule",
    "foreground_mask_paths",
    "load_foreground_mask",
    "nearest_indices",
    "read_cub",
]

CUB_NUM_KEYPOINTS = 15
_EXPECTED = (
    "the CUB_200_2011 folder as it ships (images.txt, train_test_split.txt, parts/part_locs.txt, "
    "image_class_labels.txt, images/)"
)


def _read_table(path: str, columns: int, what: str) -> list[tuple[int, list[str]]]:
    """``(line number, fields)`` of every non-empty line; exactly ``columns`` fields each."""
    rows = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DatasetFormatError(
                    f"{path} line {lineno}: not UTF-8 text ({err.reason} at byte {err.start}); expected lines of "
                    f"{what}; the file may be corrupt or the wrong file"
                ) from None
            parts = line.split()
            if not parts:
                continue
            if len(parts) != columns:
                raise DatasetFormatError(
                    f"{path} line {lineno}: expected {columns} fields ({what}), got {len(parts)}: {line.strip()[:80]!r}"
                )
            rows.append((lineno, parts))
    return rows


def _int(path: str, value: str, lineno: int | None = None, allowed: tuple[int, ...] | None = None) -> int:
    where = f"{path} line {lineno}" if lineno is not None else path
    try:
        number = int(value)
    except ValueError:
        raise DatasetFormatError(f"{where}: expected an integer, got {value!r}") from None
    if allowed is not None and number not in allowed:
        raise DatasetFormatError(f"{where}: expected one of {', '.join(map(str, allowed))}, got {value!r}")
    return number


def _resolve_root(root: str) -> str:
    root = require_root(root, "CUB", _EXPECTED)
    if not os.path.isfile(os.path.join(root, "images.txt")):
        nested = os.path.join(root, "CUB_200_2011")
        if os.path.isfile(os.path.join(nested, "images.txt")):
            return nested
        raise FileNotFoundError(f"CUB root {root} does not contain images.txt; expected {_EXPECTED}")
    return root


def read_cub(root: str, split: Literal["train", "test"]) -> list[ImageRecord]:
    """Read one split of CUB-200-2011 in ``images.txt`` order.

    Args:
        root: The ``CUB_200_2011`` folder (or its parent).
        split: ``"train"`` (is_train = 1, 5,994 images) or ``"test"`` (5,794 images).

    Returns:
        One record per image with its 0-based class label, the 15 part locations (x, y) in
        original-image pixels, their visibility flags and, if ``bounding_boxes.txt`` is there,
        the bird's box (x, y, width, height).
    """
    root = _resolve_root(root)
    images_txt = os.path.join(root, "images.txt")
    split_txt = require_file(os.path.join(root, "train_test_split.txt"), f"the train/test split file of {_EXPECTED}")
    parts_txt = require_file(os.path.join(root, "parts", "part_locs.txt"), f"the part locations of {_EXPECTED}")
    labels_txt = os.path.join(root, "image_class_labels.txt")
    boxes_txt = os.path.join(root, "bounding_boxes.txt")

    images = [(_int(images_txt, r[0], n), r[1]) for n, r in _read_table(images_txt, 2, "image_id path")]
    is_train = {
        _int(split_txt, r[0], n): _int(split_txt, r[1], n, allowed=(0, 1))
        for n, r in _read_table(split_txt, 2, "image_id is_train")
    }
    labels: dict[int, int] = {}
    if os.path.isfile(labels_txt):
        labels = {
            _int(labels_txt, r[0], n): _int(labels_txt, r[1], n) - 1
            for n, r in _read_table(labels_txt, 2, "image_id class_id")
        }

    ids = {img_id for img_id, _ in images}
    boxes: dict[int, np.ndarray] = {}
    if os.path.isfile(boxes_txt):  # optional: the keypoint regression error normalises by it
        for n, r in _read_table(boxes_txt, 5, "image_id x y width height"):
            try:
                boxes[_int(boxes_txt, r[0], n)] = np.array([float(v) for v in r[1:5]], dtype=np.float64)
            except ValueError:
                raise DatasetFormatError(f"{boxes_txt} line {n}: expected float box coordinates, got {r[1:5]!r}") from None
    keypoints = {i: np.zeros((CUB_NUM_KEYPOINTS, 2), dtype=np.float64) for i in ids}
    visible = {i: np.zeros(CUB_NUM_KEYPOINTS, dtype=bool) for i in ids}
    for n, r in _read_table(parts_txt, 5, "image_id part_id x y visible"):
        img_id, part_id = _int(parts_txt, r[0], n), _int(parts_txt, r[1], n)
        if img_id not in ids:
            continue
        if not 1 <= part_id <= CUB_NUM_KEYPOINTS:
            raise DatasetFormatError(f"{parts_txt} line {n}: part id {part_id} outside 1..{CUB_NUM_KEYPOINTS}")
        try:
            xy = (float(r[2]), float(r[3]))
        except ValueError:
            raise DatasetFormatError(f"{parts_txt} line {n}: expected float coordinates, got {r[2]!r} {r[3]!r}") from None
        if not all(np.isfinite(xy)):
            raise DatasetFormatError(f"{parts_txt} line {n}: coordinates must be finite, got {r[2]!r} {r[3]!r}")
        keypoints[img_id][part_id - 1] = xy
        visible[img_id][part_id - 1] = _int(parts_txt, r[4], n, allowed=(0, 1)) != 0

    want = 1 if split == "train" else 0
    records = []
    for img_id, rel in images:
        if img_id not in is_train:
            raise DatasetFormatError(f"{split_txt} has no entry for image id {img_id} of {images_txt}")
        if is_train[img_id] != want:
            continue
        records.append(
            ImageRecord(
                path=os.path.join(root, "images", rel),
                label=labels.get(img_id, -1),
                keypoints=keypoints[img_id],
                visible=visible[img_id],
                box=boxes.get(img_id),
            )
        )
    check_files_exist([r.path for r in records], images_txt, os.path.join(root, "images"))
    return records


_SEGMENTATIONS = (
    "the segmentations download of CUB-200-2011 (segmentations/<class folder>/<image>.png, one PNG per "
    "image of images.txt)"
)


def _resolve_segmentations(folder: str) -> str:
    """The folder of the class folders: ``folder`` itself or its ``segmentations`` subfolder."""
    folder = os.path.abspath(os.path.expanduser(folder))
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"CUB segmentations folder {folder} does not exist or is not a folder; expected {_SEGMENTATIONS}"
        )
    nested = os.path.join(folder, "segmentations")
    return nested if os.path.isdir(nested) else folder


def foreground_mask_paths(root: str, records: Sequence[ImageRecord], segmentations: str) -> list[str]:
    """The segmentation PNG of each record: its path under ``images/`` with ``.png``, under ``segmentations``.

    Args:
        root: The ``CUB_200_2011`` folder (or its parent) the records were read from.
        records: Records of :func:`read_cub`.
        segmentations: The folder of the segmentations download (or the folder that contains it).

    Raises:
        FileNotFoundError: The folder or some of the masks do not exist; one line naming them.
    """
    images = os.path.join(_resolve_root(root), "images")
    folder = _resolve_segmentations(segmentations)
    paths = [os.path.join(folder, os.path.splitext(os.path.relpath(r.path, images))[0] + ".png") for r in records]
    check_masks_exist(paths, "segmentation masks", _SEGMENTATIONS, folder)
    return paths


def load_foreground_mask(path: str, image_size: int, image_wh: tuple[int, int] | None = None) -> torch.Tensor:
    """A CUB segmentation as the binary foreground of the S×S evaluation input.

    As the PDiscoFormer authors read CUB's masks (docs/evaluation.md §10): grey levels (PIL's
    ``convert("L")``, as ``cv2.IMREAD_GRAYSCALE``), foreground where the value is above 0 (any
    annotator's vote) at the original size; then, like the evaluation image, squashed to S×S with
    nearest interpolation by cv2's ``INTER_NEAREST`` rule, which albumentations applies to their
    masks (:func:`nearest_indices`).

    Args:
        path: The segmentation PNG.
        image_size: Side S of the evaluation input.
        image_wh: The image's (width, height); a mask of another size is refused.

    Returns:
        ``(S, S)`` bool.

    Raises:
        FileNotFoundError: The file does not exist.
        ImageReadError: The file cannot be decoded.
        DatasetFormatError: Its size is not the image's.
    """
    grey = read_segmentation(path, "L", "segmentation mask", f"a PNG of {_SEGMENTATIONS}", image_wh)
    height, width = grey.shape
    rows, cols = nearest_indices(height, image_size), nearest_indices(width, image_size)
    return torch.from_numpy(np.ascontiguousarray((grey > 0)[np.ix_(rows, cols)]))


def nearest_indices(source: int, size: int) -> np.ndarray:
    """Source index of each of ``size`` outputs in a nearest resize, as cv2's ``INTER_NEAREST``:
    ``min(floor(i * (1 / (size / source))), source - 1)`` in float64.

    Why not ``F.interpolate(mode="nearest")``: it computes the same rule in float32 and lands one
    pixel lower on some boundaries (e.g. 36 -> 28 pixels).
    """
    return np.minimum(np.floor(np.arange(size) * (1.0 / (size / source))).astype(np.int64), source - 1)


class CUBDataModule(PartDataModule):
    """CUB-200-2011 with its 15 part keypoints (keypoint evaluation mode, visible keypoints only).

    Reads ``root`` as it ships: ``images.txt``, ``train_test_split.txt``,
    ``parts/part_locs.txt``, ``image_class_labels.txt`` (optional, for ``label``) and
    ``images/<class folder>/<file>.jpg``. Validation, test and predict all use the test split
    (5,794 images, as in the paper; ``val_fraction`` holds out training images for validation instead); ``index`` is the position in that split in ``images.txt``
    order. Evaluation items carry ``keypoints`` (15, 2) in pixels of the S×S resize,
    ``visible`` (15,) from the visibility flags and, when ``bounding_boxes.txt`` is there,
    ``box`` (x, y, width, height in the same pixels; the keypoint regression error divides by it).
    With ``segmentations`` they also carry ``fg_mask`` (S, S) bool, the bird's foreground from
    CUB-200-2011's separate segmentations download (PNG value > 0, squashed to S×S like the image,
    nearest; :func:`load_foreground_mask`), and ``mpae test`` / validation log the foreground IoU
    as PDiscoFormer's authors compute it on CUB (``fg_iou``, ``bg_iou``; docs/evaluation.md §10).

    Args:
        root: The ``CUB_200_2011`` folder (or the folder that contains it).
        image_size: Side S of the square input (paper: 448).
        batch_size: Training images per batch and per process; a multiple of ``mini_group`` when it is larger.
        mini_group: Chunk size of the mini-group presence loss (paper: 8).
        eval_batch_size: Images per batch for validation, test and predict.
        num_workers: DataLoader worker processes.
        seed: Seed of the training order.
        group_by: ``"class"`` to fill each training mini-group with one bird species, or None.
        mask_size: Unused (CUB has no part masks; ``fg_mask`` is S×S, as the protocol compares at the
            input size); kept for a uniform interface.
        val_fraction: Share of the training split held out for validation (with keypoints) instead of
            the test split (0: the test split, as the authors do; logged as ``val_on_test``).
        drop_last: Drop the training images that do not fill a whole global batch (default: keep them
            as one last, smaller batch, as the authors do; see :class:`PartDataModule`).
        input_antialias: Resize to S×S with antialiasing (default, the authors' CUB loader) or without
            (see :class:`PartDataModule`); with ``--ckpt_path`` and not given, the checkpoint's value.
        segmentations: The folder of CUB-200-2011's segmentations download (``segmentations/``, or the
            folder that contains it, e.g. ``root`` when it was unpacked there), to score the foreground
            IoU; every evaluation image needs its ``<images.txt path>.png``. Default None: no
            foreground masks (not looked for, so the scores never depend on what else lies in ``root``).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 448,
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
        self.has_keypoints = True
        self.num_keypoints = CUB_NUM_KEYPOINTS
        #: Evaluation items carry ``fg_mask``; MPAEModule then logs ``fg_iou`` / ``bg_iou``.
        self.has_fg_masks = segmentations is not None

    def split_source(self, split: Split) -> Split:
        """Validation and prediction read the test split (the authors validate on it)."""
        return "train" if split == "train" else "test"

    def build_dataset(self, split: Split) -> ImageRecordDataset:
        if split == "train":
            return ImageRecordDataset(read_cub(self.root, "train"), self.image_size, train=True,
                                      squash=not self.input_antialias)
        return self._eval_dataset("test")

    def build_train_eval_dataset(self) -> ImageRecordDataset:
        return self._eval_dataset("train")

    def _eval_dataset(self, split: Literal["train", "test"]) -> ImageRecordDataset:
        """Evaluation images of ``split``, with their foreground masks when ``segmentations`` is set."""
        records = read_cub(self.root, split)
        paths = None if self.segmentations is None else foreground_mask_paths(self.root, records, self.segmentations)
        return object_mask_dataset(records, self.image_size, not self.input_antialias, paths, load_foreground_mask)
