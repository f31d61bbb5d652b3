"""MPAE: Masked Part AutoEncoder (Xia et al., ICCV 2025) as a plain ``nn.Module``."""
from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .precision import at_least_float32, low_precision_dtype
from .backbone import DEFAULT_BACKBONE, FrozenBackbone
from .descriptor_vit import DescriptorViT
from .restorer import MaskedRestorer, random_masking_ids


@dataclass
class PartEncoding:
    """What the part branch computes: descriptors D, feature map F and the part logits <D, F>."""

    descriptors: torch.Tensor  # (B, K+1, C)
    local_features: torch.Tensor  # (B, C, h, w)
    logits: torch.Tensor  # (B, K+1, h, w)

    @property
    def similarity(self) -> torch.Tensor:
        return self.logits.softmax(dim=1)


@dataclass
class MPAEOutput:
    """One forward of the masked part autoencoder: every tensor the method (and its loss) uses.

    Shapes with K foreground parts, background last, a (h, w) patch grid and restored side r.
    """

    logits: torch.Tensor  # (B, K+1, h, w) part logits <D, F>
    similarity: torch.Tensor  # (B, K+1, h, w) part map P = softmax over parts
    descriptors: torch.Tensor  # (B, K+1, C) part descriptors D
    local_features: torch.Tensor  # (B, C, h, w) projected feature map F
    filled_features: torch.Tensor  # (B, C, h, w) R = sum_k P_k D_k
    restored: torch.Tensor  # (B, 3, r, r) restored image I'
    target: torch.Tensor  # (B, 3, r, r) what I' should restore
    masked: torch.Tensor  # (B, h*w) True where a patch was hidden from the encoder


