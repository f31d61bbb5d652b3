"""Keypoint regression error (KPR), the landmark score of PDiscoNet and PDiscoFormer.

The protocol (their ``eval_kpr``, inherited from "Interpretable and Accurate
Fine-grained Recognition via Region Grouping"):

1. Every foreground part gives a centroid: the probability-weighted mean of the
   map's pixel indices, scaled to input pixels. A part is *active* in an image when
   its probability exceeds 0.5 somewhere.
2. Centroids and keypoints are normalised per image: by the object's bounding box
   (CUB: ``(p - box_xy) / box_wh``) or by the inter-ocular distance (CelebA). PDiscoNet's
   CelebA images are resized isotropically (shorter side S), so before normalising, the
   coordinates of the S×S input can be mapped to that frame (``coordinate_scale``,
   :func:`isotropic_scale`).
3. For each keypoint separately, on the fitting (training) images where it is
   visible: centroids are standardised (mean and std over those images), inactive
   parts are set to 0 (the mean), the keypoint is standardised, and a linear map
   without intercept is fitted by least squares.
4. On the test images where the keypoint is visible, the error is the Euclidean
   distance between regressed and true keypoint; KPR is the mean over all visible
   (image, keypoint) pairs, x100.

The metric keeps only fixed-size sufficient statistics (sums of products), summed
across processes, so it is exact under DDP and its memory does not grow with the
data. Regressing the standardised keypoint is the same as regressing the centred
one (each output column is solved alone), so only the centroid scale is needed.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torchmetrics import Metric

from mpae_lightning.metrics.evaluation import _check_num_parts, _check_part_channels

__all__ = ["KeypointRegression", "isotropic_scale", "keypoint_frame", "keypoint_regression_error", "part_centroids"]

Normalization = Literal["bbox", "interocular", "image"]
_STAT_NAMES = ("valid", "x_sum", "x_sq", "count", "y_sum", "aa", "ab", "bb", "ay", "by", "a_sum", "b_sum")


def part_centroids(
    part_probs: Tensor, image_size: int | tuple[int, int], threshold: float = 0.5
) -> tuple[Tensor, Tensor]:
    """Centroids and presence of the K foreground parts, as PDiscoNet's ``landmark_coordinates``.

    Args:
        part_probs: ``(B, K+1, h, w)`` part probabilities, background last.
        image_size: input side S or ``(height, width)``; centroids are scaled from map to input pixels.
        threshold: a part is active when its probability exceeds this somewhere.

    Returns:
        ``(B, K, 2)`` float64 centroids ``(x, y)`` (pixel-index convention: the first pixel is 0)
        and ``(B, K)`` bool active flags.
    """
    if part_probs.ndim != 4 or part_probs.shape[1] < 2:
        raise ValueError(f"`part_probs` must have shape (B, K+1, h, w) with K >= 1, got {tuple(part_probs.shape)}")
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    probs = part_probs[:, :-1].to(torch.float64)
    h, w = probs.shape[-2:]
    mass = probs.sum(dim=(2, 3))
    rows = torch.arange(h, dtype=torch.float64, device=probs.device)
    cols = torch.arange(w, dtype=torch.float64, device=probs.device)
    y = (probs.sum(dim=3) * rows).sum(dim=2) / mass * (height / h)
    x = (probs.sum(dim=2) * cols).sum(dim=2) / mass * (width / w)
    return torch.stack([x, y], dim=-1), probs.amax(dim=(2, 3)) > threshold


def isotropic_scale(width: float, height: float) -> Tensor:
    """``(2,)`` float64 factors ``(W, H) / min(W, H)``: from pixels of the S×S squashed input to
    PDiscoNet's isotropic CelebA frame (the original image resized to shorter side S).

    A point ``(x, y)`` of the W×H original is ``(x·S/W, y·S/H)`` in the squashed input and
    ``(x·S/m, y·S/m)`` (``m = min(W, H)``) in the isotropic frame; the ratio is ``(W/m, H/m)``.
    """
    side = min(width, height)
    return torch.tensor([width / side, height / side], dtype=torch.float64)


def keypoint_frame(
    keypoints: Tensor,
    image_size: int | tuple[int, int],
    normalization: Normalization,
    boxes: Tensor | None = None,
    interocular: tuple[int, int] = (0, 1),
) -> tuple[Tensor, Tensor]:
    """Per-image origin and scale that normalise coordinates: ``(p - origin) / scale``.

    Args:
        keypoints: ``(B, P, 2)`` keypoints ``(x, y)`` in input pixels.
        image_size: input side S or ``(height, width)``.
        normalization: ``"bbox"`` (``boxes`` = ``(B, 4)`` x, y, width, height in input pixels;
            PDiscoNet's CUB), ``"interocular"`` (distance between keypoints ``interocular``;
            their CelebA) or ``"image"`` (the input size).
        boxes: bounding boxes for ``"bbox"``.
        interocular: indices of the two eye keypoints.

    Returns:
        ``(B, 2)`` origin and ``(B, 2)`` scale, float64.
    """
    batch = keypoints.shape[0]
    kp = keypoints.to(torch.float64)
    origin = torch.zeros(batch, 2, dtype=torch.float64, device=kp.device)
    if normalization == "bbox":
        if boxes is None or tuple(boxes.shape) != (batch, 4):
            got = None if boxes is None else tuple(boxes.shape)
            raise ValueError(f"normalization='bbox' needs `boxes` of shape ({batch}, 4) (x, y, w, h), got {got}")
        boxes = boxes.to(device=kp.device, dtype=torch.float64)
        return boxes[:, :2], boxes[:, 2:]
    if normalization == "interocular":
        i, j = interocular
        distance = (kp[:, i] - kp[:, j]).norm(dim=-1)
        return origin, distance[:, None].expand(batch, 2)
    if normalization == "image":
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        scale = torch.tensor([width, height], dtype=torch.float64, device=kp.device)
        return origin, scale.expand(batch, 2)
    raise ValueError(f"normalization must be 'bbox', 'interocular' or 'image', got {normalization!r}")


def _features(centroids: Tensor, active: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(B, K, 2) centroids -> (B, 2K) features (x1, y1, x2, y2, ...), finite mask and active mask."""
    x = centroids.reshape(centroids.shape[0], -1).to(torch.float64)
    finite = torch.isfinite(x)
    on = active.to(torch.bool).repeat_interleave(2, dim=1) & finite
    return torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0), finite, on


