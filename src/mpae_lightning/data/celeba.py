"""Unaligned ("wild") CelebA with the paper's landmark split lists (docs/defaults.md §6.2)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from importlib import resources
from typing import Literal

import numpy as np
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .base import (
    DatasetFormatError,
    ImageReadError,
    ImageRecord,
    ImageRecordDataset,
    PartDataModule,
    Split,
    check_files_exist,
    require_file,
    require_root,
)

__all__ = [
    "CelebADataModule",
    "default_celeba_list",
    "find_mafl_fit_files",
    "read_celeba_list",
    "read_mafl_fit_records",
]

CELEBA_NUM_KEYPOINTS = 5
_LISTS = {"train": "cele_train_lm.txt", "test": "MAFL_test_lm.txt"}
_EXPECTED = "the unaligned CelebA folder with img_celeba/NNNNNN.jpg (the 'In-The-Wild' images)"
#: PDiscoNet's KPR fitting set: MAFL's training list, CelebA's unaligned landmarks and face boxes.
MAFL_FIT_FILES = ("MAFL_training.txt", "list_landmarks_unalign_celeba.txt", "list_bbox_celeba.txt")
#: PDiscoNet keeps the faces whose box covers at least this share of the image (``percentage=0.3``).
MAFL_FACE_FRACTION = 0.3


def default_celeba_list(split: Literal["train", "test"]) -> str:
    """Path of the shipped split list: ``cele_train_lm.txt`` (45,609) or ``MAFL_test_lm.txt`` (283)."""
    ref = resources.files("mpae_lightning.data").joinpath("celeba", _LISTS[split])
    return str(ref)


def read_celeba_list(path: str, image_dir: str) -> list[ImageRecord]:
    """Parse a ``name,x1,y1,...,x5,y5`` landmark list (original-image pixels) into records.

    Args:
        path: The list file.
        image_dir: Folder holding the listed images.
    """
    require_file(path, "a CelebA landmark list with lines 'name,x1,y1,...,x5,y5'")
    records = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            fields = [f.strip() for f in line.split(",")]
            if len(fields) != 1 + 2 * CELEBA_NUM_KEYPOINTS:
                raise DatasetFormatError(
                    f"{path} line {lineno}: expected 'name,x1,y1,...,x5,y5' (11 comma-separated fields), "
                    f"got {len(fields)}: {line!r}"
                )
            try:
                coords = np.asarray([float(v) for v in fields[1:]], dtype=np.float64).reshape(-1, 2)
            except ValueError:
                raise DatasetFormatError(
                    f"{path} line {lineno}: landmark coordinates must be numbers: {line!r}"
                ) from None
            if not np.isfinite(coords).all():
                raise DatasetFormatError(
                    f"{path} line {lineno}: landmark coordinates must be finite numbers (a missing landmark would be "
                    f"scored at pixel (0, 0)): {line!r}"
                )
            records.append(
                ImageRecord(
                    path=os.path.join(image_dir, fields[0]),
                    keypoints=coords,
                    visible=np.ones(CELEBA_NUM_KEYPOINTS, dtype=bool),
                )
            )
    check_files_exist([r.path for r in records], path, image_dir)
    return records


def find_mafl_fit_files(root: str) -> tuple[dict[str, str], list[str]]:
    """Locate :data:`MAFL_FIT_FILES` in ``root``, ``root/Anno`` or ``root/MAFL``.

    Returns:
        (found: file name -> path, missing file names).
    """
    found, missing = {}, []
    for name in MAFL_FIT_FILES:
        paths = [os.path.join(root, sub, name) for sub in ("", "Anno", "MAFL")]
        path = next((q for q in paths if os.path.isfile(q)), None)
        if path is None:
            missing.append(name)
        else:
            found[name] = path
    return found, missing


def _read_name_table(path: str, width: int) -> dict[str, np.ndarray]:
    """``name v1 ... v_width`` lines of a CelebA annotation file; its count and header lines are skipped."""
    table = {}
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            fields = line.split()
            if not fields:
                continue
            try:
                values: np.ndarray | None = np.asarray([float(v) for v in fields[1:]], dtype=np.float64)
            except ValueError:
                values = None
            if values is None or len(values) != width:
                if lineno <= 2:  # the image count and the column names
                    continue
                raise DatasetFormatError(
                    f"{path} line {lineno}: expected an image name and {width} numbers, got {line.strip()!r}"
                )
            table[fields[0]] = values
    return table


def read_mafl_fit_records(
    files: dict[str, str], image_dir: str, face_fraction: float = MAFL_FACE_FRACTION
) -> list[ImageRecord]:
    """PDiscoNet's CelebA KPR fitting set: the MAFL training images whose face box covers at least
    ``face_fraction`` of the image, with their unaligned landmarks (original pixels).

    Args:
        files: paths of :data:`MAFL_FIT_FILES` (see :func:`find_mafl_fit_files`).
        image_dir: the ``img_celeba`` folder (image sizes are read from the files' headers).
        face_fraction: minimum face-box area over image area.
    """
    list_path, landmark_path, box_path = (files[name] for name in MAFL_FIT_FILES)
    with open(list_path, encoding="utf-8") as fh:
        listed = [(lineno, line.split()[0]) for lineno, line in enumerate(fh, 1) if line.strip()]
    names = [name for _, name in listed]
    landmarks = _read_name_table(landmark_path, 2 * CELEBA_NUM_KEYPOINTS)
    boxes = _read_name_table(box_path, 4)
    paths = [os.path.join(image_dir, name) for name in names]
    check_files_exist(paths, list_path, image_dir)
    records, unreadable = [], []
    for (lineno, name), path in zip(listed, paths):
        for table, source in ((landmarks, landmark_path), (boxes, box_path)):
            if name not in table:
                raise DatasetFormatError(f"{source} has no line for {name}, listed in {list_path} line {lineno}")
        try:
            with Image.open(path) as img:
                width, height = img.size
        except (UnidentifiedImageError, OSError) as err:  # all of them in one message, like missing files
            unreadable.append(f"{path} ({type(err).__name__})")
            continue
        box = boxes[name]
        if box[2] * box[3] >= width * height * face_fraction:
            records.append(ImageRecord(path=path, keypoints=landmarks[name].reshape(-1, 2),
                                       visible=np.ones(CELEBA_NUM_KEYPOINTS, dtype=bool)))
    if unreadable:
        more = f" and {len(unreadable) - 5} more" if len(unreadable) > 5 else ""
        raise ImageReadError(
            f"{len(unreadable)} of {len(names)} images listed in {list_path} cannot be read (their size decides "
            f"the face-box filter): {', '.join(unreadable[:5])}{more}; replace them or remove their lines"
        )
    if not records:
        raise DatasetFormatError(f"no image of {list_path} has a face box over {face_fraction:.0%} of the image")
    return records


class CelebADataModule(PartDataModule):
    """Unaligned CelebA with 5 landmarks (keypoint evaluation mode, all 5 keypoints count).

    Images are read from ``root/img_celeba/``; the splits are the paper's landmark lists shipped
    with the package (45,609 training images, 283 MAFL test images) unless ``train_list`` /
    ``test_list`` are given, in the same ``name,x1,y1,...,x5,y5`` syntax. Validation, test and
    predict use the test list; ``index`` is the line position in the list. As in the authors'
    loader, every image is first squashed to S×S (bilinear without antialiasing, like their
    ``cv2.resize``) on both splits; training then flips and applies the random affine to the
    squashed image. Evaluation items carry ``keypoints`` (5, 2) (eyes, nose, mouth corners) in
    pixels of the S×S image (x·S/W, y·S/H) and ``visible`` (all True). ``label`` is -1.

    Keypoint regression (KPR, ``KeypointRegressionEvaluation``) follows PDiscoNet's CelebA
    protocol by default: coordinates in the isotropic frame (the image resized to shorter side
    S; items carry ``isotropic_scale``, the factors from the squashed S×S input to that frame), the
    error divided by the inter-ocular distance, and the regression fitted on MAFL's training
    images whose face box covers at least 30 % of the image (:meth:`build_keypoint_fit_dataset`).

    Args:
        root: The CelebA folder that contains ``img_celeba/``.
        train_list: A training landmark list instead of the shipped ``cele_train_lm.txt``.
        test_list: A test landmark list instead of the shipped ``MAFL_test_lm.txt``.
        image_size: Side S of the square input (paper: 224).
        batch_size: Training images per batch and per process; a multiple of ``mini_group`` when it is larger.
        mini_group: Chunk size of the mini-group presence loss (paper: 8).
        eval_batch_size: Images per batch for validation, test and predict.
        num_workers: DataLoader worker processes.
        seed: Seed of the training order.
        group_by: ``"class"`` groups by label; CelebA has none (all -1), so this changes nothing.
        mask_size: Unused (CelebA has no part masks); kept for a uniform interface.
        val_fraction: Share of the training list held out for validation (with landmarks) instead of
            the test list (0: the test list, as the authors do; logged as ``val_on_test``).
        drop_last: Drop the training images that do not fill a whole global batch (default: keep them
            as one last, smaller batch, as the authors do; see :class:`PartDataModule`).
        kpr_coordinates: Frame of the keypoint regression error: ``"isotropic"`` (PDiscoNet's: the
            original image resized to shorter side S) or ``"squashed"`` (the S×S input, where the
            vertical error weighs W/H times the horizontal one).
        fit_list: KPR fitting images in the ``name,x1,y1,...,x5,y5`` syntax, instead of PDiscoNet's
            MAFL fitting set read from the dataset folder.
        input_antialias: Resize to S×S with antialiasing (True) or, as the authors' loader does on
            every split, bilinear without it (False, the default; see :class:`PartDataModule`).
    """

    #: Keypoint regression error (KPR) divides by the inter-ocular distance (keypoints 0 and 1), as PDiscoNet.
    keypoint_normalization = "interocular"

    def __init__(
        self,
        root: str,
        train_list: str | None = None,
        test_list: str | None = None,
        image_size: int = 224,
        batch_size: int = 64,
        mini_group: int = 8,
        eval_batch_size: int = 32,
        num_workers: int = 2,
        seed: int = 0,
        group_by: Literal["class"] | None = None,
        mask_size: int = 128,
        val_fraction: float = 0.0,
        drop_last: bool = False,
        kpr_coordinates: Literal["isotropic", "squashed"] = "isotropic",
        fit_list: str | None = None,
        input_antialias: bool = False,
    ) -> None:
        if kpr_coordinates not in ("isotropic", "squashed"):
            raise ValueError(f"kpr_coordinates must be 'isotropic' or 'squashed', got {kpr_coordinates!r}")
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
        self.train_list = train_list
        self.test_list = test_list
        self.kpr_coordinates = kpr_coordinates
        self.fit_list = fit_list
        self.has_keypoints = True
        self.num_keypoints = CELEBA_NUM_KEYPOINTS

    def _image_dir(self) -> str:
        root = require_root(self.root, "CelebA", _EXPECTED)
        image_dir = os.path.join(root, "img_celeba")
        if not os.path.isdir(image_dir):
            raise FileNotFoundError(f"CelebA root {root} does not contain img_celeba/; expected {_EXPECTED}")
        return image_dir

    def split_source(self, split: Split) -> Split:
        """Validation and prediction read the test split (the authors validate on it)."""
        return "train" if split == "train" else "test"

    def _eval_dataset(self, records: list[ImageRecord]) -> ImageRecordDataset:
        isotropic = self.kpr_coordinates == "isotropic"
        return ImageRecordDataset(records, self.image_size, train=False, squash=not self.input_antialias,
                                  isotropic_scale=isotropic)

    def build_dataset(self, split: Split) -> ImageRecordDataset:
        if split == "train":
            path = self.train_list or default_celeba_list("train")
            return ImageRecordDataset(read_celeba_list(path, self._image_dir()), self.image_size, train=True,
                                      squash=not self.input_antialias)
        path = self.test_list or default_celeba_list("test")
        return self._eval_dataset(read_celeba_list(path, self._image_dir()))

    def build_train_eval_dataset(self) -> ImageRecordDataset:
        path = self.train_list or default_celeba_list("train")
        return self._eval_dataset(read_celeba_list(path, self._image_dir()))

    def build_keypoint_fit_dataset(self) -> ImageRecordDataset:
        """The images the keypoint regression is fitted on (evaluation transform).

        ``fit_list`` if given; else PDiscoNet's fitting set, MAFL's training images with a face
        box over 30 % of the image, when the dataset folder (or its ``Anno/`` or ``MAFL/``) has
        :data:`MAFL_FIT_FILES`; else, with a warning naming the missing files, the training list.
        """
        image_dir = self._image_dir()
        if self.fit_list:
            return self._eval_dataset(read_celeba_list(self.fit_list, image_dir))
        root = os.path.dirname(image_dir)
        found, missing = find_mafl_fit_files(root)
        if not missing:
            return self._eval_dataset(read_mafl_fit_records(found, image_dir))
        train = self.build_train_eval_dataset()
        warnings.warn(
            f"CelebA KPR: {', '.join(missing)} not found in {root} (nor in its Anno/ or MAFL/), so the "
            f"regression is fitted on the {len(train)} training images instead of PDiscoNet's MAFL fitting "
            "set (MAFL training images with a face box over 30 % of the image); the score is not comparable "
            "with PDiscoNet's table. Add those files or pass fit_list.",
            stacklevel=2,
        )
        return train

    def check_data_extras(
        self, splits: Sequence[str]
    ) -> tuple[list[tuple[str, Callable[[], Dataset]]], list[str]]:
        """With ``test`` among ``splits``, ``mpae check-data`` also reads the KPR fitting set (fitted at test time).

        That is :meth:`build_keypoint_fit_dataset`'s set when it is ``fit_list`` or MAFL's. When
        MAFL's files are missing, all or some (the fitting then falls back on the training list
        with a warning, not an error), a note says which, where they were looked for and what
        KPR fits on instead; the training list's images are the train split's.
        """
        if "test" not in splits:
            return [], []
        root = os.path.abspath(os.path.expanduser(self.root))
        if not os.path.isdir(os.path.join(root, "img_celeba")):
            return [], []  # every split already reports the missing folder
        if self.fit_list:
            return [(f"KPR fitting set {self.fit_list}", self.build_keypoint_fit_dataset)], []
        found, missing = find_mafl_fit_files(root)
        if not missing:
            return [("KPR fitting set (MAFL)", self.build_keypoint_fit_dataset)], []
        partly = (
            f" ({', '.join(found)} found, but the MAFL set needs all three, so CelebADataModule falls back as when "
            "none is there: a warning at test time, not an error)" if found else ""
        )
        train = self.train_list or default_celeba_list("train")
        return [], [
            f"KPR fitting set: {', '.join(missing)} not found in {root} nor in its Anno/ or MAFL/{partly}; KPR "
            f"will be fitted on the training list {train} instead of PDiscoNet's MAFL fitting set, so its score "
            "is not comparable with PDiscoNet's table. Add the missing files or pass fit_list."
        ]
