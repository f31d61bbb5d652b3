"""Part colours, overlays and labelled image grids, so part maps can be looked at.

Predicted part ids and ground-truth label ids are unrelated, so a picture that gives
both the same colour for the same id invites false matching. When ground truth is
shown, every predicted part is coloured like the ground-truth label it is matched to
(a one-to-one Hungarian match maximising the overlap on the shown images); parts
without a match get colours no ground-truth label uses. Every grid carries column
headers and a legend that says which colour is which and how colours were assigned, listing
only the parts and labels that appear in the shown maps. Panels are at least
:data:`MIN_PANEL` pixels a side (label maps upscaled with nearest, so every part keeps
sharp edges), and a title line can say which model, epoch and score a picture shows.
"""
from __future__ import annotations

import colorsys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from scipy.optimize import linear_sum_assignment

from .data.transforms import denormalize
from .metrics.functional import contingency_table

__all__ = [
    "BACKGROUND_COLOR",
    "MIN_PANEL",
    "PartColours",
    "colorize",
    "denormalize",
    "label_grid",
    "labelled_grid",
    "main_score",
    "match_parts",
    "overlay",
    "panel_size",
    "part_colours",
    "part_grid",
    "part_palette",
    "picture_title",
    "resize_labels",
    "save_grid",
    "save_label_png",
]

BACKGROUND_COLOR = (40, 40, 40)
#: Smallest side of a picture's panel in pixels: smaller maps (e.g. 64 px inputs, 128 px maps) are upscaled.
MIN_PANEL = 256
_WHITE = (255, 255, 255)
_TEXT = (20, 20, 20)
Colour = tuple[int, int, int]