def _fit_statistics(centroids: Tensor, active: Tensor, keypoints: Tensor, visible: Tensor) -> dict[str, Tensor]:
    """Sums over images, per keypoint (only images where it is visible): the sufficient statistics."""
    x, finite, on = _features(centroids, active)
    v = visible.to(device=x.device, dtype=torch.float64)  # (B, L)
    y = torch.nan_to_num(keypoints.to(device=x.device, dtype=torch.float64))  # (B, L, 2)
    a = x * on  # active coordinates, 0 elsewhere
    b = on.to(torch.float64)
    f = finite.to(torch.float64)
    return {
        "valid": torch.einsum("il,ij->lj", v, f),
        "x_sum": torch.einsum("il,ij->lj", v, x * f),
        "x_sq": torch.einsum("il,ij->lj", v, x * x * f),
        "count": v.sum(dim=0),
        "y_sum": torch.einsum("il,ilc->lc", v, y),
        "aa": torch.einsum("il,ij,ik->ljk", v, a, a),
        "ab": torch.einsum("il,ij,ik->ljk", v, a, b),
        "bb": torch.einsum("il,ij,ik->ljk", v, b, b),
        "ay": torch.einsum("il,ij,ilc->ljc", v, a, y),
        "by": torch.einsum("il,ij,ilc->ljc", v, b, y),
        "a_sum": torch.einsum("il,ij->lj", v, a),
        "b_sum": torch.einsum("il,ij->lj", v, b),
    }


def _solve(stats: dict[str, Tensor]) -> dict[str, Tensor]:
    """Per keypoint: centroid mean and scale (StandardScaler), keypoint mean, least-squares map."""
    count = stats["count"]
    if (count == 0).any():
        missing = torch.nonzero(count == 0).flatten().tolist()
        raise ValueError(f"keypoints {missing} are visible in no fitting image; KPR cannot regress them")
    valid = stats["valid"].clamp(min=1)
    mu = stats["x_sum"] / valid
    var = (stats["x_sq"] / valid - mu * mu).clamp(min=0)
    scale = var.sqrt()
    scale = torch.where(scale < 10 * torch.finfo(torch.float64).eps, torch.ones_like(scale), scale)
    mu_y = stats["y_sum"] / count[:, None]
    dmu = torch.diag_embed(mu)
    # sum over images of (a - b*mu)(a - b*mu)^T, a = active centroid coordinates, b = active flags
    gram = stats["aa"] - stats["ab"] @ dmu - dmu @ stats["ab"].transpose(1, 2) + dmu @ stats["bb"] @ dmu
    gram = gram / (scale[:, :, None] * scale[:, None, :])
    cross = (
        stats["ay"]
        - stats["a_sum"][:, :, None] * mu_y[:, None, :]
        - mu[:, :, None] * stats["by"]
        + (mu * stats["b_sum"])[:, :, None] * mu_y[:, None, :]
    ) / scale[:, :, None]
    # pinv gives the minimum-norm least-squares solution, as LinearRegression's lstsq.
    weights = torch.linalg.pinv(gram, hermitian=True) @ cross
    return {"mu": mu, "scale": scale, "mu_y": mu_y, "weights": weights}


