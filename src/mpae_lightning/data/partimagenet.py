"""PartImageNet (OOD and Seg variants) with ground-truth part masks (docs/defaults.md §6.3–6.4, docs/evaluation.md §3).

Layouts, as the datasets ship:

* ``variant="seg"`` (PartImageNet Seg): ``annotations/{train,test}/{train,test}.json`` (COCO
  polygons, 40 part categories) and ``images/{train,test}/<file_name>``.
* ``variant="ood"`` (PartImageNet OOD, as prepared by PDiscoFormer's
  ``prepare_partimagenet_ood.py``): ``train_train.json`` / ``train_test.json`` next to the
  ``train/`` image folder, with file names ``<wnid>/<wnid>_<n>.JPEG``.

Ground-truth mask of an image, as the authors' loaders build it: per part category the SUM of its
annotations' masks (crowd and zero-area annotations skipped; two overlapping instances of a
category count 2 where they overlap), a constant 0.1 background channel appended, argmax over the
channels (the category with most covering instances wins, ties go to the lowest category id, and
uncovered pixels are background), then a nearest resize to ``mask_size``². Labels are the part
categories in increasing COCO id order and the background is the last label (id = number of part
categories). As in PDiscoFormer's loader, images without any annotation are left out of a split,
and a polygon with only two points is replaced by its annotation's bounding box.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

from .base import (
    DatasetFormatError,
    ImageRecord,
    ImageRecordDataset,
    PartDataModule,
    Split,
    missing_files,
    raise_missing,
    require_file,
    require_root,
)

__all__ = ["PartImageNetDataModule", "part_label_map", "rasterize_segmentation"]

PARTIMAGENET_NUM_PARTS = 40
BACKGROUND_SCORE = 0.1

_EXPECTED = {
    "seg": "the PartImageNet Seg folder (annotations/{train,test}/{train,test}.json, images/{train,test}/)",
    "ood": "the PartImageNet OOD folder prepared as in PDiscoFormer (train_train.json, train_test.json, train/<wnid>/)",
}


def rasterize_segmentation(segmentation: Any, bbox: Any, height: int, width: int) -> np.ndarray:
    """Binary (H, W) mask of one COCO segmentation (polygons or RLE)."""
    if isinstance(segmentation, list):
        polys = [list(map(float, p)) for p in segmentation if len(p) >= 6]
        if any(len(p) == 4 for p in segmentation) and bbox is not None and len(bbox) == 4:
            # pycocotools would read a 4-number polygon as a box; use the annotation's box explicitly.
            x, y, w, h = (float(v) for v in bbox)
            polys.append([x, y, x, y + h, x + w, y + h, x + w, y])
        if not polys:
            return np.zeros((height, width), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return mask_utils.decode(rle).astype(bool)


def part_label_map(
    annotations: list[tuple[int, Any, Any]], height: int, width: int, num_parts: int, mask_size: int | None = None
) -> torch.Tensor:
    """Ground-truth part labels: per-category sum of masks, 0.1 background channel, argmax, nearest resize.

    Args:
        annotations: ``(part index, segmentation, bbox)`` triples of one image; part indices are
            0..num_parts-1.
        height: Image height of the annotations.
        width: Image width of the annotations.
        num_parts: Number of part categories; the background label is ``num_parts``.
        mask_size: Output side, or None to keep (H, W).

    Returns:
        (mask_size, mask_size) (or (H, W)) long tensor.
    """
    # The authors add each annotation's mask into its category's channel (mask[cat] += m), so where
    # instances overlap a category can outvote another; only categories present need a channel.
    counts: dict[int, np.ndarray] = {}
    for part, segm, bbox in annotations:
        m = rasterize_segmentation(segm, bbox, height, width)
        if part in counts:
            counts[part] += m
        else:
            counts[part] = m.astype(np.int32)
    labels = np.full((height, width), num_parts, dtype=np.int64)
    if counts:
        parts = sorted(counts)
        stack = np.stack([counts[p] for p in parts])
        # argmax over [count_0, ..., count_{C-1}, 0.1]: a count >= 1 beats the background, ties go to the lowest id.
        best = stack.argmax(axis=0)
        covered = stack.max(axis=0) > 0
        labels[covered] = np.asarray(parts, dtype=np.int64)[best[covered]]
    out = torch.from_numpy(labels)
    if mask_size is not None:
        out = F.interpolate(out[None, None].float(), size=(mask_size, mask_size), mode="nearest")[0, 0].long()
    return out


def _require_fields(entry: Any, fields: tuple[str, ...], where: str) -> None:
    if not isinstance(entry, dict):
        raise DatasetFormatError(f"{where} is a {type(entry).__name__}, expected a JSON object")
    missing = [f for f in fields if f not in entry]
    if missing:
        raise DatasetFormatError(f"{where} has no {', '.join(repr(f) for f in missing)} (COCO format needs them)")


def _check_segmentation(segmentation: Any, where: str) -> None:
    """Refuse what pycocotools would crash on: polygons must be flat lists of numbers, RLE must have counts and size."""
    if isinstance(segmentation, list):
        for polygon in segmentation:
            if not isinstance(polygon, list) or not all(isinstance(v, (int, float)) for v in polygon):
                raise DatasetFormatError(
                    f"{where}: segmentation polygons must be lists of numbers [x1, y1, x2, y2, ...], got {str(polygon)[:60]}"
                )
            if len(polygon) >= 6 and len(polygon) % 2:
                raise DatasetFormatError(f"{where}: a segmentation polygon needs x, y pairs, got {len(polygon)} numbers")
    elif isinstance(segmentation, dict):
        if "counts" not in segmentation or "size" not in segmentation:
            raise DatasetFormatError(f"{where}: RLE segmentation needs 'counts' and 'size', got keys {sorted(segmentation)}")
    else:
        raise DatasetFormatError(
            f"{where}: segmentation must be a list of polygons or an RLE object, got {type(segmentation).__name__}"
        )


@dataclass
class _ParsedSplit:
    annotation_file: str
    image_dir: str
    category_ids: list[int]
    category_names: list[str]
    file_names: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width)
    annotations: list[list[tuple[int, Any, Any]]] = field(default_factory=list)


def _wnid(file_name: str) -> str:
    return os.path.basename(file_name).split("_")[0]


class _MaskFn:
    """Picklable ``mask_fn`` for :class:`ImageRecordDataset` (DataLoader workers may be spawned)."""

    def __init__(self, parsed: _ParsedSplit, num_parts: int, mask_size: int) -> None:
        self.annotation_file = parsed.annotation_file
        self.file_names = parsed.file_names
        self.sizes = parsed.sizes
        self.annotations = parsed.annotations
        self.num_parts = num_parts
        self.mask_size = mask_size

    def __call__(self, index: int, width: int, height: int) -> torch.Tensor:
        h, w = self.sizes[index]
        if (h, w) != (height, width):
            raise DatasetFormatError(
                f"{self.annotation_file}: image {self.file_names[index]} is {width}x{height} pixels but annotated as "
                f"{w}x{h} (width x height); the annotation belongs to another image or the image was resized"
            )
        return part_label_map(self.annotations[index], h, w, self.num_parts, self.mask_size)


class PartImageNetDataModule(PartDataModule):
    """PartImageNet OOD or Seg with ground-truth part masks (mask evaluation mode).

    Validation, test and predict use the test split (OOD: ``train_test.json``, 1,658 images;
    Seg: ``test.json``, 2,405 images); ``index`` is the position in the annotation file's
    ``images`` order (after leaving out unannotated images). Evaluation items carry ``mask``
    (mask_size, mask_size) long with part ids 0..C-1 and background C (C = 40 part categories);
    ``label`` is the ImageNet class (WordNet id from the file name) numbered in sorted order over
    the variant's annotation files.

    Args:
        root: The dataset folder (layouts in the module docstring).
        variant: ``"ood"`` or ``"seg"``.
        image_size: Side S of the square input (paper: 224).
        batch_size: Training images per batch and per process; a multiple of ``mini_group`` when it is larger.
        mini_group: Chunk size of the mini-group presence loss (paper: 64 for multi-category data).
        eval_batch_size: Images per batch for validation, test and predict.
        num_workers: DataLoader worker processes.
        seed: Seed of the training order.
        group_by: ``"class"`` to fill each training mini-group with one ImageNet class, or None.
        mask_size: Side of the ground-truth masks (paper: 128).
        val_fraction: Share of the training split held out for validation (with part masks) instead
            of the test split (0: the test split, as the authors do; logged as ``val_on_test``).
        drop_last: Drop the training images that do not fill a whole global batch (default: keep them
            as one last, smaller batch, as the authors do; see :class:`PartDataModule`).
        input_antialias: Resize to S×S with antialiasing (default, the authors' loader) or without
            (see :class:`PartDataModule`); with ``--ckpt_path`` and not given, the checkpoint's value.
    """

    def __init__(
        self,
        root: str,
        variant: Literal["ood", "seg"] = "seg",
        image_size: int = 224,
        batch_size: int = 64,
        mini_group: int = 64,
        eval_batch_size: int = 32,
        num_workers: int = 2,
        seed: int = 0,
        group_by: Literal["class"] | None = None,
        mask_size: int = 128,
        val_fraction: float = 0.0,
        drop_last: bool = False,
        input_antialias: bool = True,
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
        if variant not in ("ood", "seg"):
            raise ValueError(f"variant must be 'ood' or 'seg', got {variant!r}")
        self.save_hyperparameters()
        self.root = root
        self.variant = variant
        self.has_masks = True
        self.num_part_categories = PARTIMAGENET_NUM_PARTS
        self.num_mask_labels = PARTIMAGENET_NUM_PARTS + 1
        self.part_names: list[str] = []
        self._parsed: dict[str, _ParsedSplit] = {}
        self._classes: dict[str, int] | None = None

    # -- files ---------------------------------------------------------------------------------
    def _paths(self, split: Literal["train", "test"]) -> tuple[str, str]:
        """(annotation file, image folder) of ``split``."""
        root = require_root(self.root, f"PartImageNet-{self.variant.upper()}", _EXPECTED[self.variant])
        if self.variant == "seg":
            return (
                os.path.join(root, "annotations", split, f"{split}.json"),
                os.path.join(root, "images", split),
            )
        return os.path.join(root, f"train_{split}.json"), os.path.join(root, "train")

    def _parse(self, split: Literal["train", "test"]) -> _ParsedSplit:
        if split in self._parsed:
            return self._parsed[split]
        ann_file, image_dir = self._paths(split)
        require_file(ann_file, f"the {split} annotations of {_EXPECTED[self.variant]}")
        try:
            with open(ann_file, encoding="utf-8") as fh:
                data = json.load(fh)
            categories = sorted(data["categories"], key=lambda c: c["id"])
            images = data["images"]
            anns = data["annotations"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as err:
            raise DatasetFormatError(
                f"{ann_file} is not a COCO annotation file with 'images', 'annotations' and 'categories' ({err})"
            ) from err
        cat_index = {c["id"]: i for i, c in enumerate(categories)}
        per_image: dict[Any, list[tuple[int, Any, Any]]] = {}
        annotated: set[Any] = set()
        for n, a in enumerate(anns):
            where = f"{ann_file}: annotation {a.get('id', f'#{n}') if isinstance(a, dict) else f'#{n}'}"
            _require_fields(a, ("image_id", "category_id", "segmentation"), where)
            annotated.add(a["image_id"])
            if a.get("iscrowd", 0) == 1 or a.get("area", 1) == 0:
                continue
            if a["category_id"] not in cat_index:
                raise DatasetFormatError(f"{where} has unknown category_id {a['category_id']}")
            _check_segmentation(a["segmentation"], where)
            part = cat_index[a["category_id"]]
            per_image.setdefault(a["image_id"], []).append((part, a["segmentation"], a.get("bbox")))
        parsed = _ParsedSplit(
            annotation_file=ann_file,
            image_dir=image_dir,
            category_ids=[c["id"] for c in categories],
            category_names=[str(c.get("name", c["id"])) for c in categories],
        )
        for n, img in enumerate(images):
            where = f"{ann_file}: image {img.get('file_name', f'#{n}') if isinstance(img, dict) else f'#{n}'}"
            _require_fields(img, ("id", "file_name", "height", "width"), where)
            if img["id"] not in annotated:
                continue
            try:
                size = (int(img["height"]), int(img["width"]))
            except (TypeError, ValueError):
                raise DatasetFormatError(f"{where}: height and width must be integers, got {img['height']!r} x {img['width']!r}") from None
            if min(size) < 1:
                raise DatasetFormatError(f"{where}: height and width must be positive, got {size[0]} x {size[1]}")
            parsed.file_names.append(img["file_name"])
            parsed.sizes.append(size)
            parsed.annotations.append(per_image.get(img["id"], []))
        self._parsed[split] = parsed
        return parsed

    def _resolve_image_paths(self, parsed: _ParsedSplit) -> list[str]:
        paths = [os.path.join(parsed.image_dir, f) for f in parsed.file_names]
        missing = set(missing_files(paths))
        still_missing = []
        for i, f in enumerate(parsed.file_names):
            if paths[i] in missing:
                # Also accept images sorted into <wnid>/ sub-folders.
                alt = os.path.join(parsed.image_dir, _wnid(f), os.path.basename(f))
                if os.path.isfile(alt):
                    paths[i] = alt
                else:
                    still_missing.append(paths[i])
        raise_missing(still_missing, len(paths), parsed.annotation_file, parsed.image_dir)
        return paths

    def _class_index(self) -> dict[str, int]:
        if self._classes is None:
            wnids: set[str] = set()
            for split in ("train", "test"):
                if split in self._parsed or os.path.isfile(self._paths(split)[0]):  # type: ignore[arg-type]
                    wnids.update(_wnid(f) for f in self._parse(split).file_names)  # type: ignore[arg-type]
            self._classes = {w: i for i, w in enumerate(sorted(wnids))}
        return self._classes

    def _set_categories(self, parsed: _ParsedSplit) -> None:
        n = len(parsed.category_ids)
        if self.part_names and parsed.category_names != self.part_names:
            raise DatasetFormatError(
                f"{parsed.annotation_file} lists other part categories than the other split's annotation file"
            )
        if n != self.num_part_categories:
            warnings.warn(
                f"{parsed.annotation_file} has {n} part categories, not the {PARTIMAGENET_NUM_PARTS} of "
                f"PartImageNet; num_mask_labels is now {n + 1}",
                stacklevel=2,
            )
        self.part_names = parsed.category_names
        self.num_part_categories = n
        self.num_mask_labels = n + 1

    def split_source(self, split: Split) -> Split:
        """Validation and prediction read the test split (the authors validate on it)."""
        return "train" if split == "train" else "test"

    def build_dataset(self, split: Split) -> ImageRecordDataset:
        return self._build("train" if split == "train" else "test", train=split == "train")

    def build_train_eval_dataset(self) -> ImageRecordDataset:
        return self._build("train", train=False)

    def _build(self, source: Literal["train", "test"], train: bool) -> ImageRecordDataset:
        parsed = self._parse(source)
        self._set_categories(parsed)
        paths = self._resolve_image_paths(parsed)
        classes = self._class_index()
        records = [ImageRecord(path=p, label=classes.get(_wnid(f), -1)) for p, f in zip(paths, parsed.file_names)]
        if train:
            return ImageRecordDataset(records, self.image_size, train=True, squash=not self.input_antialias)
        mask_fn = _MaskFn(parsed, self.num_part_categories, self.mask_size)
        return ImageRecordDataset(records, self.image_size, train=False, mask_fn=mask_fn,
                                  squash=not self.input_antialias)
