"""Image transforms of the paper (docs/defaults.md §3), built on ``torchvision.transforms.v2``.

Training: resize the shorter side to S, horizontal flip (p=0.5), random affine (rotation ±15°,
translation ±5 %, scale 0.95-1.05), random crop S×S, ImageNet normalisation. (The authors'
``ColorJitter()`` has default arguments and does nothing, so it is left out.)
Evaluation: resize to S×S without keeping the aspect ratio, ImageNet normalisation; keypoints
scale with the image (x·S/W, y·S/H).
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.transforms import v2

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "denormalize",
    "eval_transform",
    "normalize",
    "scale_keypoints",
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
