"""The evaluation protocol of MPAE (docs/evaluation.md §2–3) on top of the contingency metrics.

* Keypoint mode (CUB, CelebA): the part map is read at each keypoint by nearest
  sampling with zero padding (a keypoint on the right/bottom border reads label 0);
  the predicted label is the argmax over all K+1 channels ("NMI/ARI") and over the
  K foreground channels ("FG-NMI/FG-ARI"); the true label is the keypoint index.
* Mask mode (PartImageNet): every pixel, argmax over K+1 against the mask label.

Part maps are ``(B, K+1, H, W)`` with the background channel LAST. Every
``num_parts`` argument here is K, the model's ``MPAE(num_parts=K)`` (foreground
parts only); the K+1 channel count is called ``num_channels``. The metric
wrappers keep only contingency tables and counts (summed across processes), so
their results are exact under DDP provided every test sample is seen by exactly
one process.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

from mpae_lightning.metrics.clustering import ContingencyMetric, _check_num_labels
from mpae_lightning.metrics.functional import (
    ari_from_contingency,
    contingency_table,
    foreground_iou_from_contingency,
    nmi_from_contingency,
)

__all__ = [
    "ForegroundMaskMetrics",
    "KeypointPartMetrics",
    "MaskPartMetrics",
    "PartCount",
    "count_foreground_parts",
    "keypoint_part_labels",
    "mask_part_labels",
    "upsampled_foreground",
]

#: How ``MaskPartMetrics`` computes the foreground IoU: ``"upsample_to_mask"`` upsamples the part
#: probabilities it is given for it (the native patch-grid map in ``mpae test``) bilinearly with
#: ``align_corners=True`` to the mask size and takes the argmax (PDiscoFormer's
#: ``engine/eval_fg_bg.py``); ``"eval_map"`` takes the argmax of the evaluation map against the
#: mask resized to it with nearest, the pixels NMI/ARI are computed on.
FgIoUProtocol = Literal["upsample_to_mask", "eval_map"]


def _check_part_probs(part_probs: Tensor, min_channels: int = 2) -> None:
    if part_probs.ndim != 4 or part_probs.shape[1] < min_channels:
        raise ValueError(
            f"`part_probs` must have shape (B, K+1, H, W) with K >= {min_channels - 1}, "
            f"got {tuple(part_probs.shape)}"
        )


def _check_num_parts(num_parts: int) -> int:
    """Validate K (foreground parts, the model's ``num_parts``) and return it."""
    if isinstance(num_parts, bool) or not isinstance(num_parts, int) or num_parts < 1:
        raise ValueError(
            f"`num_parts` (K foreground parts, background not included) must be an integer >= 1, got {num_parts!r}"
        )
    return num_parts


def _check_part_channels(part_probs: Tensor, num_parts: int) -> None:
    """Refuse a part map whose channel count is not ``num_parts + 1``, naming both values.

    A map with exactly ``num_parts`` channels most likely comes from passing the
    channel count K+1 as ``num_parts`` (its meaning in earlier releases); the message says so.
    """
    if part_probs.ndim != 4:
        raise ValueError(f"`part_probs` must have shape (B, K+1, H, W), got {tuple(part_probs.shape)}")
    channels = part_probs.shape[1]
    if channels != num_parts + 1:
        hint = ""
        if channels == num_parts and channels >= 2:
            hint = (
                f"; num_parts counts foreground parts only (the model's num_parts), "
                f"so for this map pass num_parts={channels - 1}"
            )
        raise ValueError(
            f"part_probs has {channels} channels but num_parts={num_parts} expects "
            f"K+1={num_parts + 1} (K foreground parts + background){hint}"
        )


def keypoint_part_labels(
    part_probs: Tensor,
    keypoints: Tensor,
    visible: Tensor | None,
    image_size: int | tuple[int, int],
) -> dict[str, Tensor]:
    """Predicted part labels at the keypoints, as the authors' ``validate_CUB``.

    Each keypoint ``(x, y)`` is divided by the input image's width and height (in
    float64), mapped to [-1, 1] and rounded to float32, and the map is read with
    ``grid_sample(mode="nearest", padding_mode="zeros", align_corners=False)``, all
    as the authors' evaluation does. So a keypoint exactly on the right or bottom
    border (x = W or y = H) falls outside an even-sized map and reads an all-zero
    vector, whose argmax is label 0; the paper's numbers include such keypoints.

    Args:
        part_probs: ``(B, K+1, H, W)`` part probabilities (or logits), background last.
        keypoints: ``(B, P, 2)`` keypoint ``(x, y)`` in pixels of the input image.
        visible: ``(B, P)`` bool, keypoints to keep; ``None`` keeps all.
        image_size: input image size ``S`` or ``(height, width)``.

    Returns:
        dict of 1-D int64 tensors over the kept keypoints, in (image, keypoint) order:
        ``pred`` (argmax over all K+1 channels), ``fg_pred`` (argmax over the K
        foreground channels) and ``target`` (keypoint index ``0..P-1``).
    """
    _check_part_probs(part_probs)
    batch, num_points = keypoints.shape[:2]
    if keypoints.shape != (part_probs.shape[0], num_points, 2):
        raise ValueError(
            f"`keypoints` must have shape (B, P, 2) with B={part_probs.shape[0]}, got {tuple(keypoints.shape)}"
        )
    if visible is not None and visible.shape != (batch, num_points):
        raise ValueError(f"`visible` must have shape {(batch, num_points)}, got {tuple(visible.shape)}")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size

    maps = part_probs if part_probs.dtype in (torch.float32, torch.float64) else part_probs.float()
    points = keypoints.to(device=maps.device, dtype=torch.float64)
    # Missing keypoints are sometimes stored as NaN; read anything there, it is masked out.
    points = torch.nan_to_num(points, nan=0.0, posinf=0.0, neginf=0.0)
    size = torch.tensor([width, height], dtype=torch.float64, device=points.device)
    # The authors build the grid in float64 and cast it to float32 (float64 maps get the same grid values).
    grid = ((points / size) * 2 - 1).float().to(maps.dtype).unsqueeze(2)  # (B, P, 1, 2)
    sampled = F.grid_sample(maps, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    sampled = sampled.squeeze(3)  # (B, K+1, P)
    pred = sampled.argmax(dim=1)
    fg_pred = sampled[:, :-1].argmax(dim=1)
    target = torch.arange(num_points, device=pred.device).expand(batch, num_points)
    if visible is None:
        return {"pred": pred.reshape(-1), "fg_pred": fg_pred.reshape(-1), "target": target.reshape(-1)}
    keep = visible.to(device=pred.device, dtype=torch.bool)
    return {"pred": pred[keep], "fg_pred": fg_pred[keep], "target": target[keep]}


def _resize_nearest(labels: Tensor, size: tuple[int, int]) -> Tensor:
    """Nearest resize of ``(B, h, w)`` integer labels (exact below 2**24)."""
    return F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].to(labels.dtype)


def mask_part_labels(
    part_probs: Tensor,
    mask: Tensor,
    resolution: Literal["map", "mask"] = "map",
) -> dict[str, Tensor]:
    """Predicted part label and mask label of every pixel.

    Args:
        part_probs: ``(B, K+1, H, W)`` part probabilities (or logits), background last.
        mask: ``(B, h, w)`` or ``(B, 1, h, w)`` integer ground-truth labels.
        resolution: where the two are compared when their sizes differ. ``"map"``
            resizes the mask to the part map with nearest (the authors' protocol:
            ``H*W`` labels per image); ``"mask"`` resizes the argmax map to the mask.

    Returns:
        dict with flattened int64 ``pred`` (argmax over all K+1 channels) and ``target``.
    """
    _check_part_probs(part_probs)
    if mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    if mask.ndim != 3 or mask.shape[0] != part_probs.shape[0]:
        raise ValueError(
            f"`mask` must have shape (B, h, w) with B={part_probs.shape[0]}, got {tuple(mask.shape)}"
        )
    if resolution not in ("map", "mask"):
        raise ValueError(f"`resolution` must be 'map' or 'mask', got {resolution!r}")
    pred = part_probs.argmax(dim=1)
    if pred.shape[-2:] != mask.shape[-2:]:
        if resolution == "map":
            mask = _resize_nearest(mask, tuple(pred.shape[-2:]))
        else:
            pred = _resize_nearest(pred, tuple(mask.shape[-2:]))
    return {"pred": pred.reshape(-1), "target": mask.reshape(-1).long()}


def upsampled_foreground(part_probs: Tensor, size: tuple[int, int]) -> Tensor:
    """Foreground prediction at ``size`` as PDiscoFormer's ``engine/eval_fg_bg.py`` computes it.

    The part probabilities are upsampled bilinearly with ``align_corners=True`` to ``size`` (in at
    least float32), the argmax is taken over the K+1 channels and a pixel is foreground when it is
    not the background (last) channel.

    Args:
        part_probs: ``(B, K+1, h, w)`` part probabilities, background last (PDiscoFormer upsamples
            its patch-grid map).
        size: ``(height, width)`` of the ground-truth mask.

    Returns:
        ``(B, height, width)`` bool.
    """
    _check_part_probs(part_probs)
    maps = part_probs if part_probs.dtype in (torch.float32, torch.float64) else part_probs.float()
    if tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=True)
    return maps.argmax(dim=1) != part_probs.shape[1] - 1