def _errors(
    solution: dict[str, Tensor], centroids: Tensor, active: Tensor, keypoints: Tensor, visible: Tensor
) -> tuple[Tensor, Tensor]:
    """Per keypoint: summed Euclidean error over the images where it is visible, and their number."""
    x, _, on = _features(centroids, active)
    z = torch.where(on[:, None, :], (x[:, None, :] - solution["mu"]) / solution["scale"], x.new_zeros(()))
    pred = solution["mu_y"] + torch.einsum("ilj,ljc->ilc", z, solution["weights"])  # (B, L, 2)
    y = torch.nan_to_num(keypoints.to(device=x.device, dtype=torch.float64))
    v = visible.to(device=x.device, dtype=torch.float64)
    distance = (pred - y).norm(dim=-1)
    return (distance * v).sum(dim=0), v.sum(dim=0)


def keypoint_regression_error(
    fit_centroids: Tensor,
    fit_active: Tensor,
    fit_keypoints: Tensor,
    fit_visible: Tensor,
    eval_centroids: Tensor,
    eval_active: Tensor,
    eval_keypoints: Tensor,
    eval_visible: Tensor,
) -> Tensor:
    """KPR in percent from normalised coordinates of all fitting and all evaluation images.

    Args:
        fit_centroids: ``(N, K, 2)`` part centroids of the fitting images (normalised).
        fit_active: ``(N, K)`` bool, parts present in each fitting image.
        fit_keypoints: ``(N, L, 2)`` keypoints of the fitting images (normalised like the centroids).
        fit_visible: ``(N, L)`` bool.
        eval_centroids, eval_active, eval_keypoints, eval_visible: the same for the evaluation images.

    Returns:
        0-d float64 tensor: mean distance over visible evaluation keypoints x100.
    """
    solution = _solve(_fit_statistics(fit_centroids, fit_active, fit_keypoints, fit_visible))
    error, count = _errors(solution, eval_centroids, eval_active, eval_keypoints, eval_visible)
    return 100 * error.sum() / count.sum()


