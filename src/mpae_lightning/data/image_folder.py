"""Any folder of images, no annotations: train MPAE on your own data and predict its parts."""

from __future__ import annotations

import mimetypes
import os
from typing import Literal

from PIL import Image, ImageFile

from .base import ImageRecord, ImageRecordDataset, PartDataModule, Split, require_root

__all__ = ["IMAGE_EXTENSIONS", "ImageFolderDataModule", "image_extensions", "list_images", "scan_images"]


#: Formats Pillow identifies but never decodes, without marking them as stubs (its docs: "Identify-only formats").
_IDENTIFY_ONLY = frozenset({"MPEG"})


def image_extensions() -> tuple[str, ...]:
    """The file suffixes (lower case, with the dot) of every format this Pillow can decode.

    Asked of Pillow each time (``PIL.Image.registered_extensions()``), so formats added by plugins
    (``pillow_heif.register_heif_opener()``, ...) count once registered. Formats Pillow can only
    write (PDF) or only identify (HDF5, GRIB, BUFR, MPEG, WMF without a handler), and PostScript without
    Ghostscript, are left out: Pillow cannot read a picture from their files.
    """
    registered = Image.registered_extensions()  # loads every plugin first
    readable = {
        name for name, (factory, _) in Image.OPEN.items()
        if not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))
        and name not in _IDENTIFY_ONLY
    }
    if "EPS" in readable:
        from PIL import EpsImagePlugin

        if not EpsImagePlugin.has_ghostscript():  # Pillow renders PostScript with Ghostscript only
            readable.discard("EPS")
    return tuple(sorted(ext.lower() for ext, name in registered.items() if name in readable))


#: :func:`image_extensions` when this module was imported (``list_images`` asks Pillow again each time).
IMAGE_EXTENSIONS = image_extensions()


def _looks_like_an_image(name: str) -> bool:
    kind, _ = mimetypes.guess_type(name, strict=False)
    return bool(kind) and kind.startswith("image/")


def scan_images(root: str) -> tuple[list[str], list[str]]:
    """``(images, skipped)`` under ``root`` (recursively, hidden entries skipped), each sorted by relative path.

    ``images`` are the files in a format Pillow decodes (:func:`image_extensions`); ``skipped`` are
    files whose type says "image" but that this Pillow cannot open (e.g. ``.heic`` without the
    pillow-heif plugin, ``.svg``). Any other file (``.txt``, ``.json`` ...) is ignored.
    """
    suffixes = image_extensions()
    found, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith("."):
                continue
            if name.lower().endswith(suffixes):
                found.append(os.path.join(dirpath, name))
            elif _looks_like_an_image(name):
                skipped.append(os.path.join(dirpath, name))
    key = lambda p: os.path.relpath(p, root)  # noqa: E731
    return sorted(found, key=key), sorted(skipped, key=key)


def list_images(root: str) -> list[str]:
    """All image files under ``root`` that Pillow decodes (recursively, hidden entries skipped), sorted by
    relative path (see :func:`scan_images`)."""
    return scan_images(root)[0]


def skipped_message(root: str, skipped: list[str], show: int = 5) -> str:
    """One line naming the image-like files under ``root`` that Pillow cannot open."""
    names = ", ".join(os.path.relpath(p, root) for p in skipped[:show])
    more = f" and {len(skipped) - show} more" if len(skipped) > show else ""
    return (
        f"image folder {root}: skipped {len(skipped)} file(s) that Pillow cannot open: {names}{more} "
        "(convert them, or install a Pillow plugin for their format, e.g. pillow-heif for .heic)"
    )


