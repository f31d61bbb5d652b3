"""Shared by the prediction tests: a folder of images of mixed sizes, modes and formats, and a tiny checkpoint."""
from __future__ import annotations

from pathlib import Path

import lightning
import numpy as np
import torch
from PIL import Image

from model_utils import TINY_MODULE

#: name -> (height, width, how it is made): every mode and format a user's folder may hold.
MIXED_IMAGES = {
    "a_rgb.jpg": (50, 70, "RGB"),
    "b_rgba.png": (90, 40, "RGBA"),
    "nested/c_gray.png": (33, 33, "L"),
    "d_palette.gif": (64, 80, "P"),
    "e_16bit.tif": (40, 60, "I;16"),
    "f_cmyk.jpg": (47, 31, "CMYK"),
    "g_rgb.webp": (30, 30, "RGB"),
}


def make_mixed_images(root: Path, seed: int = 0) -> list[Path]:
    """Write :data:`MIXED_IMAGES` (smooth random pictures) under ``root``; returns their paths in
    ``ImageFolderDataModule``'s order (sorted relative path)."""
    rng = np.random.default_rng(seed)
    for name, (height, width, mode) in MIXED_IMAGES.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        rgb = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
        if mode == "I;16":
            gray = np.asarray(rgb.convert("L"), dtype=np.uint16) * 200
            Image.fromarray(gray).save(path)  # a 16-bit grayscale TIFF
            assert Image.open(path).mode == "I;16"
        elif mode == "P":
            rgb.convert("P", palette=Image.ADAPTIVE).save(path)
        else:
            rgb.convert(mode).save(path)
    return sorted((root / name for name in MIXED_IMAGES), key=lambda p: str(p.relative_to(root)))


#: ``model_utils.TINY_MODULE`` with the public VGG-19 source: built only when a loss needs it (never
#: here, prediction does not), so modules and checkpoints are made in a fraction of a second.
TINY_PREDICTOR = {**TINY_MODULE, "vgg_weights": "torchvision"}


def save_tiny_checkpoint(path: Path, seed: int = 0, **overrides) -> Path:
    """A checkpoint of a tiny random :class:`MPAEModule` (:data:`TINY_PREDICTOR`), as Lightning writes one."""
    from mpae_lightning import MPAEModule

    torch.manual_seed(seed)
    module = MPAEModule(**{**TINY_PREDICTOR, **overrides})
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": lightning.__version__, "epoch": 3, "global_step": 12}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)
    return path
