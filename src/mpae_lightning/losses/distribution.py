"""L_d = TV(P) + H(P): smooth, confident similarity maps."""
from __future__ import annotations

import torch
from torch import nn


class TotalVariationLoss(nn.Module):
    """Anisotropic total variation of the part map, summed and divided by B*h*w."""

    def forward(self, similarity: torch.Tensor) -> torch.Tensor:
        b, _, h, w = similarity.shape
        dy = (similarity[:, :, 1:, :] - similarity[:, :, :-1, :]).abs().sum()
        dx = (similarity[:, :, :, 1:] - similarity[:, :, :, :-1]).abs().sum()
        return (dy + dx) / (b * h * w)


class EntropyLoss(nn.Module):
    """Per-pixel entropy over parts (natural log), averaged over pixels and images.

    Args:
        eps: floor inside the log so that exact zeros give 0·log(eps) = 0, not NaN.
    """

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, similarity: torch.Tensor) -> torch.Tensor:
        return -(similarity * similarity.clamp_min(self.eps).log()).sum(dim=1).mean()


class DistributionLoss(nn.Module):
    """L_d = TV(P) + H(P), reported with its two parts (``total_variation``, ``entropy``)."""

    def __init__(self) -> None:
        super().__init__()
        self.total_variation = TotalVariationLoss()
        self.entropy = EntropyLoss()

    def forward(self, similarity: torch.Tensor) -> dict[str, torch.Tensor]:
        total_variation = self.total_variation(similarity)
        entropy = self.entropy(similarity)
        return {"distribution": total_variation + entropy, "total_variation": total_variation, "entropy": entropy}
