"""Procedural objects made of parts, with exact ground truth: try MPAE in minutes without downloads.

Each image shows one object on a textured background. An object belongs to one of a few
categories; every category is built from 4-5 of a global pool of :data:`NUM_PART_TYPES` part
types (torso, head, wing, tail, base, crest), each with a colour and texture of its own that
stay the same across categories, in a category-specific layout. Pose (rotation, translation,
mirror), scale and the parts' shapes vary per image, and about a third of the images have an
occluder: a blob of background texture over part of the object.

Ground truth is exact: the part-type mask (background = :data:`NUM_PART_TYPES`, the last id)
is evaluated from the same geometry at ``mask_size``; one keypoint per part type lies at the
centroid of its visible pixels (moved to the nearest pixel of the part when the centroid falls
outside it) with ``visible=False`` and (0, 0) when the part is absent or fully occluded.

Items are generated on the fly, deterministically from ``(seed, split, index)``; nothing is
written to disk. ``python -m mpae_lightning.data.synthetic --out DIR`` writes a PNG grid of
images and their part masks.
"""

from __future__ import annotations

import argparse
import math
import os
from functools import lru_cache
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset

from .base import PartDataModule, Split
from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "NUM_PART_TYPES",
    "PART_COLOURS",
    "PART_NAMES",
    "SyntheticPartsDataModule",
    "SyntheticPartsDataset",
    "main",
    "sample_grid",
]

PART_NAMES = ("torso", "head", "wing", "tail", "base", "crest")
NUM_PART_TYPES = len(PART_NAMES)
BACKGROUND = NUM_PART_TYPES
PART_COLOURS = np.array(
    [
        [0.85, 0.22, 0.20],  # torso: red, horizontal bands
        [0.95, 0.80, 0.15],  # head: yellow, dots
        [0.20, 0.40, 0.90],  # wing: blue, diagonal stripes
        [0.20, 0.70, 0.25],  # tail: green, checker
        [0.70, 0.25, 0.80],  # base: purple, vertical bands
        [0.10, 0.75, 0.80],  # crest: cyan, rings
    ],
    dtype=np.float32,
)
_PALETTE_FLOAT = np.concatenate([PART_COLOURS, np.zeros((1, 3), dtype=np.float32)])
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

# Category layouts in object units (the object spans about 2 units): one row per part, in
# drawing order: (part type, centre u, centre v, semi-axis a, semi-axis b, angle in degrees).
_TEMPLATES: list[list[tuple[int, float, float, float, float, float]]] = [
    [  # bird-like
        (0, 0.00, 0.10, 0.62, 0.42, 0.0),
        (3, -0.74, 0.02, 0.36, 0.27, 25.0),
        (1, 0.62, -0.40, 0.34, 0.33, 0.0),
        (2, -0.05, -0.02, 0.42, 0.28, -12.0),
    ],
    [  # quadruped-like
        (4, 0.00, 0.50, 0.64, 0.28, 0.0),
        (0, 0.00, -0.02, 0.68, 0.36, 0.0),
        (3, -0.80, -0.24, 0.32, 0.25, -30.0),
        (1, 0.72, -0.42, 0.32, 0.31, 0.0),
        (5, 0.58, -0.86, 0.30, 0.24, 20.0),
    ],
    [  # fish/beetle-like
        (2, 0.00, -0.62, 0.52, 0.30, 0.0),
        (4, 0.00, 0.62, 0.52, 0.30, 0.0),
        (0, 0.00, 0.00, 0.58, 0.50, 0.0),
        (5, -0.80, 0.00, 0.30, 0.42, 0.0),
        (1, 0.80, 0.00, 0.31, 0.31, 0.0),
    ],
]


