"""``mpae parts``: write the part maps of image files and folders with a checkpoint or a pretrained folder.

The short form of ``mpae predict``: no config, no data section, every setting from the weights::

    mpae parts photos/ bird.jpg --ckpt_path runs/cub/version_0/checkpoints/last.ckpt
    mpae parts photos/ --pretrained mpae-cub-k16 --out parts_cub --resolution original

Images of any size and mode (JPEG, PNG, TIFF, GIF, WebP ...; folders searched recursively) are
read and resized as evaluation does (:meth:`MPAEModule.predict_images`). For every image it
writes the files ``mpae predict`` writes (``<n>_<name>_parts.png`` palette PNG with the part ids,
background = K; ``_parts.npy``, the same labels; ``_overlay.png``) into ``--out`` (default
``./parts``). Exit code 0, or 2 with one line naming a missing file, an unreadable image or a
folder without images.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from .errors import ConfigError

__all__ = ["load_module", "parts_main", "write_parts"]

#: Where ``mpae parts`` writes without ``--out`` (covered by the repository's .gitignore).
DEFAULT_OUT = "parts"


def load_module(
    ckpt_path: str | None,
    pretrained: str | None,
    untrained: bool = False,
    config: str | None = None,
    backbone_weights: str | None = None,
) -> Any:
    """The :class:`~mpae_lightning.MPAEModule` of a checkpoint, a pretrained folder (or Hub id) or, with
    ``untrained``, the initial weights of ``config``'s model; exactly one source."""
    from .lightning_module import MPAEModule

    if ckpt_path and pretrained:
        raise ConfigError(f"--ckpt_path {ckpt_path} and --pretrained {pretrained} exclude each other: pass one")
    if (ckpt_path or pretrained) and untrained:
        raise ConfigError("--untrained predicts with initial weights: drop it, or drop --ckpt_path/--pretrained")
    if config and not untrained:
        raise ConfigError(f"--config {config} is read only with --untrained: the weights hold every setting; drop it")
    kwargs = {} if backbone_weights is None else {"backbone_weights": backbone_weights}
    if ckpt_path:
        path = os.path.expanduser(ckpt_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--ckpt_path {ckpt_path} does not exist; pass a .ckpt written by `mpae fit` "
                                    "(e.g. <run folder>/checkpoints/last.ckpt)")
        return MPAEModule.load_from_checkpoint(path, map_location="cpu", **kwargs)
    if pretrained:
        return MPAEModule.from_pretrained(pretrained, **kwargs)
    if untrained:
        from .export import untrained_module

        return untrained_module(config, backbone_weights)
    raise ConfigError(
        "mpae parts needs trained weights: pass --ckpt_path FILE (a .ckpt written by `mpae fit`) or --pretrained DIR "
        "(a folder written by save_pretrained or `mpae convert`); --untrained predicts with initial weights"
    )


def write_parts(
    module: Any,
    images: Any,
    out: str | os.PathLike[str],
    resolution: str = "map",
    batch_size: int = 16,
    untrained: bool = False,
) -> tuple[int, int]:
    """Predict ``images`` (files, folders, PIL images, arrays) and write each one's part files into
    ``out`` as ``mpae predict`` does; returns (files written, images)."""
    from torchvision.transforms.functional import pil_to_tensor

    from .callbacks import describe_model, prediction_stem, write_part_files
    from .inference import RESOLUTIONS, label_maps, predict_batches
    from .visualize import picture_title

    if resolution not in RESOLUTIONS:
        raise ConfigError(f"--resolution {resolution}: expected map (the M x M evaluation map) or original "
                          "(each image's own size)")
    folder = Path(out).expanduser()
    files = count = 0
    title = None
    for prepared, probs in predict_batches(module, images, batch_size, untrained):
        folder.mkdir(parents=True, exist_ok=True)
        num_labels = probs.shape[1]
        if title is None:
            title = picture_title(*describe_model(None, module), num_parts=num_labels - 1)
        for item, labels in zip(prepared, label_maps(probs.float().cpu(), prepared, resolution)):
            if resolution == "original":
                image, normalized = pil_to_tensor(item.rgb).float() / 255.0, False
            else:
                image, normalized = item.tensor, True
            stem = prediction_stem(count, item.source)
            files += len(write_part_files(folder, stem, labels.numpy(), num_labels, image, normalized, title))
            count += 1
    return files, count


def parts_main(argv: list[str]) -> int:
    """Entry point of ``mpae parts``; returns the exit code."""
    parser = ArgumentParser(
        prog="mpae parts", exit_on_error=False,
        description="Write the part maps of images (files or folders, any size and format Pillow reads) with a "
                    "checkpoint or pretrained folder: <n>_<name>_parts.png (part ids, background = K), _parts.npy "
                    "and _overlay.png per image. Every setting comes from the weights.",
    )
    parser.add_argument("images", nargs="+", type=str, help="image files and folders (searched recursively)")
    parser.add_argument("--ckpt_path", type=str, default=None, help="a .ckpt written by `mpae fit` (read with "
                        "weights_only=True; it holds every setting)")
    parser.add_argument("--pretrained", type=str, default=None,
                        help="a folder written by save_pretrained or `mpae convert`, or a Hugging Face Hub id")
    parser.add_argument("--out", type=str, default=DEFAULT_OUT, help="folder for the files (created if missing)")
    parser.add_argument("--resolution", type=str, default="map",
                        help="map: the M x M evaluation map (eval_map_size); original: each image's own size")
    parser.add_argument("--batch_size", type=int, default=16, help="images per forward pass")
    parser.add_argument("--precision", type=str, default=None,
                        help="32 or bf16: the model's predict_precision (default: the one the weights were saved "
                             "with, normally 32); bf16 is faster and agrees on ~99%% of labels")
    parser.add_argument("--untrained", type=bool, default=False, nargs="?", const=True,
                        help="predict with initial, untrained weights (settings from --config); maps are noise")
    parser.add_argument("--config", type=str, default=None, help="with --untrained: a training config whose model "
                        "section (and data image_size) is used")
    parser.add_argument("--backbone_weights", type=str, default=None, help="a local copy of the backbone, for "
                        "weights saved without it (frozen_weights_in_checkpoint=False) on a machine without network")
    cfg = parser.parse_args(argv)
    if cfg.resolution not in ("map", "original"):
        raise ConfigError(f"--resolution {cfg.resolution}: expected map or original")
    if cfg.batch_size < 1:
        raise ConfigError(f"--batch_size {cfg.batch_size} must be >= 1")
    from .inference import expand_inputs
    from .runs import check_writable

    images = expand_inputs(cfg.images)  # a missing file or empty folder fails before any model is built
    check_writable("--out", cfg.out)
    from .lightning_module import PREDICT_PRECISIONS

    if cfg.precision is not None and cfg.precision not in PREDICT_PRECISIONS:
        raise ConfigError(f"--precision {cfg.precision}: expected one of {', '.join(PREDICT_PRECISIONS)}")
    module = load_module(cfg.ckpt_path, cfg.pretrained, cfg.untrained, cfg.config, cfg.backbone_weights)
    if cfg.precision is not None:
        module.hparams["predict_precision"] = cfg.precision  # read by predict_dtype (prediction only)
    import torch

    if torch.cuda.is_available():
        module = module.to("cuda")
    files, count = write_parts(module, images, cfg.out, cfg.resolution, cfg.batch_size, untrained=cfg.untrained)
    print(f"mpae parts: wrote {files} files for {count} images to {Path(cfg.out).expanduser()}", flush=True)
    return 0