def count_foreground_parts(part_probs: Tensor) -> Tensor:
    """Number of foreground channels (all but the last) that win at least one pixel.

    Args:
        part_probs: ``(B, K+1, H, W)`` part probabilities (or logits), background last.

    Returns:
        ``(B,)`` int64 tensor.
    """
    _check_part_probs(part_probs, min_channels=1)
    batch, channels = part_probs.shape[:2]
    labels = part_probs.argmax(dim=1).reshape(batch, -1)
    offsets = torch.arange(batch, device=labels.device)[:, None] * channels
    hits = torch.bincount((labels + offsets).reshape(-1), minlength=batch * channels)
    return (hits.reshape(batch, channels)[:, :-1] > 0).sum(dim=1)


class PartCount(Metric):
    """Average number of discovered foreground parts per image (supplement Table 8).

    A foreground part (one of the first K of the K+1 channels) counts as
    discovered in an image when it is the argmax of at least one pixel.
    ``compute()`` returns a 0-d float64 tensor (NaN before any update).

    Args:
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    full_state_update = False
    higher_is_better = None
    is_differentiable = False

    part_total: Tensor
    image_total: Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("part_total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("image_total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, part_probs: Tensor) -> None:
        """Args: part_probs: ``(B, K+1, H, W)``, background last."""
        counts = count_foreground_parts(part_probs)
        self.part_total += counts.sum()
        self.image_total += counts.numel()

    def compute(self) -> Tensor:
        return self.part_total.double() / self.image_total.double()


class _PartEvaluation(PartCount):
    """Shared parts of the keypoint / mask evaluations: a contingency table, the part count
    (inherited from :class:`PartCount`), percent scores."""

    higher_is_better = True

    contingency: Tensor

    def __init__(self, num_true_labels: int, num_parts: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        _check_num_labels(num_true_labels=num_true_labels)
        self.num_true_labels = num_true_labels
        self.num_parts = _check_num_parts(num_parts)  # K
        self.num_channels = num_parts + 1  # K+1: the predicted labels, background included
        self.add_state(
            "contingency",
            default=torch.zeros(num_true_labels, self.num_channels, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def _check_channels(self, part_probs: Tensor) -> None:
        _check_part_channels(part_probs, self.num_parts)


class KeypointPartMetrics(_PartEvaluation):
    """Keypoint-mode NMI/ARI (docs/evaluation.md §2), in percent.

    ``compute()`` returns a dict of 0-d float64 tensors: ``nmi``, ``ari`` (argmax
    over all K+1 channels), ``fg_nmi``, ``fg_ari`` (argmax over the K foreground
    channels), all x100, and ``parts_per_image`` (see :class:`PartCount`). The
    state is one contingency table per prediction kind, so one metric object
    replaces four ``PartNMI``/``PartARI`` objects with duplicated tables.

    Args:
        num_keypoints: number of annotated keypoints per image (CUB 15, CelebA 5).
        num_parts: K, the number of foreground parts (the model's ``num_parts``); the
            part maps must have K+1 channels, background last.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    contingency: Tensor
    fg_contingency: Tensor

    def __init__(self, num_keypoints: int, num_parts: int, **kwargs: Any) -> None:
        super().__init__(num_keypoints, num_parts, **kwargs)
        self.num_keypoints = num_keypoints
        self.add_state(
            "fg_contingency",
            default=torch.zeros(num_keypoints, num_parts, dtype=torch.long),
            dist_reduce_fx="sum",
        )

    def update(
        self,
        part_probs: Tensor,
        keypoints: Tensor,
        visible: Tensor | None,
        image_size: int | tuple[int, int],
    ) -> None:
        """Accumulate one batch; arguments as :func:`keypoint_part_labels` (``visible=None``: all)."""
        self._check_channels(part_probs)
        if keypoints.shape[1] != self.num_keypoints:
            raise ValueError(f"expected {self.num_keypoints} keypoints, got {keypoints.shape[1]}")
        labels = keypoint_part_labels(part_probs, keypoints, visible, image_size)
        target = labels["target"]
        self.contingency += contingency_table(labels["pred"], target, self.num_keypoints, self.num_channels)
        self.fg_contingency += contingency_table(labels["fg_pred"], target, self.num_keypoints, self.num_parts)
        PartCount.update(self, part_probs)

    def compute(self) -> dict[str, Tensor]:
        return {
            "nmi": 100 * nmi_from_contingency(self.contingency),
            "ari": 100 * ari_from_contingency(self.contingency),
            "fg_nmi": 100 * nmi_from_contingency(self.fg_contingency),
            "fg_ari": 100 * ari_from_contingency(self.fg_contingency),
            "parts_per_image": PartCount.compute(self),
        }


class MaskPartMetrics(_PartEvaluation):
    """Mask-mode NMI/ARI (docs/evaluation.md §3; every pixel), in percent.

    ``compute()`` returns a dict of 0-d float64 tensors: ``nmi``, ``ari``, ``fg_iou`` and
    ``bg_iou`` (x100) and ``parts_per_image`` (see :class:`PartCount`). ``fg_iou`` is the
    foreground IoU: any non-background part against any non-background mask label,
    intersection and union summed over the whole split (``BinaryJaccardIndex``); ``bg_iou`` is
    its complement's. By default both are computed as PDiscoFormer does (``fg_iou_protocol``).

    Args:
        num_mask_labels: number of ground-truth mask labels (background included, last).
        num_parts: K, the number of foreground parts (the model's ``num_parts``); the
            part maps must have K+1 channels, background last.
        ignore_index: mask value to leave out of the scores (e.g. 255), if any.
        resolution: where NMI/ARI compare: ``"map"`` at the part-map size (mask resized with
            nearest, the authors' protocol); ``"mask"`` at the mask size.
        fg_iou_protocol: ``"upsample_to_mask"`` (default, PDiscoFormer's): the map passed to
            ``update`` as ``grid_probs`` (else ``part_probs``) is upsampled bilinearly with
            ``align_corners=True`` to the mask size, then argmax; ``"eval_map"``: the argmax of
            ``part_probs`` against the mask resized to it with nearest (the NMI/ARI pixels).
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    contingency: Tensor
    fg_bg_table: Tensor

    def __init__(
        self,
        num_mask_labels: int,
        num_parts: int,
        ignore_index: int | None = None,
        resolution: Literal["map", "mask"] = "map",
        fg_iou_protocol: FgIoUProtocol = "upsample_to_mask",
        **kwargs: Any,
    ) -> None:
        super().__init__(num_mask_labels, num_parts, **kwargs)
        if resolution not in ("map", "mask"):
            raise ValueError(f"`resolution` must be 'map' or 'mask', got {resolution!r}")
        if fg_iou_protocol not in ("upsample_to_mask", "eval_map"):
            raise ValueError(f"`fg_iou_protocol` must be 'upsample_to_mask' or 'eval_map', got {fg_iou_protocol!r}")
        self.num_mask_labels = num_mask_labels
        self.ignore_index = ignore_index
        self.resolution = resolution
        self.fg_iou_protocol = fg_iou_protocol
        # (truth, prediction) x (foreground, background): the pixel counts of the foreground IoU
        self.add_state("fg_bg_table", default=torch.zeros(2, 2, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, part_probs: Tensor, mask: Tensor, grid_probs: Tensor | None = None) -> None:
        """Accumulate one batch.

        Args:
            part_probs: ``(B, K+1, H, W)`` evaluation map, background last (NMI/ARI, part count).
            mask: ``(B, h, w)`` or ``(B, 1, h, w)`` integer ground-truth labels, background last.
            grid_probs: ``(B, K+1, h', w')`` the map ``fg_iou_protocol="upsample_to_mask"``
                upsamples (``mpae test``: the native patch-grid probabilities, as PDiscoFormer);
                ``None`` upsamples ``part_probs``.
        """
        self._check_channels(part_probs)
        labels = mask_part_labels(part_probs, mask, self.resolution)
        self.contingency += contingency_table(
            labels["pred"], labels["target"], self.num_mask_labels, self.num_channels, self.ignore_index
        )
        if self.fg_iou_protocol == "upsample_to_mask":
            source = part_probs if grid_probs is None else grid_probs
            self._check_channels(source)
            mask = mask[:, 0] if mask.ndim == 4 else mask
            pred_bg = (~upsampled_foreground(source, tuple(mask.shape[-2:]))).long()
            truth = mask.to(pred_bg.device).long()
            if self.ignore_index is not None:
                keep = truth != self.ignore_index
                truth, pred_bg = truth[keep], pred_bg[keep]
            self.fg_bg_table += contingency_table(pred_bg, (truth == self.num_mask_labels - 1).long(), 2, 2)
        PartCount.update(self, part_probs)

    def compute(self) -> dict[str, Tensor]:
        fg_table = self.fg_bg_table if self.fg_iou_protocol == "upsample_to_mask" else self.contingency
        return {
            "nmi": 100 * nmi_from_contingency(self.contingency),
            "ari": 100 * ari_from_contingency(self.contingency),
            **{k: 100 * v for k, v in foreground_iou_from_contingency(fg_table).items()},
            "parts_per_image": PartCount.compute(self),
        }


class ForegroundMaskMetrics(ContingencyMetric):
    """Foreground and background IoU against binary object masks (CUB's segmentations), in percent.

    PDiscoFormer's ``engine/eval_fg_bg.py`` (docs/evaluation.md §10): the part probabilities
    given to ``update`` (``mpae test`` passes the native patch-grid map) are upsampled bilinearly
    with ``align_corners=True`` to the mask size, argmax over the K+1 channels, and a pixel is
    predicted foreground when that is not the background (last) channel. The state is
    :class:`~mpae_lightning.metrics.ForegroundIoU`'s (truth x prediction) table, here 2x2
    (label 0 foreground, 1 background), summed across processes, so intersection and union are
    pooled over the whole split (``BinaryJaccardIndex``) and exact under DDP. ``compute()``
    returns 0-d float64 tensors ``fg_iou`` and ``bg_iou``, x100.

    Args:
        num_parts: K, the number of foreground parts (the model's ``num_parts``); the part maps
            must have K+1 channels, background last.
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    plot_lower_bound = 0.0
    plot_upper_bound = 100.0

    def __init__(self, num_parts: int, **kwargs: Any) -> None:
        super().__init__(num_true_labels=2, num_pred_labels=2, **kwargs)
        self.num_parts = _check_num_parts(num_parts)  # K

    def update(self, part_probs: Tensor, fg_mask: Tensor) -> None:  # type: ignore[override]
        """Accumulate one batch.

        Args:
            part_probs: ``(B, K+1, h, w)`` part probabilities, background last (``mpae test``:
                the patch-grid map, as PDiscoFormer).
            fg_mask: ``(B, H, W)`` or ``(B, 1, H, W)`` ground-truth foreground, bool or 0/1.
        """
        _check_part_channels(part_probs, self.num_parts)
        if fg_mask.ndim == 4 and fg_mask.shape[1] == 1:
            fg_mask = fg_mask[:, 0]
        if fg_mask.ndim != 3 or fg_mask.shape[0] != part_probs.shape[0]:
            raise ValueError(
                f"`fg_mask` must have shape (B, H, W) with B={part_probs.shape[0]}, got {tuple(fg_mask.shape)}"
            )
        if fg_mask.is_floating_point() or fg_mask.is_complex():
            raise TypeError(f"`fg_mask` must be bool or integer 0/1, got dtype {fg_mask.dtype}")
        if fg_mask.dtype != torch.bool:
            if fg_mask.numel() and not bool(((fg_mask == 0) | (fg_mask == 1)).all()):
                raise ValueError(
                    f"`fg_mask` must be a binary foreground mask (0/1), got values up to {int(fg_mask.max())}; "
                    "threshold the segmentation first"
                )
            fg_mask = fg_mask != 0
        pred_fg = upsampled_foreground(part_probs, tuple(fg_mask.shape[-2:]))
        # label 0 = foreground, 1 = background: the background is the last label, as ForegroundIoU's
        super().update((~pred_fg).long(), (~fg_mask.to(pred_fg.device)).long())

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        return {k: 100 * v for k, v in foreground_iou_from_contingency(self.contingency).items()}
