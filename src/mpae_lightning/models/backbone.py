"""The frozen self-supervised ViT whose patch tokens MPAE groups into parts."""
from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from .frozen import autocast_weight_copies
from .weights import WeightsUnavailableError, is_local_file, is_random, unreadable_reason

DEFAULT_BACKBONE = "vit_base_patch14_reg4_dinov2.lvd142m"


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick TCP connect to the Hugging Face endpoint (timm's weight host)."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _offline_hub_if_unreachable() -> Iterator[None]:
    """Without network, use only the local cache: no minute of retries, no wall of warnings."""
    if _hub_reachable():
        yield
        return
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - timm depends on huggingface_hub
        yield
        return
    previous = constants.HF_HUB_OFFLINE
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    constants.HF_HUB_OFFLINE = True
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous
        hub_logger.setLevel(level)


def _create_timm_vit(name: str, weights: str | None, setting: str, **kwargs: Any) -> nn.Module:
    kwargs = dict(num_classes=0, dynamic_img_size=True, **kwargs)
    if is_random(weights):
        return timm.create_model(name, pretrained=False, **kwargs)
    if is_local_file(weights):
        # timm's pretrained path converts Meta's DINOv2 keys and resizes position embeddings.
        if not Path(weights).expanduser().is_file():
            raise WeightsUnavailableError(f"{setting}: weight file {Path(weights).expanduser()} does not exist.")
        weights = str(Path(weights).expanduser())
        try:
            return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
        except Exception as err:  # noqa: BLE001
            raise WeightsUnavailableError(
                f"{setting}: could not load {weights} into timm model '{name}' ({unreadable_reason(err)})"
            ) from None
    try:
        with _offline_hub_if_unreachable():
            return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - network errors come in many types
        raise WeightsUnavailableError(
            f"Could not download pretrained weights for backbone '{name}' ({type(err).__name__}: {err}). "
            f"Without network access, download the weights on another machine (timm or Meta's DINOv2 .pth) "
            f"and pass the local file with `{setting}=/path/to/weights.pth` "
            f"(CLI: --model.init_args.{setting} /path/to/weights.pth)."
        ) from None


class _ForwardFeatures(nn.Module):
    """A timm ViT's ``forward_features`` as a module's forward."""

    def __init__(self, vit: nn.Module) -> None:
        super().__init__()
        self.vit = vit

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.vit.forward_features(images)


class FrozenBackbone(nn.Module):
    """A timm ViT used as a frozen feature extractor: returns final-norm patch tokens.

    Class and register tokens are dropped, leaving (B, h*w, D) in row-major grid
    order. Position embeddings are resampled to the input grid on the fly
    (bicubic, antialiased), which matches Meta's DINOv2 code for any image size.
    The module stays in eval mode and outside autograd even while its parent trains.

    Args:
        name: timm model name, e.g. ``vit_base_patch14_reg4_dinov2.lvd142m`` or ``vit_small_patch16_224.dino``.
        weights: ``"timm"`` to download through timm, a local file path (timm or Meta's DINOv2
            ``.pth`` format), or ``"random"`` for random initialisation.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. a tiny ``embed_dim``).
        setting: name of the user-facing argument, quoted in error messages.
    """

    def __init__(
        self,
        name: str = DEFAULT_BACKBONE,
        weights: str | None = "timm",
        model_kwargs: dict[str, Any] | None = None,
        setting: str = "backbone_weights",
    ) -> None:
        super().__init__()
        self.vit = _create_timm_vit(name, weights, setting, **(model_kwargs or {}))
        self.name = name
        self.patch_size = int(self.vit.patch_embed.patch_size[0])
        self.embed_dim = int(self.vit.embed_dim)
        self.num_prefix_tokens = int(self.vit.num_prefix_tokens)
        self.requires_grad_(False)
        self.eval()
        # forward_features as a module, for functional_call with half-precision weight copies;
        # set past nn.Module's bookkeeping so that the ViT is not registered (nor saved) twice.
        object.__setattr__(self, "_features", _ForwardFeatures(self.vit))

    def train(self, mode: bool = True) -> "FrozenBackbone":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, h*w, D) final-norm patch tokens.

        Under bf16/fp16 autocast the matmul weights come from half-precision copies made once
        (:func:`autocast_weight_copies`): the same result without re-casting them every call.
        """
        copies = autocast_weight_copies(self.vit, images.device.type, prefix="vit.")
        if copies is None:
            tokens = self.vit.forward_features(images)
        else:
            tokens = torch.func.functional_call(self._features, copies, (images,), strict=False)
        return tokens[:, self.num_prefix_tokens :]

    def load_meta_dinov2_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a state dict in Meta's DINOv2 key names (``register_tokens``, ``ls1.gamma`` …)."""
        from timm.models.vision_transformer import checkpoint_filter_fn

        converted = checkpoint_filter_fn(dict(state_dict), self.vit)
        missing, unexpected = self.vit.load_state_dict(converted, strict=False)
        missing = [k for k in missing if not k.startswith("head")]
        if missing or unexpected:
            raise ValueError(f"DINOv2 state dict does not fit backbone '{self.name}': missing {missing}, unexpected {unexpected}")


def dinov2_model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
    """timm ``VisionTransformer`` arguments for a DINOv2-with-registers config (reference fixtures)."""
    return dict(
        img_size=int(config["pretrain_img_size"]),
        patch_size=int(config["patch_size"]),
        embed_dim=int(config["embed_dim"]),
        depth=int(config["depth"]),
        num_heads=int(config["num_heads"]),
        mlp_ratio=float(config["mlp_ratio"]),
        init_values=float(config["layer_scale_init"]),
        reg_tokens=int(config["num_register_tokens"]),
        no_embed_class=True,
    )
