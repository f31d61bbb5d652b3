"""Base DataModule, the image-list dataset and the input checks shared by every dataset."""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningDataModule
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Subset

from ..metrics.keypoint_regression import isotropic_scale
from .resumable import ResumableDataLoader
from .samplers import EvalShardSampler, MiniGroupBatchSampler, check_mini_group
from .transforms import eval_transform, scale_keypoints, squash_resize, train_transform

__all__ = [
    "DatasetFormatError",
    "ImageReadError",
    "ImageRecord",
    "ImageRecordDataset",
    "PartDataModule",
    "as_rgb",
    "check_files_exist",
    "load_rgb",
    "missing_files",
]

Split = Literal["train", "val", "test", "predict"]
#: What validation runs on: the test split (the authors' protocol), a held-out slice of the
#: training split, a validation split of the dataset's own, or the training images themselves.
ValSplit = Literal["test", "holdout", "val", "train"]


class DatasetFormatError(ValueError):
    """An annotation file exists but does not have the expected syntax or content."""


class ImageReadError(OSError):
    """An image file exists but cannot be decoded."""


_EXIF_ORIENTATION = 0x0112


def as_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 3-channel RGB, as every dataset reads it (and ``MPAEModule.predict_images``).

    An EXIF orientation tag is applied (``ImageOps.exif_transpose``), as ``cv2.imread`` in the
    authors' loaders does; a palette with transparency goes through RGBA; 16/32-bit integer and
    float grayscale (TIFF ``I;16``, ``I``, ``F``) is scaled by its maximum to 8 bits, since PIL's
    direct conversion clips it; every other mode (L, LA, P, RGBA, CMYK, YCbCr ...) is PIL's
    ``convert("RGB")`` (an alpha channel is dropped). The first frame of an animation is used.
    """
    if img.getexif().get(_EXIF_ORIENTATION, 1) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16/32-bit grayscale: PIL's direct RGB conversion clips, so rescale to 8 bits first.
        arr = np.nan_to_num(np.asarray(img, dtype=np.float64))
        hi = arr.max() if arr.size else 0.0
        arr = np.clip(arr / (hi if hi > 0 else 1.0), 0.0, 1.0) * 255.0
        img = Image.fromarray(arr.astype(np.uint8), mode="L")
    return img.convert("RGB")


def load_rgb(path: str) -> Image.Image:
    """Open an image file as 3-channel RGB (:func:`as_rgb`: grayscale, CMYK, RGBA, palette and
    16-bit images included; EXIF orientation applied, so the returned size is the oriented one and
    annotations given for the displayed image, such as keypoints, line up with it).

    Args:
        path: Image file.

    Raises:
        FileNotFoundError: The file does not exist.
        ImageReadError: The file cannot be decoded; the message names the path.
    """
    try:
        with Image.open(path) as img:
            img.load()
            return as_rgb(img)
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(
            f"cannot read image {path} ({type(err).__name__}: {err}); expected a readable image file "
            "(any format Pillow opens: JPEG, PNG, TIFF, GIF, WebP, BMP ...); it may be truncated or corrupt"
        ) from err


def missing_files(paths: Sequence[str]) -> list[str]:
    """The entries of ``paths`` that are not existing files (one listdir per folder, not one stat per file)."""
    listing: dict[str, set[str] | None] = {}
    missing = []
    for p in paths:
        folder, name = os.path.split(p)
        if folder not in listing:
            listing[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else None
        names = listing[folder]
        if names is None or name not in names:
            missing.append(p)
    return missing


def raise_missing(missing: Sequence[str], total: int, listed_in: str, expected_under: str, show: int = 5) -> None:
    """Raise one FileNotFoundError listing the first ``show`` missing paths and their count."""
    if not missing:
        return
    head = "\n  ".join(missing[:show])
    more = f"\n  ... and {len(missing) - show} more" if len(missing) > show else ""
    raise FileNotFoundError(
        f"{len(missing)} of {total} images listed in {listed_in} do not exist "
        f"(expected under {expected_under}):\n  {head}{more}"
    )


def check_files_exist(paths: Sequence[str], listed_in: str, expected_under: str, show: int = 5) -> None:
    """Raise one FileNotFoundError listing the first few missing paths and their count.

    Args:
        paths: Files that must exist.
        listed_in: Where the paths come from (an annotation file), for the message.
        expected_under: The folder they were expected in, for the message.
        show: How many missing paths the message lists.
    """
    raise_missing(missing_files(paths), len(paths), listed_in, expected_under, show)


def require_file(path: str, what: str) -> str:
    """Return ``path`` if it is a file, else raise FileNotFoundError with ``what`` as the expectation."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist; expected {what}")
    return path