class MPAE(nn.Module):
    """Masked Part AutoEncoder: maps images to K parts (+ background, the last channel).

    A frozen ViT gives patch tokens, projected to a feature map F. A trainable ViT over
    pixels gives K+1 part descriptors D; P = softmax_k <D_k, F> is the part map and
    R = sum_k P_k D_k fills every masked patch of a masked autoencoder, which must
    restore the image. ``docs/method.md`` describes every step. The training objective
    (and the frozen VGG-19 it needs) is :class:`~mpae_lightning.losses.MPAELoss`, not part
    of the model: inference and export need only this module.

    Args:
        num_parts: K, the number of foreground parts (background is added).
        image_size: input side S (square images); must be divisible by the patch size. The
            ``mpae`` CLI sets it from ``data.init_args.image_size``.
        feature_dim: C, width of F, D and the decoder.
        backbone: timm model name of the frozen ViT (default DINOv2 ViT-B/14 with registers), or ``None`` to run without one
            (then ``backbone_tokens`` must be passed to every forward, and
            ``backbone_dim``/``patch_size`` given).
        backbone_weights: ``"timm"`` (download), a local file (timm or Meta DINOv2 format) or ``"random"``.
        backbone_kwargs: extra ``timm.create_model`` arguments (e.g. a small random ViT for demos).
        backbone_dim: token width when ``backbone`` is ``None``.
        patch_size: patch size when ``backbone`` is ``None`` (otherwise taken from the backbone).
        descriptor_width: width W of the descriptor ViT.
        descriptor_depth: blocks of the descriptor ViT.
        descriptor_heads: heads of the descriptor ViT.
        encoder_width: width E of the masked patch encoder.
        encoder_depth: blocks of the masked patch encoder (paper: 2).
        encoder_heads: heads of the masked patch encoder.
        decoder_depth: blocks of the decoder (paper: 2).
        decoder_heads: heads of the decoder (``None``: C // 64).
        restore_patch: side of each restored patch; the restored image is (h*p_r)x(w*p_r).
        mask_ratio: fraction of patches hidden from the encoder.
        eval_map_size: side of the inference map when ``eval_scale_factor`` is ``None`` (128 in the paper).
        eval_scale_factor: upsampling factor from the patch grid to the inference map.
        norm_eps: LayerNorm epsilon of the masked encoder and decoder.
        backbone_module: an already built backbone (anything with ``patch_size``, ``embed_dim``,
            and ``forward(images) -> (B, h*w, D)``) to use instead of ``backbone``.
    """

    def __init__(
        self,
        num_parts: int = 16,
        image_size: int = 224,
        feature_dim: int = 256,
        backbone: str | None = DEFAULT_BACKBONE,
        backbone_weights: str | None = "timm",
        backbone_kwargs: dict[str, Any] | None = None,
        backbone_dim: int | None = None,
        patch_size: int | None = None,
        descriptor_width: int = 256,
        descriptor_depth: int = 6,
        descriptor_heads: int = 8,
        encoder_width: int = 256,
        encoder_depth: int = 2,
        encoder_heads: int = 4,
        decoder_depth: int = 2,
        decoder_heads: int | None = None,
        restore_patch: int = 8,
        mask_ratio: float = 0.9,
        eval_map_size: int = 128,
        eval_scale_factor: float | None = None,
        norm_eps: float = 1e-5,
        backbone_module: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if num_parts < 1:
            raise ValueError(f"num_parts (K foreground parts) must be >= 1, got {num_parts}")
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        positive = {"image_size": image_size, "feature_dim": feature_dim, "descriptor_width": descriptor_width,
                    "descriptor_heads": descriptor_heads, "encoder_width": encoder_width, "encoder_heads": encoder_heads,
                    "decoder_heads": decoder_heads, "restore_patch": restore_patch, "eval_map_size": eval_map_size}
        for name, value in positive.items():
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in {"descriptor_depth": descriptor_depth, "encoder_depth": encoder_depth,
                            "decoder_depth": decoder_depth}.items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if backbone_module is not None:
            self.backbone = backbone_module
        elif backbone is not None:
            self.backbone = FrozenBackbone(backbone, backbone_weights, backbone_kwargs)
        else:
            self.backbone = None
            if backbone_dim is None or patch_size is None:
                raise ValueError("Without a backbone, give backbone_dim and patch_size (and pass backbone_tokens).")
        if self.backbone is not None:
            patch_size = int(self.backbone.patch_size)
            backbone_dim = int(self.backbone.embed_dim)
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} is not divisible by the backbone's patch size {patch_size}; "
                f"use a multiple of {patch_size} (e.g. {image_size // patch_size * patch_size})"
            )
        self.num_parts = num_parts
        self.image_size = image_size
        self.patch_size = patch_size
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.mask_ratio = mask_ratio
        self.eval_scale_factor = float(eval_scale_factor) if eval_scale_factor else eval_map_size / self.grid_size[0]

        self.feature_proj = nn.Conv2d(backbone_dim, feature_dim, kernel_size=1, bias=False)
        self.descriptor_vit = DescriptorViT(
            num_parts + 1, feature_dim, self.grid_size, patch_size, descriptor_width, descriptor_depth, descriptor_heads
        )
        self.restorer = MaskedRestorer(
            self.grid_size,
            patch_size,
            feature_dim,
            encoder_width,
            encoder_depth,
            encoder_heads,
            decoder_depth,
            decoder_heads,
            restore_patch,
            norm_eps,
        )
        self._compiled_fill: Callable[..., Any] | None = None  # set by compile_regions()

    @property
    def restored_size(self) -> tuple[int, int]:
        p = self.restorer.restore_patch
        return self.grid_size[0] * p, self.grid_size[1] * p

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Everything but the frozen backbone."""
        return [p for p in self.parameters() if p.requires_grad]

    def _check_images(self, images: torch.Tensor) -> None:
        """Refuse input the network would fail on deep inside (or silently mis-read); warn once on NaN/inf."""
        if not isinstance(images, torch.Tensor):
            raise TypeError(
                f"MPAE expects a torch.Tensor (B, 3, S, S), got {type(images).__name__}; for an (B, H, W, 3) uint8 "
                "array use mpae_lightning.data.transforms.normalize(torch.from_numpy(a).permute(0, 3, 1, 2).float() / 255)"
            )
        dtype = self.feature_proj.weight.dtype
        if not images.is_floating_point():
            raise TypeError(
                f"MPAE expects ImageNet-normalised floating images, got dtype {images.dtype}; for 0-255 images use "
                f"mpae_lightning.data.transforms.normalize(images.to({dtype}) / 255)"
            )
        if images.dtype != dtype and not torch.is_autocast_enabled(images.device.type):
            raise TypeError(
                f"images are {images.dtype} but this MPAE's weights are {dtype}; pass images.to({dtype}) "
                f"(or model.to({images.dtype}), or run under torch.autocast for mixed precision)"
            )
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got {tuple(images.shape)}")
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ValueError(
                f"this MPAE was built for {self.image_size}x{self.image_size} images, got {tuple(images.shape[-2:])}"
            )
        # Training has the NonFiniteGuard callback; elsewhere one check per call (a device sync) is cheap.
        if not self.training and not getattr(self, "_warned_non_finite", False) and not bool(torch.isfinite(images).all()):
            self._warned_non_finite = True
            warnings.warn(
                f"MPAE input has {int((~torch.isfinite(images)).sum())} NaN/inf values: the part maps of those "
                "images will be NaN (warned once per model)",
                stacklevel=3,
            )

    def encode_parts(
        self,
        images: torch.Tensor,
        backbone_tokens: torch.Tensor | None = None,
        float32_head: bool = False,
        dtype: torch.dtype | None = None,
    ) -> PartEncoding:
        """Descriptors D, feature map F and part logits at the patch grid.

        F and the logits are always computed in (at least) float32. With ``float32_head`` the
        descriptor ViT is too, whatever the autocast state (evaluation); otherwise it follows
        autocast (training). The frozen backbone always follows autocast.

        ``dtype`` (``torch.bfloat16`` or ``torch.float16``) is the opt-in fast inference path:
        the backbone and descriptor ViT run under autocast to ``dtype`` and F and the logits are
        computed in ``dtype`` too (``float32_head`` is then ignored). ``None`` or
        ``torch.float32`` changes nothing.
        """
        low = low_precision_dtype(dtype)
        if low is not None:
            with torch.autocast(device_type=images.device.type, dtype=low):
                return self._encode(images, backbone_tokens, False, low)
        return self._encode(images, backbone_tokens, float32_head, None)

    def _encode(
        self, images: torch.Tensor, backbone_tokens: torch.Tensor | None, float32_head: bool, low: torch.dtype | None
    ) -> PartEncoding:
        self._check_images(images)
        if backbone_tokens is None:
            if self.backbone is None:
                raise ValueError("this MPAE has no backbone: pass backbone_tokens")
            with torch.no_grad():
                backbone_tokens = self.backbone(images)
        h, w = self.grid_size
        if backbone_tokens.shape[1] != h * w:
            raise ValueError(f"expected {h * w} backbone tokens for a {h}x{w} grid, got {backbone_tokens.shape[1]}")
        if float32_head:
            with torch.autocast(device_type=images.device.type, enabled=False):
                descriptors = self.descriptor_vit(at_least_float32(images))
        else:
            descriptors = self.descriptor_vit(images)
        # F and the logits <D, F> in (at least) float32 whatever the autocast state: they decide
        # every label of the part map, and cost little next to the two ViTs. Only the opt-in
        # low-precision inference (``low``) computes them in that dtype.
        with torch.autocast(device_type=images.device.type, enabled=False):
            weight = at_least_float32(self.feature_proj.weight) if low is None else self.feature_proj.weight.to(low)
            dtype = weight.dtype
            # The 1x1 convolution as one matrix product on the (B, h*w, D) tokens: no transposed copy
            # of the tokens and no convolution kernel. F is returned as a (B, C, h, w) view of the
            # (B, h*w, C) product, i.e. with channels-last strides.
            tokens = backbone_tokens.to(dtype) @ weight.flatten(1).t()
            local_features = tokens.transpose(1, 2).unflatten(2, (h, w))
            logits = torch.einsum("bkc,bchw->bkhw", descriptors.to(dtype), local_features)
        return PartEncoding(descriptors, local_features, logits)

    def forward(
        self,
        images: torch.Tensor,
        target: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        backbone_tokens: torch.Tensor | None = None,
    ) -> MPAEOutput:
        """The masked part autoencoder's forward, the same in train and eval mode.

        Args:
            images: (B, 3, S, S) ImageNet-normalised images.
            target: restoration target; default: bilinear resize of ``images`` to the restored size.
            noise: (B, h*w) masking noise (ascending order = kept first); default: uniform random.
            backbone_tokens: precomputed (B, h*w, D) backbone tokens instead of running the backbone.
        """
        enc = self.encode_parts(images, backbone_tokens)
        fill = self._compiled_fill or self.fill_parts
        similarity, filled = fill(enc.logits, enc.descriptors)
        if noise is None:
            noise = torch.rand(images.shape[0], self.num_patches, device=images.device)
        ids_keep, masked = random_masking_ids(noise, self.mask_ratio)
        restored = self.restorer(images, filled, ids_keep)
        if target is None:
            target = F.interpolate(images, size=restored.shape[-2:], mode="bilinear", align_corners=False)
        return MPAEOutput(enc.logits, similarity, enc.descriptors, enc.local_features, filled, restored, target, masked)

    @staticmethod
    def fill_parts(logits: torch.Tensor, descriptors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """P = softmax over parts of the logits and R = sum_k P_k D_k (the filled feature map)."""
        similarity = logits.softmax(dim=1)
        return similarity, torch.einsum("bkhw,bkc->bchw", similarity, descriptors)

    def compile_regions(self, **options: Any) -> None:
        """``torch.compile`` the regions of the forward that are many small kernels, in place.

        Each transformer block (frozen backbone, descriptor ViT, masked encoder and decoder)
        is compiled on its own, and so is the part-map region (softmax and R). Blocks of one
        kind share one compiled graph, so compilation takes a minute or less, where compiling
        the whole step takes minutes and breaks the graph at the masking. Parameters keep their
        names (state dicts and checkpoints are unchanged); a second call does nothing. Off by
        default: it pays on GPUs, where the step is launch- and memory-bound, and costs
        compilation time everywhere. :meth:`MPAELoss.compile_regions` does the same for the loss.

        Args:
            options: ``torch.compile`` keyword arguments (default ``dynamic=False``: one graph per
                input shape, as batch and image size are fixed during training).
        """
        if self._compiled_fill is not None:
            return
        options = {"dynamic": False, **options}
        blocks = [*self.descriptor_vit.blocks, *self.restorer.encoder_blocks, *self.restorer.decoder_blocks]
        vit = getattr(self.backbone, "vit", None)
        blocks += list(getattr(vit, "blocks", []))
        for block in blocks:
            block.compile(**options)
        self._compiled_fill = torch.compile(self.fill_parts, **options)

    def predict_parts(
        self,
        images: torch.Tensor,
        backbone_tokens: torch.Tensor | None = None,
        scale_factor: float | None = None,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """(B, K+1, h*s, w*s) part probabilities at evaluation resolution (background last).

        The logits are upsampled bilinearly before the softmax; this equals the
        authors' upsampling of F before the dot product, since both are linear. By default
        everything after the backbone runs in (at least) float32 whatever the autocast state, as
        the authors evaluate (and as ``mpae test`` scores).

        Args:
            images: (B, 3, S, S) ImageNet-normalised images.
            backbone_tokens: precomputed (B, h*w, D) backbone tokens instead of running the backbone.
            scale_factor: upsampling factor from the patch grid (default: ``eval_scale_factor``).
            dtype: ``None``/``torch.float32`` (default, the authors' precision) or, opt-in for
                faster prediction, ``torch.bfloat16``/``torch.float16``: the backbone, descriptor ViT,
                F and the logits run in that dtype (the upsampling and softmax stay float32, so the
                result is float32 either way). Measured: 99.2 % of a 128x128 map's labels equal
                float32's (full-size model, random weights, CPU; ``benchmarks/RESULTS.md``, change 13).
        """
        logits = self.encode_parts(images, backbone_tokens, float32_head=True, dtype=dtype).logits
        return self.part_probabilities(logits, scale_factor)

    def part_probabilities(self, logits: torch.Tensor, scale_factor: float | None = None) -> torch.Tensor:
        """Patch-grid part logits -> (B, K+1, h*s, w*s) probabilities (bilinear upsampling, then softmax).

        Always computed in (at least) float32, also under bf16/fp16 autocast, as the authors
        evaluate: in bf16 about 1 % of the labels of a 128x128 map flip.
        """
        scale = self.eval_scale_factor if scale_factor is None else scale_factor
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = at_least_float32(logits)
            if scale != 1:
                logits = F.interpolate(logits, scale_factor=scale, mode="bilinear", align_corners=False)
            return logits.softmax(dim=1)
