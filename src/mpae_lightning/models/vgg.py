"""Frozen VGG-19 feature taps for MPAE's structural difference penalty."""
from __future__ import annotations

import torch
import torchvision
from torch import nn

from .weights import WeightsUnavailableError, is_local_file, is_random, load_state_dict_file

#: Slices of ``vgg19().features`` ending after relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
VGG19_TAPS = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))


def _vgg19_features(weights: str | None, setting: str) -> nn.Sequential:
    if is_random(weights):
        return torchvision.models.vgg19(weights=None).features
    if is_local_file(weights):
        state = load_state_dict_file(weights, setting)
        features = torchvision.models.vgg19(weights=None).features
        if any(k.startswith("features.") for k in state):
            state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        try:
            features.load_state_dict(state)
        except RuntimeError as err:
            raise WeightsUnavailableError(f"{setting}: {weights} is not a VGG-19 state dict: {err}") from None
        return features
    try:
        return torchvision.models.vgg19(weights=torchvision.models.VGG19_Weights.IMAGENET1K_V1).features
    except Exception as err:  # noqa: BLE001 - network errors come in many types
        raise WeightsUnavailableError(
            f"Could not download the ImageNet VGG-19 weights for the structural penalty ({type(err).__name__}: {err}). "
            f"Without network access, download torchvision's vgg19-dcbb9e9d.pth on another machine and pass it with "
            f"`{setting}=/path/to/vgg19.pth` (CLI: --model.init_args.{setting} /path/to/vgg19.pth)."
        ) from None


class VGGFeatures(nn.Module):
    """Frozen VGG-19 returning the relu{1..5}_1 activations, always in eval mode.

    Args:
        weights: ``"torchvision"`` (ImageNet download), a local ``.pth`` (full ``vgg19`` or
            its ``features``), or ``"random"``.
        features: an already built ``vgg19().features`` to use instead (e.g. formula-initialised).
        setting: name of the user-facing argument, quoted in error messages.
    """

    def __init__(
        self, weights: str | None = "torchvision", features: nn.Sequential | None = None, setting: str = "vgg_weights"
    ) -> None:
        super().__init__()
        features = features if features is not None else _vgg19_features(weights, setting)
        self.slices = nn.ModuleList(features[a:b] for a, b in VGG19_TAPS)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGGFeatures":
        return super().train(False)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for block in self.slices:
            x = block(x)
            taps.append(x)
        return taps