def category_template(category: int) -> list[tuple[int, float, float, float, float, float]]:
    """The part layout of ``category`` (three hand-made ones, then procedural ones from a fixed seed)."""
    if category < len(_TEMPLATES):
        return _TEMPLATES[category]
    rng = np.random.default_rng([7919, category])
    parts = [(0, 0.0, 0.0, float(rng.uniform(0.55, 0.68)), float(rng.uniform(0.38, 0.5)), 0.0)]
    others = rng.permutation(np.arange(1, NUM_PART_TYPES))[: int(rng.integers(3, 5))]
    start = rng.uniform(0, 2 * math.pi)
    for k, t in enumerate(others):
        ang = start + 2 * math.pi * k / len(others) + rng.uniform(-0.3, 0.3)
        dist = rng.uniform(0.62, 0.78)
        parts.append(
            (
                int(t),
                float(dist * math.cos(ang)),
                float(dist * math.sin(ang)),
                float(rng.uniform(0.3, 0.4)),
                float(rng.uniform(0.26, 0.34)),
                float(rng.uniform(-40, 40)),
            )
        )
    return parts


def _texture(part_type: int, u: np.ndarray, v: np.ndarray, cu: float, cv: float) -> np.ndarray:
    """Texture in [0, 1] of a part type at object coordinates (u, v); moves with the object."""
    two_pi = np.float32(2 * math.pi)
    if part_type == 0:
        return 0.5 + 0.5 * np.sin(two_pi * 3.0 * v)
    if part_type == 1:
        return (np.sin(two_pi * 3.5 * u) * np.sin(two_pi * 3.5 * v) > 0.2).astype(np.float32)
    if part_type == 2:
        return 0.5 + 0.5 * np.sin(two_pi * 2.5 * (u + v))
    if part_type == 3:
        return ((np.floor(u * 5.0) + np.floor(v * 5.0)) % 2).astype(np.float32)
    if part_type == 4:
        return 0.5 + 0.5 * np.sin(two_pi * 3.5 * u)
    return 0.5 + 0.5 * np.cos(two_pi * 5.0 * np.hypot(u - cu, v - cv))


