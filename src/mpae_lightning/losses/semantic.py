"""L_s: ArcFace-style alignment of each part's pooled features with its own descriptor."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models.precision import at_least_float32


class ArcFaceSemanticLoss(nn.Module):
    """Additive angular margin (Deng et al., ArcFace, CVPR 2019) between region features and descriptors.

    For each image, r_j = mean_xy P_j F is compared with that image's K foreground
    descriptors; the margin ``m`` is added to the angle of the matching pair and
    logits are scaled by ``s``. Parts that are absent (detached sum of P_j at most
    ``presence_threshold``) contribute 0 but still count in the mean over B*K.

    Args:
        s: logit scale.
        m: angular margin in radians.
        presence_threshold: minimum total mass of a part for its term to count.
    """

    def __init__(self, s: float = 20.0, m: float = 0.5, presence_threshold: float = 1e-3) -> None:
        super().__init__()
        self.s, self.m = s, m
        self.cos_m, self.sin_m = math.cos(m), math.sin(m)
        self.threshold_cos = math.cos(math.pi - m)
        self.fallback = math.sin(math.pi - m) * m
        self.presence_threshold = presence_threshold

    def forward(self, similarity: torch.Tensor, features: torch.Tensor, descriptors: torch.Tensor) -> torch.Tensor:
        b, parts, h, w = similarity.shape
        k = parts - 1
        fg = similarity[:, :k]
        region = torch.einsum("bkhw,bchw->bkc", fg, features) / (h * w)
        cos = torch.einsum("bjc,bkc->bjk", F.normalize(region, dim=-1), F.normalize(descriptors[:, :k], dim=-1))
        sin = torch.sqrt((1.0 - cos * cos).clamp(0, 1))
        phi = cos * self.cos_m - sin * self.sin_m
        phi = torch.where(cos > self.threshold_cos, phi, cos - self.fallback)
        eye = torch.eye(k, dtype=torch.bool, device=cos.device)
        logits = self.s * torch.where(eye, phi, cos)
        target = torch.arange(k, device=cos.device).expand(b, k)
        per_part = F.cross_entropy(at_least_float32(logits.reshape(b * k, k)), target.reshape(-1), reduction="none").view(b, k)
        present = fg.detach().sum(dim=(2, 3)) > self.presence_threshold
        return (per_part * present).mean()
