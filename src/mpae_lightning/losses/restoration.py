"""L_r: pixel L1 plus the VGG-19 structural difference penalty."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .precision import at_least_float32

DEFAULT_LAYER_WEIGHTS = (5 / 32, 5 / 16, 5 / 8, 5 / 4, 5.0)


class RestorationLoss(nn.Module):
    """``l1_weight * mean|I' - T| + sum_i w_i * mean|phi_i(I') - phi_i(T)|``.

    The penalty on VGG features is what makes restored structure follow the image
    (supplement Table 1: without it NMI drops from 55.10 to 19.65). Gradients flow
    through the restored image only.

    Args:
        feature_extractor: module returning a list of feature maps (``VGGFeatures``).
        l1_weight: weight of the pixel L1 term.
        layer_weights: one weight per feature map.
    """

    def __init__(
        self, feature_extractor: nn.Module, l1_weight: float = 0.1, layer_weights: Sequence[float] = DEFAULT_LAYER_WEIGHTS
    ) -> None:
        super().__init__()
        self.features = feature_extractor
        self.l1_weight = l1_weight
        self.register_buffer("layer_weights", torch.tensor(list(layer_weights), dtype=torch.float32), persistent=False)

    def forward(self, restored: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        l1 = (restored - target).abs().mean()
        with torch.no_grad():
            target_taps = self.features(target)
        restored_taps = self.features(restored)
        terms = torch.stack([at_least_float32((a - b).abs().mean()) for a, b in zip(restored_taps, target_taps)])
        perceptual = (terms * self.layer_weights.to(terms.dtype)).sum()
        return {
            "restoration_l1": l1,
            "perceptual_terms": terms,
            "perceptual": perceptual,
            "restoration": self.l1_weight * l1 + perceptual,
        }