def require_root(root: str, dataset: str, expected: str) -> str:
    """Return the expanded ``root`` if it is a folder, else raise a FileNotFoundError naming it."""
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{dataset} root {root} does not exist or is not a folder; expected {expected}")
    return root


@dataclass
class ImageRecord:
    """One image of a split.

    Args:
        path: Image file.
        label: Class id, -1 if unknown.
        keypoints: (P, 2) float (x, y) in original-image pixels, or None.
        visible: (P,) bool, or None.
        box: (4,) float object box (x, y, width, height) in original-image pixels, or None.
    """

    path: str
    label: int = -1
    keypoints: np.ndarray | None = None
    visible: np.ndarray | None = None
    box: np.ndarray | None = None


class _SubsetMaskFn:
    """``mask_fn`` of a subset: maps the subset's position back to the full split's (picklable for workers)."""

    def __init__(self, mask_fn: Callable[[int, int, int], torch.Tensor], indices: list[int]) -> None:
        self.mask_fn, self.indices = mask_fn, indices

    def __call__(self, index: int, width: int, height: int) -> torch.Tensor:
        return self.mask_fn(self.indices[index], width, height)


class LabelledSubset(Subset):
    """A ``Subset`` that keeps the ``labels`` of its dataset (for class-grouped mini-groups)."""

    @property
    def labels(self) -> list[int]:
        labels = getattr(self.dataset, "labels", None)
        if labels is None:
            raise AttributeError(f"{type(self.dataset).__name__} has no labels")
        return [labels[i] for i in self.indices]


def take(dataset: Dataset, indices: Sequence[int]) -> Dataset:
    """``dataset`` restricted to ``indices``: its own ``subset`` if it has one, else a :class:`LabelledSubset`."""
    if hasattr(dataset, "subset"):
        return dataset.subset(indices)
    return LabelledSubset(dataset, list(indices))


