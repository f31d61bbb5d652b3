"""Image transforms of the paper (docs/defaults.md §3), built on ``torchvision.transforms.v2``.

Training: resize the shorter side to S, horizontal flip (p=0.5), random affine (rotation ±15°,
translation ±5 %, scale 0.95-1.05), random crop S×S, ImageNet normalisation. (The authors'
``ColorJitter()`` has default arguments and does nothing, so it is left out.)
Evaluation: resize to S×S without keeping the aspect ratio, ImageNet normalisation; keypoints
scale with the image (x·S/W, y·S/H).
CelebA: the authors' loader first squashes every image to S×S (``cv2.resize``: bilinear, no
antialiasing), on both splits; :func:`squash_resize` does the same, and the transforms above then
follow (their resizes and crop leave an S×S image unchanged, so training is flip + affine after
the squash).
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "denormalize",
    "eval_transform",
    "input_transform",
    "normalize",
    "scale_keypoints",
    "squash_resize",
    "train_transform",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


def _to_normalized_tensor() -> list[v2.Transform]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
        v2.ToPureTensor(),
    ]


def train_transform(image_size: int) -> v2.Compose:
    """The paper's training augmentation: PIL RGB image -> normalised float tensor (3, S, S).

    Args:
        image_size: Output side S.
    """
    return v2.Compose(
        [
            v2.Resize(image_size),
            v2.RandomHorizontalFlip(p=0.5),
            v2.RandomAffine(degrees=15, translate=(0.05, 0.05), scale=(0.95, 1.05)),
            v2.RandomCrop(image_size),
            *_to_normalized_tensor(),
        ]
    )


def eval_transform(image_size: int) -> v2.Compose:
    """Evaluation transform: resize to S×S ignoring the aspect ratio, then normalise.

    Args:
        image_size: Output side S.
    """
    return v2.Compose([v2.Resize((image_size, image_size)), *_to_normalized_tensor()])


def input_transform(image_size: int, antialias: bool = True) -> v2.Compose | partial:
    """PIL RGB image -> (3, S, S) network input, as evaluation reads it: :func:`eval_transform`,
    after :func:`squash_resize` when ``antialias`` is False (the authors' CelebA input).

    Why a setting: shrinking a large image with and without antialiasing gives visibly different
    inputs, so prediction must resize as the model's training data did (``input_antialias`` of the
    data modules and of :class:`~mpae_lightning.MPAEModule`).
    """
    transform = eval_transform(image_size)
    return transform if antialias else partial(_squash_then, transform, image_size)


def _squash_then(transform: v2.Compose, image_size: int, image: Image.Image) -> torch.Tensor:
    return transform(squash_resize(image, image_size))


def squash_resize(image: Image.Image, image_size: int) -> Image.Image:
    """Resize an RGB image to S×S ignoring the aspect ratio, bilinear WITHOUT antialiasing.

    This is the ``cv2.resize(img, (S, S))`` (``INTER_LINEAR``, half-pixel centres) that the authors'
    CelebA loader applies before any augmentation; computed in float and rounded, it is within one
    grey level of OpenCV's fixed-point result. (PIL's and torchvision's default bilinear resize
    antialias when shrinking, which blurs a 500-pixel face far more than the authors' input.)

    Args:
        image: RGB PIL image.
        image_size: Output side S.
    """
    if image.size == (image_size, image_size):
        return image
    pixels = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)[None].float()
    out = F.interpolate(pixels, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=False)
    return Image.fromarray(out[0].round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy(), mode="RGB")


def scale_keypoints(keypoints: np.ndarray | torch.Tensor, width: int, height: int, image_size: int) -> torch.Tensor:
    """Map (P, 2) keypoints (x, y) in pixels of a W×H image to pixels of its S×S resize.

    Args:
        keypoints: (P, 2) array of (x, y) in original-image pixels.
        width: Original width W.
        height: Original height H.
        image_size: Side S of the resized image.

    Returns:
        (P, 2) float32 tensor (x·S/W, y·S/H).
    """
    kp = torch.as_tensor(np.asarray(keypoints, dtype=np.float64)).reshape(-1, 2)
    scale = torch.tensor([image_size / width, image_size / height], dtype=torch.float64)
    return (kp * scale).float()


def normalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet-normalise a (..., 3, H, W) tensor with values in [0, 1]."""
    mean = image.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Invert :func:`normalize` and clamp to [0, 1] (for display)."""
    mean = image.new_tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = image.new_tensor(IMAGENET_STD).view(3, 1, 1)
    return (image * std + mean).clamp(0.0, 1.0)