def part_palette(num_parts: int) -> np.ndarray:
    """(num_parts, 3) uint8 colours: K well-separated hues, then dark grey for the background (last).

    The first colours never change when K grows, so the same id keeps its colour.
    """
    colors = []
    for i in range(num_parts - 1):
        hue = (i * 0.618033988749895) % 1.0  # golden-ratio steps keep neighbours distinct
        sat, val = (0.85, 0.95) if (i // 7) % 2 == 0 else (0.55, 0.8)
        colors.append([round(c * 255) for c in colorsys.hsv_to_rgb(hue, sat, val)])
    colors.append(list(BACKGROUND_COLOR))
    return np.asarray(colors, dtype=np.uint8)


def _numpy(labels: torch.Tensor | np.ndarray) -> np.ndarray:
    return labels.detach().cpu().numpy() if isinstance(labels, torch.Tensor) else np.asarray(labels)


def colorize(labels: torch.Tensor | np.ndarray, num_parts: int, palette: np.ndarray | None = None) -> np.ndarray:
    """(..., H, W) integer labels -> (..., H, W, 3) uint8 RGB (default colours: :func:`part_palette`)."""
    palette = part_palette(num_parts) if palette is None else np.asarray(palette, dtype=np.uint8)
    return palette[np.clip(_numpy(labels), 0, len(palette) - 1)]


def _to_rgb(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float in [0, 1] -> (H, W, 3) uint8."""
    return (image.detach().float().permute(1, 2, 0).cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)


def _blend(rgb: np.ndarray, labels: np.ndarray, palette: np.ndarray, alpha: float) -> np.ndarray:
    """Tint ``rgb`` with the label colours; the background (last label) is only lightly tinted."""
    color = palette[np.clip(labels, 0, len(palette) - 1)].astype(np.float64)
    weight = np.where((labels == len(palette) - 1)[..., None], alpha * 0.3, alpha)
    return (rgb.astype(np.float64) * (1 - weight) + color * weight).round().clip(0, 255).astype(np.uint8)


def resize_labels(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest resize of (H, W) integer labels to ``size`` = (height, width) (exact below 2**24)."""
    if labels.shape == size:
        return labels
    resized = F.interpolate(torch.from_numpy(labels.astype(np.int64))[None, None].float(), size=size, mode="nearest")
    return resized[0, 0].long().numpy()


def panel_size(height: int, width: int, minimum: int = MIN_PANEL) -> tuple[int, int]:
    """(height, width) scaled by the smallest integer factor that makes the shorter side >= ``minimum``.

    An integer factor keeps every label pixel an equal block under nearest upscaling.
    """
    if height < 1 or width < 1:
        raise ValueError(f"a panel needs a positive size, got {height}x{width}")
    factor = max(1, -(-minimum // min(height, width)))
    return height * factor, width * factor


def _resize_rgb(rgb: np.ndarray, size: tuple[int, int], smooth: bool) -> np.ndarray:
    if rgb.shape[:2] == size:
        return rgb
    resample = Image.BILINEAR if smooth else Image.NEAREST
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), resample))


def overlay(
    image: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    num_parts: int,
    alpha: float = 0.55,
    palette: np.ndarray | None = None,
    min_size: int = MIN_PANEL,
) -> np.ndarray:
    """Blend a (3, H, W) [0, 1] image with a part-label map (resized with nearest); background stays see-through.

    An image whose shorter side is below ``min_size`` is first upscaled by an integer factor
    (:func:`panel_size`; bilinear for the image, nearest for the labels); 0 keeps H x W.
    """
    palette = part_palette(num_parts) if palette is None else np.asarray(palette, dtype=np.uint8)
    rgb = _to_rgb(image)
    if min_size > 0:
        rgb = _resize_rgb(rgb, panel_size(*rgb.shape[:2], minimum=min_size), smooth=True)
    return _blend(rgb, resize_labels(_numpy(labels), rgb.shape[:2]), palette, alpha)


def save_label_png(path: str | Path, labels: torch.Tensor | np.ndarray, num_parts: int) -> None:
    """Write labels as a palette PNG: pixel values are part ids, colours from :func:`part_palette`."""
    labels = _numpy(labels)
    if num_parts > 256:
        raise ValueError(f"a palette PNG holds at most 256 labels, got {num_parts}")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(part_palette(num_parts).reshape(-1).tolist())
    img.save(path)


def save_grid(path: str | Path, grid: np.ndarray, title: str | None = None) -> None:
    """Write an (H, W, 3) uint8 picture as PNG (the one writer for every grid).

    ``title`` is also stored as the PNG's ``Title`` text chunk, so tools can read it back.
    """
    info = None
    if title:
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("Title", title)
    Image.fromarray(grid).save(path, pnginfo=info)


def main_score(metrics: Mapping[str, object], prefix: str,
               names: Sequence[str] = ("keypoint_nmi", "mask_nmi")) -> tuple[str, float] | None:
    """The first of ``names`` logged under ``prefix`` in ``metrics`` (e.g. ``trainer.callback_metrics``),
    as ``("<prefix> keypoint NMI", value)``; None when none was logged."""
    for name in names:
        value = metrics.get(f"{prefix}/{name}")
        if value is not None:
            kind, _, score = name.rpartition("_")
            return f"{prefix} {kind.replace('_', ' ')} {score.upper()}", float(value)  # type: ignore[arg-type]
    return None


def picture_title(
    model: str, epoch: int | None = None, score: tuple[str, float] | None = None, num_parts: int | None = None
) -> str:
    """The title line of a picture: which model (checkpoint file name, run, or "untrained"), epoch and score.

    Args:
        model: the checkpoint file name, run name or ``"untrained"``.
        epoch: Lightning's epoch index (as in ``epoch=3`` checkpoint names), or None if unknown.
        score: (name, value in percent), e.g. from :func:`main_score`, or None if unknown.
        num_parts: K, shown as ``K=...``.
    """
    parts = [f"MPAE K={num_parts}" if num_parts is not None else "MPAE", model]
    if epoch is not None:
        parts.append(f"epoch {epoch}")
    parts.append(f"{score[0]} {score[1]:.2f}" if score is not None else "score unknown")
    return "  |  ".join(parts)


# ----------------------------------------------------------------------------- colours
def match_parts(
    pred: torch.Tensor | np.ndarray,
    truth: torch.Tensor | np.ndarray,
    num_parts: int,
    num_true_labels: int,
) -> np.ndarray:
    """The ground-truth label each predicted part is matched to, ``-1`` for none.

    Foreground parts (the first K of ``num_parts`` = K+1) and foreground labels (all
    but the last) are matched one to one maximising the summed overlap (Hungarian,
    ``scipy.optimize.linear_sum_assignment``); a pair that does not overlap at all
    stays unmatched. The background channel (last) is matched to the background
    label (last). Truth values outside ``[0, num_true_labels)`` (e.g. an ignore value) are skipped.

    Args:
        pred: integer predicted part ids, any shape.
        truth: integer ground-truth labels, same shape as ``pred``.
        num_parts: K+1, background last.
        num_true_labels: ground-truth labels, background last.

    Returns:
        (num_parts,) int64 array.
    """
    pred_t = torch.as_tensor(_numpy(pred)).reshape(-1).long()
    truth_t = torch.as_tensor(_numpy(truth)).reshape(-1).long()
    if pred_t.shape != truth_t.shape:
        raise ValueError(f"pred and truth must have the same number of pixels, got {pred_t.numel()} and {truth_t.numel()}")
    keep = (truth_t >= 0) & (truth_t < num_true_labels)
    table = contingency_table(pred_t[keep], truth_t[keep], num_true_labels, num_parts).numpy()
    overlap = table[:-1, :-1]  # foreground labels x foreground parts
    assignment = np.full(num_parts, -1, dtype=np.int64)
    assignment[-1] = num_true_labels - 1
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    for label, part in zip(rows, cols):
        if overlap[label, part] > 0:
            assignment[part] = label
    return assignment


@dataclass
class PartColours:
    """The colours of one picture and the legend that explains them.

    Attributes:
        prediction: (K+1, 3) uint8 colour of each predicted part id (background last).
        truth: (T, 3) uint8 colour of each ground-truth label, or None without ground truth.
        assignment: (K+1,) matched ground-truth label of each part (-1: none), or None.
        legend: (colour, text) entries, in the order drawn.
        note: how the colours were assigned, drawn above the legend.
    """

    prediction: np.ndarray
    truth: np.ndarray | None
    assignment: np.ndarray | None
    legend: list[tuple[Colour, str]]
    note: str


def _colour(row: np.ndarray) -> Colour:
    return (int(row[0]), int(row[1]), int(row[2]))


def part_colours(
    pred: torch.Tensor | np.ndarray,
    num_parts: int,
    truth: torch.Tensor | np.ndarray | None = None,
    num_true_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    shown_parts: Iterable[int] | None = None,
    shown_labels: Iterable[int] | None = None,
) -> PartColours:
    """Colours for predicted parts (and ground truth), with a legend over the ids present.

    Without ``truth`` every part id has its :func:`part_palette` colour. With ``truth``
    the ground-truth labels keep their :func:`part_palette` colours and each predicted
    part takes the colour of the label :func:`match_parts` assigns it; unmatched parts
    get colours that no ground-truth label uses.

    Args:
        pred: integer predicted part ids of the shown images.
        num_parts: K+1, background last.
        truth: integer ground-truth labels of the same pixels (same shape as ``pred``), or None.
        num_true_labels: ground-truth labels including the background (last); default ``truth.max() + 1``.
        label_names: names of the foreground ground-truth labels (``num_true_labels - 1`` of them).
        shown_parts: the part ids that appear in the pictured maps (default: those in ``pred``);
            the legend lists only these (and the background only if it appears).
        shown_labels: the ground-truth labels that appear in the pictured maps (default: those in ``truth``).
    """
    pred_np = _numpy(pred)
    shown = set(np.unique(pred_np).tolist()) if shown_parts is None else {int(k) for k in shown_parts}
    present = sorted(shown - {num_parts - 1})
    background = [(BACKGROUND_COLOR, "background")]
    if truth is None:
        palette = part_palette(num_parts)
        legend = [(_colour(palette[k]), f"part {k}") for k in present]
        legend += background if num_parts - 1 in shown else []
        return PartColours(palette, None, None, legend, "colours: predicted part ids")
    truth_np = _numpy(truth)
    num_true = int(num_true_labels or int(truth_np.max()) + 1)
    if label_names is not None and len(label_names) != num_true - 1:
        raise ValueError(
            f"label_names has {len(label_names)} names but there are {num_true - 1} foreground labels"
        )
    names = list(label_names) if label_names is not None else [f"label {t}" for t in range(num_true - 1)]
    assignment = match_parts(pred_np, truth_np, num_parts, num_true)
    unmatched = [k for k in range(num_parts - 1) if assignment[k] < 0]
    # Ground-truth labels use hues 0..T-2; unmatched parts continue the same sequence after them.
    hues = part_palette(num_true + len(unmatched))[:-1]
    truth_palette = np.concatenate([hues[: num_true - 1], part_palette(1)])
    prediction = np.empty((num_parts, 3), dtype=np.uint8)
    prediction[-1] = BACKGROUND_COLOR
    for k in range(num_parts - 1):
        label = assignment[k]
        prediction[k] = hues[label] if label >= 0 else hues[num_true - 1 + unmatched.index(k)]
    part_of = {int(assignment[k]): k for k in range(num_parts - 1) if assignment[k] >= 0}
    truth_present = set(np.unique(truth_np).tolist()) if shown_labels is None else {int(t) for t in shown_labels}
    legend = []
    for t in range(num_true - 1):
        if t in part_of and (t in truth_present or part_of[t] in shown):
            legend.append((_colour(truth_palette[t]), f"{names[t]} = part {part_of[t]}"))
        elif t in truth_present and t not in part_of:
            legend.append((_colour(truth_palette[t]), f"{names[t]} (no part)"))
    legend += [(_colour(prediction[k]), f"part {k} (unmatched)") for k in present if assignment[k] < 0]
    legend += background if (num_parts - 1 in shown or num_true - 1 in truth_present) else []
    note = "predicted parts coloured like the ground-truth label they overlap most (Hungarian match on these images)"
    return PartColours(prediction, truth_palette, assignment, legend, note)


# ----------------------------------------------------------------------------- drawing
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, AttributeError, OSError, ImportError):  # Pillow < 10.1 or no FreeType
        return ImageFont.load_default()