class KeypointRegression(Metric):
    """KPR as a two-phase torchmetrics ``Metric``: fit on one split, score another.

    Example:
        >>> kpr = KeypointRegression(num_parts=model.num_parts, num_keypoints=15, normalization="image")
        >>> for batch in train_batches:   # evaluation transform, keypoints included
        ...     kpr.update(model(batch["image"]), batch["keypoints"], batch["visible"], 224, split="fit")
        >>> kpr.fit()                      # syncs the fitting statistics across processes
        >>> for batch in test_batches:
        ...     kpr.update(model(batch["image"]), batch["keypoints"], batch["visible"], 224)
        >>> kpr.compute()                  # percent; lower is better

    Every state is a fixed-size float64 sum (``dist_reduce_fx="sum"``): under DDP each
    process may see a different shard of both splits and the result is that of all data.
    ``reset()`` forgets both phases.

    Args:
        num_parts: K, the number of foreground parts (the model's ``num_parts``); the part maps
            must have K+1 channels, background last (only the K foreground parts give centroids).
        num_keypoints: L.
        normalization: ``"bbox"`` (pass ``boxes`` to ``update``; PDiscoNet's CUB protocol),
            ``"interocular"`` (CelebA) or ``"image"`` (the input size; when no box is available).
        interocular: indices of the two eye keypoints for ``"interocular"``.
        threshold: a part is active when its probability exceeds this somewhere (0.5 in the papers).
        kwargs: passed to :class:`torchmetrics.Metric`.
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(
        self,
        num_parts: int,
        num_keypoints: int,
        normalization: Normalization = "bbox",
        interocular: tuple[int, int] = (0, 1),
        threshold: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        _check_num_parts(num_parts)
        if isinstance(num_keypoints, bool) or not isinstance(num_keypoints, int) or num_keypoints < 1:
            raise ValueError(f"`num_keypoints` must be a positive integer, got {num_keypoints!r}")
        if normalization not in ("bbox", "interocular", "image"):
            raise ValueError(f"`normalization` must be 'bbox', 'interocular' or 'image', got {normalization!r}")
        self.num_parts, self.num_keypoints = num_parts, num_keypoints  # K, L
        self.num_channels = num_parts + 1  # K+1 part-map channels, background last
        self.normalization = normalization
        self.interocular = tuple(interocular)
        self.threshold = threshold
        d, L = 2 * num_parts, num_keypoints  # (x, y) of each foreground part
        shapes = {"valid": (L, d), "x_sum": (L, d), "x_sq": (L, d), "count": (L,), "y_sum": (L, 2),
                  "aa": (L, d, d), "ab": (L, d, d), "bb": (L, d, d), "ay": (L, d, 2), "by": (L, d, 2),
                  "a_sum": (L, d), "b_sum": (L, d)}
        for name in _STAT_NAMES:
            self.add_state(f"fit_{name}", default=torch.zeros(shapes[name], dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("error_sum", default=torch.zeros(L, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("error_count", default=torch.zeros(L, dtype=torch.float64), dist_reduce_fx="sum")
        self._solution: dict[str, Tensor] | None = None

    def _normalised(
        self,
        part_probs: Tensor,
        keypoints: Tensor,
        image_size: int | tuple[int, int],
        boxes: Tensor | None,
        coordinate_scale: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor]:
        _check_part_channels(part_probs, self.num_parts)
        batch = part_probs.shape[0]
        if keypoints.shape != (batch, self.num_keypoints, 2):
            raise ValueError(
                f"expected keypoints of shape ({batch}, {self.num_keypoints}, 2), got {tuple(keypoints.shape)}"
            )
        centroids, active = part_centroids(part_probs, image_size, self.threshold)
        kp = keypoints.to(device=centroids.device, dtype=torch.float64)
        if coordinate_scale is not None:
            if tuple(coordinate_scale.shape) != (batch, 2):
                got = tuple(coordinate_scale.shape)
                raise ValueError(f"`coordinate_scale` must have shape ({batch}, 2), got {got}")
            factor = coordinate_scale.to(device=centroids.device, dtype=torch.float64)
            centroids, kp = centroids * factor[:, None], kp * factor[:, None]
            if boxes is not None:
                boxes = boxes.to(device=centroids.device, dtype=torch.float64) * factor.repeat(1, 2)
        origin, scale = keypoint_frame(kp, image_size, self.normalization, boxes, self.interocular)
        norm = lambda p: (p - origin[:, None]) / scale[:, None]  # noqa: E731
        return norm(centroids), active, norm(kp)

    def update(
        self,
        part_probs: Tensor,
        keypoints: Tensor,
        visible: Tensor | None,
        image_size: int | tuple[int, int],
        boxes: Tensor | None = None,
        split: Literal["fit", "eval"] = "eval",
        coordinate_scale: Tensor | None = None,
    ) -> None:
        """Accumulate one batch of the fitting split (``split="fit"``) or, after :meth:`fit`, of
        the evaluated split.

        Args:
            part_probs: ``(B, K+1, h, w)`` part probabilities, background last.
            keypoints: ``(B, L, 2)`` keypoints ``(x, y)`` in input pixels.
            visible: ``(B, L)`` bool; ``None`` means all visible.
            image_size: input side S or ``(height, width)``.
            boxes: ``(B, 4)`` object boxes (x, y, w, h in input pixels) for ``normalization="bbox"``.
            split: ``"fit"`` or ``"eval"``.
            coordinate_scale: ``(B, 2)`` per-image factors ``(sx, sy)`` applied to centroids,
                keypoints and boxes before normalising: the frame the error is measured in
                (CelebA: :func:`isotropic_scale`, PDiscoNet's isotropic resize); ``None``: the input.
        """
        if split not in ("fit", "eval"):
            raise ValueError(f"`split` must be 'fit' or 'eval', got {split!r}")
        centroids, active, kp = self._normalised(part_probs, keypoints, image_size, boxes, coordinate_scale)
        vis = torch.ones(kp.shape[:2], dtype=torch.bool, device=kp.device) if visible is None else visible.to(kp.device)
        if split == "fit":
            if self._solution is not None:
                raise RuntimeError("KeypointRegression was already fitted; call reset() before fitting again")
            for name, value in _fit_statistics(centroids, active, kp, vis).items():
                state = getattr(self, f"fit_{name}")
                state += value.to(state.device)
            return
        if self._solution is None:
            raise RuntimeError("call KeypointRegression.fit() after the split='fit' updates, before scoring")
        error, count = _errors(self._solution, centroids, active, kp, vis)
        self.error_sum += error.to(self.error_sum.device)
        self.error_count += count.to(self.error_count.device)

    def fit(self) -> None:
        """Solve the regressions from the fitting statistics of all processes."""
        with self.sync_context(should_sync=self._to_sync, should_unsync=True):
            stats = {name: getattr(self, f"fit_{name}").clone() for name in _STAT_NAMES}
        self._solution = _solve(stats)

    def compute(self) -> Tensor:
        """Mean keypoint error over the visible evaluated keypoints, x100 (0-d float64)."""
        if self._solution is None:
            raise RuntimeError("KeypointRegression has not been fitted: call fit() first")
        return 100 * self.error_sum.sum() / self.error_count.sum()

    def reset(self) -> None:
        super().reset()
        self._solution = None