@lru_cache(maxsize=8)
def _pixel_centres(size: int, image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the pixel centres of a size×size grid, in pixels of the image_size image."""
    c = ((np.arange(size, dtype=np.float32) + 0.5) * (image_size / size)).astype(np.float32)
    return np.broadcast_to(c[None, :], (size, size)), np.broadcast_to(c[:, None], (size, size))


@lru_cache(maxsize=8)
def _upsample_matrix(coarse: int, size: int) -> np.ndarray:
    """(size, coarse) bilinear interpolation weights (align_corners=False, edge-clamped)."""
    pos = np.clip((np.arange(size) + 0.5) * coarse / size - 0.5, 0, coarse - 1)
    lo = np.floor(pos).astype(int)
    hi = np.minimum(lo + 1, coarse - 1)
    w = np.zeros((size, coarse), dtype=np.float32)
    w[np.arange(size), lo] += 1 - (pos - lo)
    w[np.arange(size), hi] += pos - lo
    return w


class SyntheticPartsDataset(Dataset):
    """Objects made of parts, generated per index (see the module docstring).

    Evaluation items: ``image`` (3, S, S) normalised, ``index``, ``path``
    (``"synthetic/<split>/<index>"``), ``label`` (category), ``mask`` (mask_size²) long with
    part-type ids and background :data:`NUM_PART_TYPES`, ``keypoints`` (6, 2) float (x, y) in
    pixels and ``visible`` (6,) bool. Training items (``train=True``) have only the image (randomly
    mirrored), ``index``, ``path`` and ``label``.

    Args:
        num_samples: Number of items.
        split: ``"train"``, ``"val"`` or ``"test"``; each split draws different objects.
        image_size: Side S of the images.
        mask_size: Side of the masks.
        num_categories: Number of object categories (three hand-made layouts, then procedural).
        seed: Base seed; item i of a split is generated from ``(seed, split, i)``.
        train: Return training items (image, with a random horizontal flip, and identity only).
        occlusion_prob: Probability of an occluding background blob.
    """

    def __init__(
        self,
        num_samples: int,
        split: Literal["train", "val", "test"] = "train",
        image_size: int = 128,
        mask_size: int = 128,
        num_categories: int = 3,
        seed: int = 0,
        train: bool = False,
        occlusion_prob: float = 0.3,
    ) -> None:
        if split not in _SPLIT_CODE:
            raise ValueError(f"split must be one of {sorted(_SPLIT_CODE)}, got {split!r}")
        if num_categories < 1:
            raise ValueError(f"num_categories must be >= 1, got {num_categories}")
        self.num_samples = int(num_samples)
        self.split = split
        self.image_size = int(image_size)
        self.mask_size = int(mask_size)
        self.num_categories = int(num_categories)
        self.seed = int(seed)
        self.train = train
        self.occlusion_prob = float(occlusion_prob)
        self._mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
        self._std = np.asarray(IMAGENET_STD, dtype=np.float32)

    def __len__(self) -> int:
        return self.num_samples

    @property
    def labels(self) -> list[int]:
        return [i % self.num_categories for i in range(self.num_samples)]

    # -- geometry ------------------------------------------------------------------------------
    def _sample_params(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, _SPLIT_CODE[self.split], index])
        s_img = self.image_size
        category = index % self.num_categories
        scale = s_img * rng.uniform(0.30, 0.38)
        margin = max(0.0, s_img / 2 - 1.0 * scale)
        template = np.asarray(category_template(category), dtype=np.float64)
        jitter = rng.random((len(template), 5))
        parts = [
            (
                int(t),
                cu + 0.08 * (j[0] - 0.5),
                cv + 0.08 * (j[1] - 0.5),
                a * (0.9 + 0.2 * j[2]),
                b * (0.9 + 0.2 * j[3]),
                math.radians(ang + 16 * (j[4] - 0.5)),
            )
            for (t, cu, cv, a, b, ang), j in zip(template, jitter)
        ]
        params: dict[str, Any] = {
            "rng": rng,
            "category": category,
            "theta": math.radians(rng.uniform(-35, 35)),
            "scale": scale,
            "mirror": bool(rng.random() < 0.5),
            "cx": s_img / 2 + rng.uniform(-1, 1) * margin,
            "cy": s_img / 2 + rng.uniform(-1, 1) * margin,
            "parts": parts,
            "occluder": None,
        }
        if rng.random() < self.occlusion_prob:
            phi = rng.uniform(0, 2 * math.pi)
            dist = scale * rng.uniform(0.35, 0.8)
            params["occluder"] = (
                params["cx"] + dist * math.cos(phi),
                params["cy"] + dist * math.sin(phi),
                scale * rng.uniform(0.25, 0.45),
                scale * rng.uniform(0.2, 0.35),
                rng.uniform(0, math.pi),
            )
        return params

    def _object_coords(self, p: dict[str, Any], x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dx, dy = x - np.float32(p["cx"]), y - np.float32(p["cy"])
        c, s = np.float32(math.cos(p["theta"])), np.float32(math.sin(p["theta"]))
        inv = np.float32(1.0 / p["scale"])
        u = (c * dx + s * dy) * inv
        v = (-s * dx + c * dy) * inv
        return (-u if p["mirror"] else u), v

    def _labels(self, p: dict[str, Any], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Part-type labels of a size×size grid, and the grid's object coordinates (u, v)."""
        x, y = _pixel_centres(size, self.image_size)
        u, v = self._object_coords(p, x, y)
        labels = np.full((size, size), BACKGROUND, dtype=np.int64)
        c_obj, s_obj = math.cos(p["theta"]), math.sin(p["theta"])
        to_grid = size / self.image_size
        for t, cu, cv, a, b, ang in p["parts"]:
            # Only test the pixels of the part's bounding square.
            u0 = -cu if p["mirror"] else cu
            xc = (p["cx"] + p["scale"] * (c_obj * u0 - s_obj * cv)) * to_grid - 0.5
            yc = (p["cy"] + p["scale"] * (s_obj * u0 + c_obj * cv)) * to_grid - 0.5
            r = max(a, b) * p["scale"] * to_grid + 1.0
            r0, r1 = max(0, int(yc - r)), min(size, int(yc + r) + 2)
            c0, c1 = max(0, int(xc - r)), min(size, int(xc + r) + 2)
            if r0 >= r1 or c0 >= c1:
                continue
            du, dv = u[r0:r1, c0:c1] - np.float32(cu), v[r0:r1, c0:c1] - np.float32(cv)
            c, s = np.float32(math.cos(ang)), np.float32(math.sin(ang))
            pa = (c * du + s * dv) * np.float32(1.0 / a)
            pb = (-s * du + c * dv) * np.float32(1.0 / b)
            labels[r0:r1, c0:c1][pa * pa + pb * pb <= 1.0] = t
        if p["occluder"] is not None:
            ox, oy, a, b, ang = p["occluder"]
            dx, dy = x - np.float32(ox), y - np.float32(oy)
            c, s = np.float32(math.cos(ang)), np.float32(math.sin(ang))
            pa = (c * dx + s * dy) * np.float32(1.0 / a)
            pb = (-s * dx + c * dy) * np.float32(1.0 / b)
            labels[pa * pa + pb * pb <= 1.0] = BACKGROUND
        return labels, u, v

    def _background(self, rng: np.random.Generator) -> np.ndarray:
        """Low-frequency two-colour noise plus a faint grey grating, desaturated: (3, S, S)."""
        size = self.image_size
        grey = rng.uniform(0.3, 0.7, size=2)
        c1 = (grey[0] + rng.uniform(-0.08, 0.08, 3)).astype(np.float32)
        c2 = (grey[1] + rng.uniform(-0.08, 0.08, 3)).astype(np.float32)
        w = _upsample_matrix(5, size)
        noise = w @ rng.random((5, 5), dtype=np.float32) @ w.T
        # sin(a x + b y + c) = sin(a x) cos(b y + c) + cos(a x) sin(b y + c): two outer products.
        phi, freq, phase = rng.uniform(0, math.pi), rng.uniform(3, 9) * 2 * math.pi / size, rng.uniform(0, 2 * math.pi)
        c = np.arange(size, dtype=np.float32) + np.float32(0.5)
        ax, by = np.float32(freq * math.cos(phi)) * c, np.float32(freq * math.sin(phi)) * c + np.float32(phase)
        stripes = np.outer(np.cos(by), np.sin(ax)) + np.outer(np.sin(by), np.cos(ax))
        shade = np.float32(0.07) * stripes
        # channel-first: numpy broadcasting over a trailing axis of 3 is several times slower
        return (c1[:, None, None] + shade[None]) + (c2 - c1)[:, None, None] * noise[None]

    # -- rendering -----------------------------------------------------------------------------
    def render(self, index: int) -> dict[str, Any]:
        """Generate item ``index`` as numpy arrays.

        Returns:
            ``image`` (3, S, S) float32 in [0, 1] (channel first), ``mask`` (mask_size, mask_size) int64,
            ``keypoints`` (6, 2) float32, ``visible`` (6,) bool and ``category`` int.
        """
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic samples")
        p = self._sample_params(index)
        rng = p["rng"]
        size, msize = self.image_size, self.mask_size
        labels, u, v = self._labels(p, size)
        mask = labels if msize == size else self._labels(p, msize)[0]

        background = self._background(rng)
        fg = labels < BACKGROUND
        shade = np.zeros(labels.shape, dtype=np.float32)
        counts = np.bincount(labels.ravel(), minlength=BACKGROUND + 1)
        for t, cu, cv, *_ in p["parts"]:
            if counts[t] == 0:
                continue
            sel = labels == t
            shade[sel] = np.float32(0.55) + np.float32(0.45) * _texture(t, u[sel], v[sel], cu, cv)
        gain = np.float32(rng.uniform(0.85, 1.15))
        grain = (rng.random(labels.shape, dtype=np.float32) - np.float32(0.5)) * np.float32(0.07)
        image = np.empty((3, size, size), dtype=np.float32)
        for ch in range(3):
            channel = np.where(fg, np.take(_PALETTE_FLOAT[:, ch], labels) * shade, background[ch])
            np.clip(channel * gain + grain, 0.0, 1.0, out=image[ch])

        keypoints, visible = self._keypoints(labels, mask)
        return {"image": image, "mask": mask, "keypoints": keypoints, "visible": visible, "category": p["category"]}

    def _keypoints(self, labels: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        size, msize = self.image_size, self.mask_size
        keypoints = np.zeros((NUM_PART_TYPES, 2), dtype=np.float32)
        visible = np.zeros(NUM_PART_TYPES, dtype=bool)
        if msize == size:
            valid = labels
        else:
            # Keep only image pixels whose centre falls on the same label in the mask.
            to_mask = np.minimum(((np.arange(size) + 0.5) * msize / size).astype(np.int64), msize - 1)
            mask_at = mask[to_mask[:, None], to_mask[None, :]]
            valid = np.where(mask_at == labels, labels, BACKGROUND)
        flat = valid.ravel()
        x, y = _pixel_centres(size, size)
        n = np.bincount(flat, minlength=BACKGROUND + 1)[:NUM_PART_TYPES]
        sx = np.bincount(flat, weights=x.ravel(), minlength=BACKGROUND + 1)[:NUM_PART_TYPES]
        sy = np.bincount(flat, weights=y.ravel(), minlength=BACKGROUND + 1)[:NUM_PART_TYPES]
        for t in np.flatnonzero(n):
            kx, ky = sx[t] / n[t], sy[t] / n[t]
            ix, iy = int(kx), int(ky)
            mx, my = min(int(kx * msize / size), msize - 1), min(int(ky * msize / size), msize - 1)
            if not (labels[iy, ix] == t and mask[my, mx] == t):
                # Non-convex visible region: use the part pixel nearest to the centroid.
                rows, cols = np.nonzero(valid == t)
                k = int(np.argmin((cols + 0.5 - kx) ** 2 + (rows + 0.5 - ky) ** 2))
                kx, ky = cols[k] + 0.5, rows[k] + 0.5
            keypoints[t] = (kx, ky)
            visible[t] = True
        return keypoints, visible

    def __getitem__(self, index: int) -> dict[str, Any]:
        r = self.render(index)
        image = torch.from_numpy((r["image"] - self._mean[:, None, None]) / self._std[:, None, None])
        item: dict[str, Any] = {
            "image": image,
            "index": index,
            "path": f"synthetic/{self.split}/{index}",
            "label": r["category"],
        }
        if self.train:
            if torch.rand(()) < 0.5:
                item["image"] = image.flip(-1)
            return item
        item["mask"] = torch.from_numpy(r["mask"])
        item["keypoints"] = torch.from_numpy(r["keypoints"])
        item["visible"] = torch.from_numpy(r["visible"])
        return item


class SyntheticPartsDataModule(PartDataModule):
    """Synthetic objects made of parts with exact masks and keypoints (both evaluation modes).

    Validation uses the ``val`` split, test and predict the ``test`` split; items are generated on
    the fly (about a millisecond per 128-pixel image), so ``num_workers`` defaults to 0.
    ``num_keypoints`` = 6 (one per part type), ``num_mask_labels`` = 7 (background last).

    Args:
        num_train: Number of training images.
        num_val: Number of validation images.
        num_test: Number of test (and predict) images.
        image_size: Side S of the images.
        num_categories: Number of object categories sharing the 6 part types.
        seed: Seed of the generated data and of the training order.
        batch_size: Training images per batch and per process; a multiple of ``mini_group`` when it is larger.
        mini_group: Chunk size of the mini-group presence loss.
        eval_batch_size: Images per batch for validation, test and predict.
        num_workers: DataLoader worker processes.
        group_by: ``"class"`` to fill each training mini-group with one category, or None.
        mask_size: Side of the ground-truth masks.
        occlusion_prob: Probability that an image has an occluding background blob.
        val_fraction: Share of the training split held out for validation instead of the ``val`` split.
        drop_last: Drop the training images that do not fill a whole global batch (default: keep them
            as one last, smaller batch, as the authors do; see :class:`PartDataModule`).
        input_antialias: Unused (images are drawn at S×S, nothing is resized); kept for a uniform
            interface (see :class:`PartDataModule`).
    """

    def __init__(
        self,
        num_train: int = 512,
        num_val: int = 64,
        num_test: int = 64,
        image_size: int = 128,
        num_categories: int = 3,
        seed: int = 0,
        batch_size: int = 32,
        mini_group: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 0,
        group_by: Literal["class"] | None = None,
        mask_size: int = 128,
        occlusion_prob: float = 0.3,
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
        self.save_hyperparameters()
        self.num_train = int(num_train)
        self.num_val = int(num_val)
        self.num_test = int(num_test)
        self.num_categories = int(num_categories)
        self.occlusion_prob = float(occlusion_prob)
        self.has_keypoints = True
        self.has_masks = True
        self.num_keypoints = NUM_PART_TYPES
        self.num_mask_labels = NUM_PART_TYPES + 1
        self.part_names = list(PART_NAMES)  # names of the mask labels, background (last) excluded

    default_val_split = "val"

    def split_source(self, split: Split) -> Split:
        """Prediction reads the test split."""
        return "test" if split == "predict" else split

    def build_dataset(self, split: Split) -> SyntheticPartsDataset:
        return self._generate(split, train=split == "train")

    def build_train_eval_dataset(self) -> SyntheticPartsDataset:
        return self._generate("train", train=False)

    def _generate(self, split: Split, train: bool) -> SyntheticPartsDataset:
        n = {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]
        return SyntheticPartsDataset(
            n,
            split=split,  # type: ignore[arg-type]
            image_size=self.image_size,
            mask_size=self.mask_size,
            num_categories=self.num_categories,
            seed=self.seed,
            train=train,
            occlusion_prob=self.occlusion_prob,
        )


def sample_grid(dataset: SyntheticPartsDataset, num: int = 16, columns: int = 4) -> np.ndarray:
    """A labelled picture of items 0..num-1: image (visible keypoints marked) beside its part mask.

    Args:
        dataset: The synthetic dataset to draw from.
        num: Number of items.
        columns: Items per row.

    Returns:
        (H, W, 3) uint8 RGB with column headers and a legend of the part colours.
    """
    from PIL import Image, ImageDraw

    from ..visualize import colorize, labelled_grid, part_palette

    num = min(num, len(dataset))
    columns = max(1, min(columns, num))
    size, num_labels = dataset.image_size, NUM_PART_TYPES + 1
    tiles = []
    for i in range(num):
        r = dataset.render(i)
        img = Image.fromarray((r["image"].transpose(1, 2, 0) * 255).round().astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for t in np.flatnonzero(r["visible"]):
            x, y = r["keypoints"][t]
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(255, 255, 255), outline=(0, 0, 0))
        mask = Image.fromarray(colorize(r["mask"], num_labels)).resize((size, size), Image.NEAREST)
        tiles += [np.asarray(img), np.asarray(mask)]
    blank = np.full_like(tiles[0], 255)
    tiles += [blank] * (2 * columns * math.ceil(num / columns) - len(tiles))
    rows = [tiles[k : k + 2 * columns] for k in range(0, len(tiles), 2 * columns)]
    palette = part_palette(num_labels)
    legend = [(tuple(int(c) for c in palette[t]), name) for t, name in enumerate([*PART_NAMES, "background"])]
    return labelled_grid(rows, ["image", "ground truth"] * columns, legend, "white dots: visible keypoints")


def main(argv: list[str] | None = None) -> str:
    """``python -m mpae_lightning.data.synthetic --out DIR``: write a PNG grid of synthetic samples."""
    parser = argparse.ArgumentParser(description="Write a PNG grid of synthetic part images and their part masks.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--split", default="train", choices=sorted(_SPLIT_CODE))
    parser.add_argument("--num", type=int, default=16, help="number of samples")
    parser.add_argument("--columns", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-categories", type=int, default=3)
    args = parser.parse_args(argv)
    dataset = SyntheticPartsDataset(
        args.num, split=args.split, image_size=args.image_size, num_categories=args.num_categories, seed=args.seed
    )
    from ..visualize import save_grid

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"synthetic_{args.split}_grid.png")
    save_grid(path, sample_grid(dataset, args.num, args.columns))
    print(path)
    return path


if __name__ == "__main__":
    main()
