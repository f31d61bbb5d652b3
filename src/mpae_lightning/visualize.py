"""Fixed part palette, overlays and image grids, so part maps can be looked at."""
from __future__ import annotations

import colorsys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .data.transforms import denormalize

BACKGROUND_COLOR = (40, 40, 40)


def part_palette(num_parts: int) -> np.ndarray:
    """(num_parts, 3) uint8 colours: K well-separated hues, then dark grey for the background (last).

    The first colours never change when K grows, so the same part id keeps its colour.
    """
    colors = []
    for i in range(num_parts - 1):
        hue = (i * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbours distinct
        sat, val = (0.85, 0.95) if (i // 7) % 2 == 0 else (0.55, 0.8)
        colors.append([round(c * 255) for c in colorsys.hsv_to_rgb(hue, sat, val)])
    colors.append(list(BACKGROUND_COLOR))
    return np.asarray(colors, dtype=np.uint8)


def colorize(labels: torch.Tensor | np.ndarray, num_parts: int) -> np.ndarray:
    """(..., H, W) integer labels -> (..., H, W, 3) uint8 RGB with :func:`part_palette`."""
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    palette = part_palette(num_parts)
    return palette[np.clip(labels, 0, num_parts - 1)]


def overlay(image: torch.Tensor, labels: torch.Tensor, num_parts: int, alpha: float = 0.55) -> np.ndarray:
    """Blend a (3, H, W) [0, 1] image with a part-label map (resized with nearest); background stays see-through."""
    h, w = image.shape[-2:]
    if tuple(labels.shape[-2:]) != (h, w):
        labels = F.interpolate(labels[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
    rgb = image.permute(1, 2, 0).cpu().numpy() * 255.0
    color = colorize(labels, num_parts).astype(np.float64)
    weight = np.where((labels.cpu().numpy() == num_parts - 1)[..., None], alpha * 0.3, alpha)
    return (rgb * (1 - weight) + color * weight).round().clip(0, 255).astype(np.uint8)


def save_label_png(path: str | Path, labels: torch.Tensor | np.ndarray, num_parts: int) -> None:
    """Write labels as a palette PNG: pixel values are part ids, colours from :func:`part_palette`."""
    labels = labels.cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)
    if num_parts > 256:
        raise ValueError(f"a palette PNG holds at most 256 labels, got {num_parts}")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(part_palette(num_parts).reshape(-1).tolist())
    img.save(path)


def _resize_rgb(rgb: np.ndarray, size: int) -> np.ndarray:
    if rgb.shape[0] == size and rgb.shape[1] == size:
        return rgb
    return np.asarray(Image.fromarray(rgb).resize((size, size), Image.NEAREST))


def part_grid(
    images: torch.Tensor,
    part_probs: torch.Tensor,
    restored: torch.Tensor | None = None,
    ground_truth: torch.Tensor | None = None,
    num_gt_labels: int | None = None,
    tile: int = 128,
) -> np.ndarray:
    """One row per image: image | part overlay | part map [| ground truth] [| restored].

    Args:
        images: (B, 3, H, W) ImageNet-normalised images.
        part_probs: (B, K+1, h, w) part probabilities, background last.
        restored: optional (B, 3, r, r) restored images (normalised).
        ground_truth: optional (B, m, m) ground-truth part masks (background = last label).
        num_gt_labels: number of ground-truth labels (for their palette).
        tile: side of every tile in pixels.

    Returns:
        (rows*tile, cols*tile, 3) uint8 RGB.
    """
    num_parts = part_probs.shape[1]
    labels = part_probs.argmax(dim=1)
    shown = denormalize(images.float())
    rows = []
    for i in range(images.shape[0]):
        img = (shown[i].permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        tiles = [img, overlay(shown[i], labels[i], num_parts), colorize(labels[i], num_parts)]
        if ground_truth is not None:
            tiles.append(colorize(ground_truth[i], num_gt_labels or int(ground_truth.max()) + 1))
        if restored is not None:
            rest = denormalize(restored[i : i + 1].float())[0]
            tiles.append((rest.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))
        rows.append(np.concatenate([_resize_rgb(t, tile) for t in tiles], axis=1))
    return np.concatenate(rows, axis=0)


def save_grid(path: str | Path, grid: np.ndarray) -> None:
    Image.fromarray(grid).save(path)