class ImageFolderDataModule(PartDataModule):
    """Every image found under ``root`` (searched recursively), in any format Pillow decodes.

    JPEG, PNG, TIFF (16-bit too), GIF and animated WebP (first frame), BMP, JPEG 2000 ... and the
    formats of installed Pillow plugins (:func:`image_extensions`). Files whose type says "image"
    but that Pillow cannot open (``.heic`` without pillow-heif, ``.svg``) are skipped with one
    warning naming them. A listed file that turns out to be undecodable (truncated, corrupt) stops
    the run with an error naming it, as silently training or predicting on fewer images would
    surprise; ``mpae check-data`` lists every such file beforehand.

    There are no annotations (``has_keypoints = has_masks = False``, ``label`` = -1), so
    validation can report only the losses. With ``val_fraction > 0`` a seeded random subset is
    held out for validation (and test); otherwise validation and test reuse all images.
    Predict always runs on all images. ``index`` is the position in the split, whose order is the
    sorted relative path; ``path`` traces a prediction back to its file.

    Args:
        root: Folder searched recursively for images.
        val_fraction: Share of the images held out for validation/test (0 reuses all images).
        image_size: Side S of the square input (a multiple of the backbone patch 14, e.g. 224).
        batch_size: Training images per batch and per process; a multiple of ``mini_group`` when it is larger.
        mini_group: Chunk size of the mini-group presence loss (8 for one object category,
            64 for many).
        eval_batch_size: Images per batch for validation, test and predict.
        num_workers: DataLoader worker processes.
        seed: Seed of the training order and of the validation hold-out.
        group_by: Must stay None: the images have no class labels.
        mask_size: Unused (no masks); kept for a uniform interface.
        drop_last: Drop the training images that do not fill a whole global batch (default: keep them
            as one last, smaller batch, as the authors do; see :class:`PartDataModule`).
        input_antialias: Resize to S×S with antialiasing (default) or without, as the authors'
            CelebA loader (see :class:`PartDataModule`). With ``--ckpt_path`` and not given, the
            checkpoint's value is used, so a folder is read as the model's training data was.
    """

    #: Without a hold-out, validation runs on the training images (logged as ``val_on_train``).
    default_val_split = "train"

    def __init__(
        self,
        root: str,
        val_fraction: float = 0.0,
        image_size: int = 224,
        batch_size: int = 64,
        mini_group: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 2,
        seed: int = 0,
        group_by: Literal["class"] | None = None,
        mask_size: int = 128,
        drop_last: bool = False,
        input_antialias: bool = True,
    ) -> None:
        super().__init__(
            batch_size=batch_size,
            mini_group=mini_group,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            group_by=group_by,
            image_size=image_size,
            mask_size=mask_size,
            val_fraction=val_fraction,
            drop_last=drop_last,
            input_antialias=input_antialias,
        )
        self.save_hyperparameters()
        self.root = root
        self._files: list[str] | None = None

    def files(self) -> list[str]:
        """All images, sorted (listed once)."""
        if self._files is None:
            root = require_root(self.root, "Image folder", "a folder containing images (any format Pillow opens)")
            files, skipped = scan_images(root)
            if skipped and files:
                from lightning.pytorch.utilities import rank_zero_warn

                rank_zero_warn(skipped_message(root, skipped))
            if not files:
                also = f"; {skipped_message(root, skipped)}" if skipped else ""
                raise FileNotFoundError(
                    f"image folder {root} contains no images; expected files in a format Pillow opens "
                    f"(.jpg, .png, .tif, .gif, .webp, .bmp ...; searched recursively){also}"
                )
            self._files = files
        return self._files

    def split_files(self, split: Split) -> list[str]:
        """The files of ``split`` in sorted order."""
        files = self.files()
        if split == "predict" or self.val_fraction == 0.0:
            return files
        keep, held_out = self.holdout_indices(len(files))
        return [files[i] for i in (keep if split == "train" else held_out)]

    def split_source(self, split: Split) -> Split:
        """Validation and test read the same images: the held-out ones, or all without a hold-out."""
        if self.val_fraction > 0:
            return "val" if split == "test" else split
        return "test" if split == "val" else split

    def build_dataset(self, split: Split) -> ImageRecordDataset:
        # All images: with a hold-out, the base class splits "train" and the evaluation copy itself.
        return ImageRecordDataset([ImageRecord(path=p) for p in self.files()], self.image_size,
                                  train=split == "train", squash=not self.input_antialias)

    def build_train_eval_dataset(self) -> ImageRecordDataset:
        return self.build_dataset("val")
