"""Helpers shared by the parity tests: fixture discovery and the README's formula VGG-19."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

DEFAULT_REFERENCE_DIR = Path(__file__).parent / "fixtures" / "reference"


def reference_dir() -> Path:
    return Path(os.environ.get("MPAE_REFERENCE_DIR", str(DEFAULT_REFERENCE_DIR)))


def reference_files(pattern: str) -> list[Path]:
    """Every fixture matching ``pattern``; a missing folder fails loudly instead of skipping."""
    folder = reference_dir()
    if not folder.is_dir():
        raise FileNotFoundError(f"MPAE_REFERENCE_DIR={folder} is not a directory")
    files = sorted(folder.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no {pattern} fixtures in {folder}")
    return files


def formula_vgg19_features() -> nn.Sequential:
    """``vgg19(weights=None).features`` with the reference README's deterministic weights."""
    features = torchvision.models.vgg19(weights=None).features
    convs = [m for m in features if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for c, conv in enumerate(convs):
            n = conv.weight.numel()
            fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
            i = np.arange(n, dtype=np.float64)
            u = np.modf(np.abs(np.sin(12.9898 * i + 78.233 * c)) * 43758.5453)[0] - 0.5
            w = (u * np.sqrt(24.0 / fan_in)).astype(np.float32)
            conv.weight.copy_(torch.from_numpy(w).reshape(conv.weight.shape))
            conv.bias.zero_()
    return features


def mpae_from_reference(fixture: dict, dtype: torch.dtype = torch.float32, **overrides):
    """Build an :class:`MPAE` from a reference fixture's ``config`` and load its weights.

    Nothing is hard-coded: sizes come from ``config``, the token width from
    ``inputs.backbone_tokens`` and the patch size from the descriptor ViT's patch kernel.
    With ``dtype=torch.float64`` the model is cast before the float32 weights are copied
    in, which is exact.
    """
    from mpae_lightning.models import MPAE, load_official_state_dict

    cfg = fixture["config"]
    desc, rest = cfg["descriptor"], cfg["restorer"]
    kwargs = dict(
        num_parts=int(cfg["num_parts"]) - 1,
        image_size=int(cfg["image_size"]),
        feature_dim=int(cfg["feature_dim"]),
        backbone=None,
        backbone_dim=int(fixture["inputs"]["backbone_tokens"].shape[-1]),
        patch_size=int(fixture["state_dict"]["Transformer.conv1.weight"].shape[-1]),
        descriptor_width=int(desc["width"]),
        descriptor_depth=int(desc["depth"]),
        descriptor_heads=int(desc["heads"]),
        encoder_width=int(rest["encoder_width"]),
        encoder_depth=int(rest["encoder_depth"]),
        encoder_heads=int(rest["encoder_heads"]),
        decoder_depth=int(rest["decoder_depth"]),
        decoder_heads=int(rest["decoder_heads"]),
        restore_patch=int(rest["restore_patch"]),
        mask_ratio=float(cfg["mask_ratio"]),
        eval_scale_factor=float(cfg["eval_scale_factor"]),
    )
    kwargs.update(overrides)
    model = MPAE(**kwargs).to(dtype)
    load_official_state_dict(model, fixture["state_dict"])
    return model


def loss_from_reference(fixture: dict, dtype: torch.dtype = torch.float32, **overrides):
    """The :class:`MPAELoss` of a reference fixture's ``config``, with the README's formula VGG-19."""
    from mpae_lightning.losses import MPAELoss

    cfg = fixture["config"]
    kwargs = dict(
        mini_group=int(cfg["mini_group"]),
        arcface_s=float(cfg["arcface"]["s"]),
        arcface_m=float(cfg["arcface"]["m"]),
        presence_weight=float(cfg["loss_weights"]["presence"]),
        distribution_weight=float(cfg["loss_weights"]["distribution"]),
        semantic_weight=float(cfg["loss_weights"]["semantic"]),
    )
    kwargs.update(overrides)
    if "vgg_features" not in kwargs and "vgg_weights" not in kwargs:
        kwargs["vgg_features"] = formula_vgg19_features()  # built only when needed: ~3 s
    return MPAELoss(**kwargs).to(dtype)


def reference_inputs(fixture: dict, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The fixture's inputs cast to ``dtype`` (float32 -> float64 is exact)."""
    return {k: v.to(dtype) for k, v in fixture["inputs"].items()}


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).norm() / ref.norm().clamp_min(1e-30))
