"""Part maps of your own images: files, folders, PIL images or arrays in, one label map per image out.

:meth:`MPAEModule.predict_images <mpae_lightning.MPAEModule.predict_images>` and ``mpae parts``
are built on this. Every image is read as the datasets read it (:func:`~mpae_lightning.data.base.as_rgb`:
any mode, EXIF orientation applied) and resized as the model's training data was
(:func:`~mpae_lightning.data.transforms.input_transform`: squashed to S x S, without antialiasing
where the module's ``input_antialias`` is False as for CelebA, ImageNet-normalised), so a
prediction equals ``model.predict_parts`` on what ``mpae test``/``mpae predict`` would feed it::

    module = MPAEModule.load_from_checkpoint("runs/cub/checkpoints/last.ckpt")
    maps = module.predict_images(["bird.jpg", "photos/"], resolution="original")
    maps[0].labels  # (H, W) int64: parts 0..K-1, background K
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
import torch
from PIL import Image

from .data.base import as_rgb, load_rgb
from .data.image_folder import list_images
from .data.transforms import input_transform

__all__ = ["ImageInput", "PartMaps", "PreparedImage", "expand_inputs", "predict_batches", "predict_images",
           "require_trained_weights"]

#: One image: a file path, a PIL image (any mode) or an (H, W), (H, W, 3) or (H, W, 4) uint8 array.
#: Paths of folders stand for every image in them (see :func:`expand_inputs`).
ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray]

RESOLUTIONS = ("map", "original")


@dataclass(frozen=True)
class PartMaps:
    """The parts of one image.

    Attributes:
        labels: (H, W) int64 part id of every pixel: 0..K-1 the K parts, K the background (the last
            channel of ``probabilities``, as in ``MPAE.predict_parts`` and the written ``_parts.png``).
            At the map's resolution (M x M, ``eval_map_size``), or the image's own with
            ``resolution="original"`` (nearest resize of the map's labels, as ``mpae predict`` writes).
        probabilities: (K+1, M, M) float32 part probabilities at the map's resolution, on the CPU
            (None when not asked for; at "original" resolution they would cost H x W x (K+1) floats).
        num_parts: K.
        image_size: (height, width) of the image as read (after EXIF orientation).
        source: the image's file, or None for a PIL image or array given directly.
    """

    labels: torch.Tensor
    probabilities: torch.Tensor | None
    num_parts: int
    image_size: tuple[int, int]
    source: str | None = None

    @property
    def background(self) -> int:
        """The label of the background (K)."""
        return self.num_parts

    @property
    def foreground(self) -> torch.Tensor:
        """(H, W) bool: pixels of any of the K parts."""
        return self.labels != self.num_parts


@dataclass(frozen=True)
class PreparedImage:
    """An image read for prediction: ``rgb`` as read, ``tensor`` (3, S, S) as the network sees it."""

    rgb: Image.Image
    tensor: torch.Tensor
    source: str | None


def _describe(item: Any) -> str:
    return f"{type(item).__name__} {getattr(item, 'shape', '')}".strip()


def expand_inputs(images: ImageInput | Sequence[ImageInput]) -> list[ImageInput]:
    """``images`` as a flat list of single images: a folder becomes its images (recursively, sorted by
    relative path, as ``ImageFolderDataModule`` lists them); one image becomes a list of one.

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without images (named).
        TypeError: an item that is no image.
    """
    if isinstance(images, (str, os.PathLike, Image.Image)) or (isinstance(images, np.ndarray) and images.ndim <= 3):
        images = [images]  # type: ignore[list-item]
    elif isinstance(images, np.ndarray):
        images = list(images)  # an (N, H, W, C) batch
    elif isinstance(images, torch.Tensor):
        raise TypeError(
            "predict_images takes files, PIL images or uint8 arrays, not a tensor; for ImageNet-normalised "
            "(B, 3, S, S) tensors use module.model.predict_parts(images)"
        )
    out: list[ImageInput] = []
    for item in images:  # type: ignore[union-attr]
        if isinstance(item, (str, os.PathLike)):
            path = os.path.expanduser(os.fspath(item))
            if os.path.isdir(path):
                found = list_images(path)
                if not found:
                    raise FileNotFoundError(
                        f"{path} is a folder without images; expected files in a format Pillow opens "
                        "(.jpg, .png, .tif, .gif, .webp ...; searched recursively)"
                    )
                out.extend(found)
            elif os.path.isfile(path):
                out.append(path)
            else:
                raise FileNotFoundError(f"image {path} does not exist")
        elif isinstance(item, (Image.Image, np.ndarray)):
            out.append(item)
        else:
            raise TypeError(f"predict_images: cannot read {_describe(item)} as an image; pass a file path, a folder, "
                            "a PIL image or an (H, W, 3) uint8 array")
    return out


def read_image(item: ImageInput) -> tuple[Image.Image, str | None]:
    """One image as RGB, read as the datasets read it, and its file (None if not from a file)."""
    if isinstance(item, (str, os.PathLike)):
        path = os.fspath(item)
        return load_rgb(path), path
    if isinstance(item, Image.Image):
        item.load()
        return as_rgb(item), None
    array = np.asarray(item)
    if array.dtype != np.uint8 or not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (1, 3, 4))):
        raise ValueError(
            f"an image array must be (H, W), (H, W, 3) or (H, W, 4) uint8 (0-255), got shape {array.shape} "
            f"dtype {array.dtype}; for floats in [0, 1] pass (a * 255).round().astype(np.uint8)"
        )
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    return as_rgb(Image.fromarray(np.ascontiguousarray(array))), None


def require_trained_weights(module: Any, untrained: bool, what: str = "predict_images") -> None:
    """Refuse to predict with freshly initialised weights unless ``untrained`` says that is meant."""
    if untrained or getattr(module, "has_trained_weights", True):
        return
    raise ValueError(
        f"{what}: this {type(module).__name__} holds untrained weights (none loaded, never trained), so its part "
        "maps would be noise; load trained ones with MPAEModule.load_from_checkpoint(CKPT) or "
        f"MPAEModule.from_pretrained(DIR) (or train it), or pass untrained=True to {what} to use these anyway"
    )


def predict_batches(
    module: Any,
    images: ImageInput | Sequence[ImageInput],
    batch_size: int = 16,
    untrained: bool = False,
    **predict_options: Any,
) -> Iterator[tuple[list[PreparedImage], torch.Tensor]]:
    """``(prepared images, (B, K+1, M, M) probabilities)`` batch by batch; images are read one batch at a time.

    ``module`` is an :class:`~mpae_lightning.MPAEModule` (or anything with ``model`` and
    ``has_trained_weights``); it runs in eval mode without gradients (its mode is restored
    afterwards). ``predict_options`` go to ``module.model.predict_parts`` (e.g. ``scale_factor``).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    require_trained_weights(module, untrained)
    items = expand_inputs(images)
    model = module.model
    transform = input_transform(model.image_size, antialias=bool(getattr(module, "input_antialias", True)))
    dtype = model.feature_proj.weight.dtype  # the network's; autocast callers may pass other options
    device = next(model.parameters()).device
    options = dict(predict_options)
    predict_dtype = getattr(module, "predict_dtype", None)  # the module's opt-in prediction precision
    if predict_dtype is not None:
        options.setdefault("dtype", predict_dtype)
    was_training = module.training
    module.eval()
    try:
        for start in range(0, len(items), batch_size):
            prepared = []
            for item in items[start:start + batch_size]:
                rgb, source = read_image(item)
                prepared.append(PreparedImage(rgb, transform(rgb), source))
            batch = torch.stack([p.tensor for p in prepared]).to(device=device, dtype=dtype)
            with torch.inference_mode():
                probs = model.predict_parts(batch, **options)
            yield prepared, probs
    finally:
        if was_training:
            module.train()


def label_maps(probs: torch.Tensor, prepared: Sequence[PreparedImage], resolution: str) -> list[torch.Tensor]:
    """The (H, W) int64 labels of each image: argmax at the map's resolution, resized (nearest) to the
    image's own size at ``resolution="original"`` (the resize ``mpae predict`` writes with)."""
    from .visualize import resize_labels

    labels = probs.argmax(dim=1).cpu()
    if resolution == "map":
        return list(labels)
    out = []
    for lab, item in zip(labels, prepared):
        size = (item.rgb.height, item.rgb.width)
        out.append(torch.from_numpy(np.asarray(resize_labels(lab.numpy(), size), dtype=np.int64)))
    return out


def predict_images(
    module: Any,
    images: ImageInput | Sequence[ImageInput],
    batch_size: int = 16,
    resolution: Literal["map", "original"] = "map",
    probabilities: bool = True,
    untrained: bool = False,
    **predict_options: Any,
) -> list[PartMaps]:
    """One :class:`PartMaps` per image of ``images`` (folders expanded), in order.

    Args:
        module: a trained :class:`~mpae_lightning.MPAEModule` (``load_from_checkpoint``, ``from_pretrained``).
        images: a file, folder, PIL image or uint8 array, or a list of them; any size and mode.
        batch_size: images per forward pass.
        resolution: ``"map"`` (M x M, the evaluation map) or ``"original"`` (each image's H x W) labels.
        probabilities: also return the (K+1, M, M) probabilities (False saves their memory).
        untrained: allow freshly initialised weights (refused otherwise: their maps are noise).
        predict_options: passed to ``module.model.predict_parts`` (e.g. ``scale_factor``).
    """
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be 'map' or 'original', got {resolution!r}")
    results = []
    for prepared, probs in predict_batches(module, images, batch_size, untrained, **predict_options):
        probs = probs.float().cpu()
        num_parts = probs.shape[1] - 1
        for item, labels, p in zip(prepared, label_maps(probs, prepared, resolution), probs):
            results.append(PartMaps(labels.long(), p if probabilities else None, num_parts,
                                    (item.rgb.height, item.rgb.width), item.source))
    return results