def _fitting_font(draw: ImageDraw.ImageDraw, text: str, width: int, size: int) -> ImageFont.ImageFont:
    font = _font(size)
    while size > 8 and draw.textlength(text, font=font) > width - 2:
        size -= 1
        font = _font(size)
    return font


def labelled_grid(
    rows: Sequence[Sequence[np.ndarray]],
    headers: Sequence[str],
    legend: Sequence[tuple[Colour, str]] = (),
    note: str | None = None,
    pad: int = 2,
    title: str | None = None,
) -> np.ndarray:
    """Lay out equally sized (h, w, 3) uint8 tiles under a title line and column headers, with a legend below.

    Args:
        rows: one list of tiles per row, one tile per header.
        headers: column titles.
        legend: (colour, text) entries drawn as swatches, wrapped to the grid width.
        note: one line above the legend (e.g. how colours were assigned).
        pad: white gap between tiles in pixels.
        title: one line above the headers (e.g. :func:`picture_title`), shrunk to fit the width.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    if not rows or any(len(r) != len(headers) for r in rows):
        raise ValueError(f"every row needs one tile per header ({len(headers)}), got rows of {[len(r) for r in rows]}")
    th, tw = rows[0][0].shape[:2]
    if any(t.shape[:2] != (th, tw) for r in rows for t in r):
        raise ValueError("all tiles of a grid must have the same size")
    size = max(10, min(24, tw // 9))
    cols = len(headers)
    width = cols * tw + (cols - 1) * pad
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    font = _font(size)
    line = size + 6
    # Flow the legend entries into lines that fit the grid width.
    swatch, gap = size, size
    legend_lines: list[list[tuple[Colour, str, float]]] = []
    note_lines: list[str] = []
    if note:
        words, current = note.split(), ""
        for word in words:
            trial = f"{current} {word}".strip()
            if current and scratch.textlength(trial, font=font) > width - 4:
                note_lines.append(current)
                current = word
            else:
                current = trial
        note_lines.append(current)
    x = width
    for colour, text in legend:
        w = swatch + 4 + scratch.textlength(text, font=font)
        if x + w > width - 2 or not legend_lines:
            legend_lines.append([])
            x = 2
        legend_lines[-1].append((colour, text, w))
        x += w + gap
    title_h = line + 4 if title else 0
    header_h = title_h + line + 2
    legend_h = (len(note_lines) + len(legend_lines)) * line + (4 if legend_lines or note_lines else 0)
    height = header_h + len(rows) * th + (len(rows) - 1) * pad + legend_h
    canvas = Image.new("RGB", (width, height), _WHITE)
    draw = ImageDraw.Draw(canvas)
    if title:
        f = _fitting_font(draw, title, width, size)
        draw.text((2, 3), title, fill=_TEXT, font=f)
        draw.line([(0, title_h - 2), (width - 1, title_h - 2)], fill=_TEXT)
    for c, header in enumerate(headers):
        f = _fitting_font(draw, header, tw, size)
        x0 = c * (tw + pad) + (tw - draw.textlength(header, font=f)) / 2
        draw.text((x0, title_h + 3), header, fill=_TEXT, font=f)
    for r, row in enumerate(rows):
        y0 = header_h + r * (th + pad)
        for c, tile in enumerate(row):
            canvas.paste(Image.fromarray(np.ascontiguousarray(tile)), (c * (tw + pad), y0))
    y = header_h + len(rows) * th + (len(rows) - 1) * pad + 4
    for text in note_lines:
        draw.text((2, y), text, fill=_TEXT, font=font)
        y += line
    for entries in legend_lines:
        x = 2
        for colour, text, w in entries:
            draw.rectangle([x, y + 2, x + swatch - 1, y + 1 + swatch], fill=colour, outline=_TEXT)
            draw.text((x + swatch + 4, y + 1), text, fill=_TEXT, font=font)
            x += w + gap
        y += line
    return np.asarray(canvas)


def label_grid(
    images: torch.Tensor,
    labels: torch.Tensor | np.ndarray,
    num_parts: int,
    restored: torch.Tensor | None = None,
    ground_truth: torch.Tensor | np.ndarray | None = None,
    num_gt_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    tile: int | tuple[int, int] = MIN_PANEL,
    normalized: bool = True,
    part_map: bool = True,
    title: str | None = None,
    min_tile: int = MIN_PANEL,
) -> np.ndarray:
    """One row per image: image | overlay | part map [| ground truth] [| restored], headers and legend.

    Args:
        images: (B, 3, H, W) images, ImageNet-normalised (or in [0, 1] with ``normalized=False``).
        labels: (B, h, w) predicted part ids, background = ``num_parts - 1``.
        num_parts: K+1.
        restored: optional (B, 3, r, r) restored images (normalised).
        ground_truth: optional (B, m, m) ground-truth labels (background = last label); predicted
            parts are then coloured by their match to it (see :func:`part_colours`).
        num_gt_labels: ground-truth labels including the background.
        label_names: names of the foreground ground-truth labels, for the legend.
        tile: side (or (height, width)) of every tile in pixels; raised by an integer factor
            to at least ``min_tile`` on its shorter side (:func:`panel_size`).
        normalized: whether ``images`` are ImageNet-normalised.
        part_map: include the plain part-map column.
        title: a line above the headers (e.g. :func:`picture_title`).
        min_tile: smallest tile side (default :data:`MIN_PANEL`; 0 keeps ``tile`` as given).
    """
    size = (tile, tile) if isinstance(tile, int) else (int(tile[0]), int(tile[1]))
    size = panel_size(*size, minimum=min_tile) if min_tile > 0 else size
    labels_np = _numpy(labels).astype(np.int64)
    truth_np = None if ground_truth is None else _numpy(ground_truth).astype(np.int64)
    if truth_np is not None and truth_np.ndim == 4:
        truth_np = truth_np[:, 0]
    counts = {"images": images.shape[0], "labels": labels_np.shape[0]}
    if truth_np is not None:
        counts["ground_truth"] = truth_np.shape[0]
    if restored is not None:
        counts["restored"] = restored.shape[0]
    if len(set(counts.values())) != 1:
        raise ValueError(f"label_grid needs one entry per image in every input, got {counts}")
    # The maps as drawn (nearest to the tile size): the legend lists exactly what they show.
    shown_labels = [resize_labels(lab, size) for lab in labels_np]
    shown_truth = None if truth_np is None else [resize_labels(t, size) for t in truth_np]
    shown_parts = set(np.unique(np.stack(shown_labels)).tolist())
    if truth_np is not None:
        # Match on the shown images, compared at the ground truth's resolution.
        matched = np.stack([resize_labels(lab, truth_np.shape[-2:]) for lab in labels_np])
        colours = part_colours(matched, num_parts, truth_np, num_gt_labels, label_names, shown_parts=shown_parts,
                               shown_labels=np.unique(np.stack(shown_truth)).tolist())
    else:
        colours = part_colours(labels_np, num_parts, shown_parts=shown_parts)
    shown = denormalize(images.float()) if normalized else images.float().clamp(0, 1)
    headers = ["image", "overlay", *(["part map"] if part_map else []),
               *(["ground truth"] if truth_np is not None else []), *(["restored"] if restored is not None else [])]
    rows = []
    for i in range(images.shape[0]):
        rgb = _resize_rgb(_to_rgb(shown[i]), size, smooth=True)
        lab = shown_labels[i]
        row = [rgb, _blend(rgb, lab, colours.prediction, 0.55)]
        if part_map:
            row.append(colours.prediction[lab])
        if shown_truth is not None:
            row.append(colorize(shown_truth[i], len(colours.truth), colours.truth))
        if restored is not None:
            row.append(_resize_rgb(_to_rgb(denormalize(restored[i].float())), size, smooth=True))
        rows.append(row)
    return labelled_grid(rows, headers, colours.legend, colours.note, title=title)


def part_grid(
    images: torch.Tensor,
    part_probs: torch.Tensor,
    restored: torch.Tensor | None = None,
    ground_truth: torch.Tensor | None = None,
    num_gt_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    tile: int = MIN_PANEL,
    title: str | None = None,
    min_tile: int = MIN_PANEL,
) -> np.ndarray:
    """:func:`label_grid` of the argmax of (B, K+1, h, w) part probabilities (background last)."""
    return label_grid(images, part_probs.argmax(dim=1), part_probs.shape[1], restored=restored,
                      ground_truth=ground_truth, num_gt_labels=num_gt_labels, label_names=label_names, tile=tile,
                      title=title, min_tile=min_tile)
