"""The "direct clustering" baseline: k-means on the frozen backbone's patch features."""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.cluster import KMeans
from torch import nn


@torch.no_grad()
def _patch_features(backbone: nn.Module, batches: Iterable[dict], max_images: int | None = None) -> torch.Tensor:
    feats, seen = [], 0
    for batch in batches:
        tokens = backbone(batch["image"])
        feats.append(F.normalize(tokens.float(), dim=-1))
        seen += tokens.shape[0]
        if max_images is not None and seen >= max_images:
            break
    return torch.cat(feats)[:max_images]


class KMeansParts:
    """K+1 k-means clusters of L2-normalised backbone patch tokens, one of them background.

    The background cluster is the one most frequent on the border patches of the
    fitting images; it is moved to the last channel so the result can be scored like
    MPAE's maps (``fg_*`` metrics then use the K nearest non-background centroids).

    Args:
        backbone: the frozen backbone (returns (B, h*w, D) tokens).
        num_clusters: K+1.
        grid_size: (h, w) patch grid.
        seed: k-means seed.
    """

    def __init__(self, backbone: nn.Module, num_clusters: int, grid_size: tuple[int, int], seed: int = 0) -> None:
        self.backbone = backbone
        self.num_clusters = num_clusters
        self.grid_size = grid_size
        self.seed = seed
        self.centroids: torch.Tensor | None = None

    def fit(self, batches: Iterable[dict], max_images: int | None = None) -> "KMeansParts":
        feats = _patch_features(self.backbone, batches, max_images)  # (N, L, D)
        kmeans = KMeans(self.num_clusters, n_init=4, random_state=self.seed).fit(feats.reshape(-1, feats.shape[-1]).numpy())
        labels = kmeans.labels_.reshape(feats.shape[0], *self.grid_size)
        border = np.concatenate([labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]], axis=1)
        background = int(np.bincount(border.ravel(), minlength=self.num_clusters).argmax())
        order = [c for c in range(self.num_clusters) if c != background] + [background]
        self.centroids = torch.from_numpy(kmeans.cluster_centers_[order]).float()
        return self

    @torch.no_grad()
    def predict_parts(self, images: torch.Tensor, map_size: int) -> torch.Tensor:
        """(B, K+1, map_size, map_size) one-hot-like scores: negative squared distance to each centroid."""
        if self.centroids is None:
            raise RuntimeError("call fit() first")
        tokens = F.normalize(self.backbone(images).float(), dim=-1)
        scores = -torch.cdist(tokens, self.centroids[None].expand(tokens.shape[0], -1, -1)) ** 2
        scores = scores.transpose(1, 2).reshape(images.shape[0], self.num_clusters, *self.grid_size)
        return F.interpolate(scores, size=(map_size, map_size), mode="nearest")