class ImageRecordDataset(Dataset):
    """Images read from a list of :class:`ImageRecord`, returned as dicts.

    Every item has ``image`` (3, S, S) float normalised, ``index`` (position in the list),
    ``path`` and ``label``. In evaluation mode, records with keypoints add ``keypoints`` (P, 2)
    in pixels of the S×S image and ``visible`` (P,) bool, records with a box add ``box`` (4,)
    (x, y, width, height in pixels of the S×S image), and ``mask_fn`` (if given) adds
    ``mask`` (mask_size, mask_size) long. Training items carry only the image and its identity.

    Args:
        records: The split's images, in the dataset's own listing order.
        image_size: Side S of the output image.
        train: Apply the training augmentation instead of the evaluation resize.
        mask_fn: ``mask_fn(index, width, height)`` -> (mask_size, mask_size) long tensor.
        squash: First resize every image to S×S with
            :func:`~mpae_lightning.data.transforms.squash_resize` (bilinear, no antialiasing) on
            either split, as the authors' CelebA loader does; the augmentation or evaluation
            transform then follows.
        isotropic_scale: Evaluation items with keypoints add ``isotropic_scale`` (2,) float64,
            ``(W, H) / min(W, H)``: multiplying (x, y) of the S×S input by it gives the isotropic
            frame (original resized to shorter side S) where PDiscoNet measures CelebA KPR.
    """

    def __init__(
        self,
        records: Sequence[ImageRecord],
        image_size: int,
        train: bool = False,
        mask_fn: Callable[[int, int, int], torch.Tensor] | None = None,
        squash: bool = False,
        isotropic_scale: bool = False,
    ) -> None:
        self.records = list(records)
        self.image_size = image_size
        self.train = train
        self.mask_fn = mask_fn
        self.squash = squash
        self.isotropic_scale = isotropic_scale
        self.transform = train_transform(image_size) if train else eval_transform(image_size)

    @property
    def labels(self) -> list[int]:
        return [r.label for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, indices: Sequence[int]) -> "ImageRecordDataset":
        """The records at ``indices`` (``index`` then counts within the subset), masks included."""
        indices = [int(i) for i in indices]
        mask_fn = _SubsetMaskFn(self.mask_fn, indices) if self.mask_fn is not None else None
        return type(self)(  # a subclass's subset keeps its items' form
            [self.records[i] for i in indices], self.image_size, self.train, mask_fn, self.squash, self.isotropic_scale
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        rec = self.records[index]
        img = load_rgb(rec.path)
        width, height = img.size
        if self.squash:
            img = squash_resize(img, self.image_size)
        item: dict[str, Any] = {
            "image": self.transform(img),
            "index": index,
            "path": rec.path,
            "label": rec.label,
        }
        if self.train:
            return item
        if rec.keypoints is not None:
            item["keypoints"] = scale_keypoints(rec.keypoints, width, height, self.image_size)
            vis = rec.visible if rec.visible is not None else np.ones(len(rec.keypoints), dtype=bool)
            item["visible"] = torch.as_tensor(np.asarray(vis, dtype=bool))
            if self.isotropic_scale:
                item["isotropic_scale"] = isotropic_scale(width, height)
        if rec.box is not None:
            # Corner and size scale like keypoints (x by S/W, y by S/H).
            item["box"] = scale_keypoints(np.asarray(rec.box, dtype=np.float64).reshape(2, 2), width, height,
                                          self.image_size).reshape(4)
        if self.mask_fn is not None:
            item["mask"] = self.mask_fn(index, width, height)
        return item


class ForegroundMaskDataset(ImageRecordDataset):
    """Evaluation images whose ``mask_fn`` reads a binary object mask, returned as ``fg_mask`` (S, S) bool.

    Not a part-label ``mask``: ``MPAEModule`` scores it with the foreground IoU only (CUB's and
    Flowers-102's segmentations; ``has_fg_masks`` on the DataModule).
    """

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = super().__getitem__(index)
        if "mask" in item:
            item["fg_mask"] = item.pop("mask")
        return item


class MaskFiles:
    """``mask_fn`` of a :class:`ForegroundMaskDataset`: ``load(paths[index], image_size, (width, height))``.

    A plain object holding a module-level ``load``, so DataLoader workers can receive it pickled.
    """

    def __init__(self, paths: Sequence[str], image_size: int,
                 load: Callable[[str, int, tuple[int, int]], torch.Tensor]) -> None:
        self.paths, self.image_size, self.load = list(paths), image_size, load

    def __call__(self, index: int, width: int, height: int) -> torch.Tensor:
        return self.load(self.paths[index], self.image_size, (width, height))


def check_masks_exist(paths: Sequence[str], what: str, expected: str, folder: str) -> None:
    """One FileNotFoundError naming the first missing ``what`` files (e.g. "segmentation masks") and their count."""
    missing = missing_files(paths)
    if missing:
        shown = ", ".join(missing[:3]) + (f" (and {len(missing) - 3} more)" if len(missing) > 3 else "")
        raise FileNotFoundError(
            f"{len(missing)} of {len(paths)} {what} do not exist: {shown}; expected {expected} under {folder}"
        )


def object_mask_dataset(records: Sequence[ImageRecord], image_size: int, squash: bool,
                        mask_paths: Sequence[str] | None,
                        load: Callable[[str, int, tuple[int, int]], torch.Tensor]) -> ImageRecordDataset:
    """Evaluation images, with ``fg_mask`` items read by ``load`` from ``mask_paths`` when there are any."""
    if mask_paths is None:
        return ImageRecordDataset(records, image_size, train=False, squash=squash)
    return ForegroundMaskDataset(records, image_size, train=False, mask_fn=MaskFiles(mask_paths, image_size, load),
                                 squash=squash)


def read_segmentation(path: str, mode: str, what: str, expected: str,
                      image_wh: tuple[int, int] | None = None) -> np.ndarray:
    """The pixels of a segmentation file in PIL ``mode`` ("L", "RGB"), checked against its image's size.

    Args:
        path: The file.
        mode: PIL mode to convert to.
        what: What the file is, for messages (e.g. "segmentation mask").
        expected: What it should be, for the message of an unreadable file.
        image_wh: The image's (width, height); a file of another size is refused.

    Raises:
        FileNotFoundError: The file does not exist.
        ImageReadError: The file cannot be decoded.
        DatasetFormatError: Its size is not ``image_wh``.
    """
    try:
        with Image.open(path) as img:
            img.load()
            pixels = np.asarray(img.convert(mode))
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageReadError(
            f"cannot read {what} {path} ({type(err).__name__}: {err}); expected {expected}; "
            "it may be truncated or corrupt"
        ) from err
    height, width = pixels.shape[:2]
    if image_wh is not None and (width, height) != tuple(image_wh):
        raise DatasetFormatError(
            f"{what} {path} is {width}x{height} but its image is {image_wh[0]}x{image_wh[1]}; "
            f"expected the {what} of that image"
        )
    return pixels


class PartDataModule(LightningDataModule, ABC):
    """Base DataModule: mini-group training batches and rank-sharded evaluation without duplicates.

    Subclasses implement :meth:`build_dataset` and set the annotation attributes in ``__init__``:
    ``has_keypoints``, ``has_masks``, ``num_keypoints`` (0 if none) and ``num_mask_labels``
    (ground-truth mask labels including the background, which is the last id; 0 if none).

    Training uses :class:`~mpae_lightning.data.samplers.MiniGroupBatchSampler` sharded by whole
    batches across ranks; validation/test/predict use
    :class:`~mpae_lightning.data.samplers.EvalShardSampler` (every sample exactly once over all
    ranks, in order). Lightning must not replace these samplers, so under DDP the Trainer needs
    ``use_distributed_sampler=False`` (the dataloader hooks raise otherwise). Evaluation shards
    differ in size by at most one sample, so a rank may run one evaluation batch more than another:
    synchronise metric states once at epoch end (torchmetrics does), not with per-step
    ``sync_dist=True`` logging.

    Validation runs on :attr:`val_split`: by default the test split for CUB, CelebA and
    PartImageNet (as the authors do), which is then logged as ``val_on_test/...``. With
    ``val_fraction > 0`` a seeded random slice of the training split is held out instead:
    training uses the rest, validation the slice (without augmentation, with annotations).

    Args:
        batch_size: Training images per batch and per process (Lightning's convention); the global
            batch is ``batch_size x world size``, as one process with that batch size would see it.
            A multiple of ``mini_group`` when it is larger.
        mini_group: Chunk size of the mini-group presence loss (8 single-category, 64
            multi-category), counted in the global batch: a group larger than ``batch_size``
            spans neighbouring processes (the loss gathers it), so 4 processes of 16 with
            ``mini_group: 64`` train on the same groups as one process of 64.
        eval_batch_size: Images per batch for validation, test and predict.
        num_workers: DataLoader worker processes.
        seed: Seed of the training order (shared by all ranks; reshuffled every epoch).
        group_by: ``"class"`` to fill each training mini-group with images of one class (not what
            the paper does), or None.
        image_size: Side S of the square network input.
        mask_size: Side of the ground-truth part masks (datasets with masks).
        val_fraction: Share of the training split held out for validation (seeded by ``seed``);
            0 validates on :attr:`default_val_split`.
        drop_last: Drop the training images that do not fill a whole global batch. Default
            ``False``, as the authors' ``DataLoader``: the rest make one last, smaller batch (under
            DDP split evenly over the processes, see
            :class:`~mpae_lightning.data.samplers.MiniGroupBatchSampler`).
        input_antialias: How images are resized to S×S, on every split: antialiased
            (torchvision's resize, the default) or bilinear without antialiasing
            (:func:`~mpae_lightning.data.transforms.squash_resize`, the authors' CelebA loader).
            The ``mpae`` CLI copies it into the model, whose checkpoints record it so that
            prediction resizes as training did. Every data module here takes it
            (``SyntheticPartsDataModule`` draws at S×S and has nothing to resize).
    """

    #: What validation runs on when ``val_fraction`` is 0.
    default_val_split: ClassVar[ValSplit] = "test"

    def __init__(
        self,
        batch_size: int = 64,
        mini_group: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 2,
        seed: int = 0,
        group_by: Literal["class"] | None = None,
        image_size: int = 224,
        mask_size: int = 128,
        val_fraction: float = 0.0,
        drop_last: bool = False,
        input_antialias: bool = True,
    ) -> None:
        super().__init__()
        if batch_size < 1 or mini_group < 1 or eval_batch_size < 1:
            raise ValueError(
                f"batch_size ({batch_size}), mini_group ({mini_group}) and eval_batch_size "
                f"({eval_batch_size}) must be positive"
            )
        check_mini_group(batch_size, mini_group)
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 reads data in the main process), got {num_workers}")
        if group_by not in (None, "class"):
            raise ValueError(f"group_by must be None or 'class', got {group_by!r}")
        if image_size < 1 or mask_size < 1:
            raise ValueError(f"image_size ({image_size}) and mask_size ({mask_size}) must be positive")
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.batch_size = int(batch_size)
        self.mini_group = int(mini_group)
        self.eval_batch_size = int(eval_batch_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.group_by = group_by
        self.image_size = int(image_size)
        self.mask_size = int(mask_size)
        self.val_fraction = float(val_fraction)
        self.drop_last = bool(drop_last)
        self.input_antialias = bool(input_antialias)
        self.has_keypoints = False
        self.has_masks = False
        self.num_keypoints = 0
        self.num_mask_labels = 0
        self._datasets: dict[str, Dataset] = {}

    # -- datasets ------------------------------------------------------------------------------
    @abstractmethod
    def build_dataset(self, split: Split) -> Dataset:
        """Build the dataset of ``split`` ("train" with augmentation; "val", "test", "predict" without).

        Every dataset-specific DataModule implements this.
        """

    def build_train_eval_dataset(self) -> Dataset:
        """The training split without augmentation and with its annotations (for ``val_fraction > 0``)."""
        # A setting error, not a missing feature: every bundled DataModule overrides this.
        raise ValueError(
            f"{type(self).__name__} cannot hold out training images: set val_fraction to 0 "
            "or implement build_train_eval_dataset() in the DataModule"
        )

    def check_data_extras(
        self, splits: Sequence[str]
    ) -> tuple[list[tuple[str, Callable[[], Dataset]]], list[str]]:
        """What ``mpae check-data`` reads besides the datasets of ``splits``, and notes for the user.

        Some data is read outside the splits (CelebA's KPR fitting set at test time), so a bad
        file there would only show hours in. Returns ``(name, build)`` pairs, each ``build()``
        making a dataset whose items are all read (a build that raises is one listed problem),
        and informational lines (not problems: e.g. a fallback the run will take). Default: none.
        """
        return [], []

    def split_source(self, split: Split) -> Split:
        """The split whose data ``split`` reads; splits with the same source share one dataset object.

        The default gives every split its own data. A DataModule whose evaluation splits coincide
        (e.g. validation on the test split, as the authors do for CUB) overrides this, so the
        images are listed and checked once. With ``val_fraction > 0``, train and val are the two
        parts of the training split whatever this says.
        """
        return split

    @property
    def val_split(self) -> ValSplit:
        """What validation runs on: ``"holdout"`` if ``val_fraction > 0``, else :attr:`default_val_split`."""
        return "holdout" if self.val_fraction > 0 else self.default_val_split

    def holdout_indices(self, n: int) -> tuple[list[int], list[int]]:
        """(kept for training, held out) positions among ``n`` training images, each in listing order."""
        n_val = max(1, round(n * self.val_fraction))
        if n_val >= n:
            raise ValueError(f"val_fraction={self.val_fraction} leaves no training image out of {n}")
        held_out = np.zeros(n, dtype=bool)
        held_out[np.random.default_rng(self.seed).permutation(n)[:n_val]] = True
        return np.flatnonzero(~held_out).tolist(), np.flatnonzero(held_out).tolist()

    def dataset(self, split: Split) -> Dataset:
        """The (cached) dataset of ``split``, shared by all splits with the same :meth:`split_source`."""
        holdout = self.val_fraction > 0
        source = split if holdout and split in ("train", "val") else self.split_source(split)
        if source not in self._datasets:
            if holdout and source in ("train", "val"):
                full = self.build_dataset("train") if source == "train" else self.build_train_eval_dataset()
                keep, held_out = self.holdout_indices(len(full))  # type: ignore[arg-type]
                self._datasets[source] = take(full, keep if source == "train" else held_out)
            else:
                self._datasets[source] = self.build_dataset(source)
        return self._datasets[source]

    def setup(self, stage: str | None = None) -> None:
        """Build (and check) the datasets the stage needs, so missing files fail before training."""
        splits: tuple[Split, ...] = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
        }.get(stage or "", ("train", "val", "test", "predict"))
        for split in splits:
            self.dataset(split)

    @property
    def train_dataset(self) -> Dataset:
        return self.dataset("train")

    @property
    def val_dataset(self) -> Dataset:
        return self.dataset("val")

    @property
    def test_dataset(self) -> Dataset:
        return self.dataset("test")

    @property
    def predict_dataset(self) -> Dataset:
        return self.dataset("predict")

    # -- distribution --------------------------------------------------------------------------
    def _world(self) -> tuple[int, int]:
        """(world_size, global_rank): the attached trainer's, else torch.distributed's, else (1, 0)."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return int(trainer.world_size), int(trainer.global_rank)
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _check_distributed_sampler(self) -> None:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return
        connector = getattr(trainer, "_accelerator_connector", None)
        if connector is None or not getattr(connector, "use_distributed_sampler", False):
            return
        if trainer.world_size > 1 or getattr(connector, "is_distributed", False):
            raise RuntimeError(
                f"{type(self).__name__} shards its batches itself (mini-groups must not straddle "
                "processes, and evaluation must count every sample exactly once), so Lightning must "
                "not replace its samplers: set `trainer.use_distributed_sampler: false` in the config "
                "(or Trainer(use_distributed_sampler=False))"
            )

    def _loader_kwargs(self) -> dict[str, Any]:
        return {
            "num_workers": self.num_workers,
            "pin_memory": torch.cuda.is_available(),
            "persistent_workers": self.num_workers > 0,
        }

    def _train_labels(self, dataset: Dataset) -> Sequence[int] | int:
        labels = getattr(dataset, "labels", None)
        if self.group_by is not None:
            if labels is None:
                raise ValueError(f"group_by={self.group_by!r} needs class labels, which {type(dataset).__name__} lacks")
            return labels
        return len(dataset)  # type: ignore[arg-type]

    def train_dataloader(self) -> DataLoader:
        self._check_distributed_sampler()
        dataset = self.dataset("train")
        world_size, rank = self._world()
        sampler = MiniGroupBatchSampler(
            self._train_labels(dataset),
            batch_size=self.batch_size,
            mini_group=self.mini_group,
            shuffle=True,
            seed=self.seed,
            drop_last=self.drop_last,
            num_replicas=world_size,
            rank=rank,
            group_by=self.group_by,
        )
        # Resumable mid-epoch; each image's augmentation and patch mask seeded by (seed, epoch,
        # global batch, position in it), whatever the number of processes.
        return ResumableDataLoader(dataset, batch_sampler=sampler, **self._loader_kwargs())

    def _eval_dataloader(self, split: Split) -> DataLoader:
        self._check_distributed_sampler()
        dataset = self.dataset(split)
        world_size, rank = self._world()
        sampler = EvalShardSampler(len(dataset), num_replicas=world_size, rank=rank)  # type: ignore[arg-type]
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            sampler=sampler,
            shuffle=False,
            drop_last=False,
            **self._loader_kwargs(),
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_dataloader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._eval_dataloader("predict")
