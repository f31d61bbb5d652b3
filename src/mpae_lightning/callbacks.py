"""Callbacks: a part-map picture every validation epoch, predicted part maps written to disk, and
the keypoint regression error at test time."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Sequence

import numpy as np
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback
from torch.utils.data import DataLoader
from torchvision.transforms.functional import pil_to_tensor

from .data.base import load_rgb
from .data.samplers import EvalShardSampler
from .metrics.keypoint_regression import KeypointRegression
from .runs import rank_zero_log_dir
from .visualize import (
    MIN_PANEL,
    label_grid,
    main_score,
    part_grid,
    picture_title,
    resize_labels,
    save_grid,
    save_label_png,
)


def describe_model(trainer: Any, pl_module: Any) -> tuple[str, int | None, tuple[str, float] | None]:
    """(model name, epoch, main score) for a picture's title (:func:`~mpae_lightning.visualize.picture_title`).

    While fitting: the run folder, the current epoch and the validation score logged so far.
    Otherwise: the checkpoint file (``trainer.ckpt_path``, or the file the module was loaded
    from), its epoch and the main score its ``ModelCheckpoint`` recorded (if it monitored one),
    the authors' weights file it was built from, or ``"untrained"``.
    """
    from .lightning_module import MAIN_SCORES

    state = getattr(trainer, "state", None)
    if trainer is not None and getattr(state, "fn", None) is not None and state.fn.value == "fit":
        log_dir = rank_zero_log_dir(trainer)  # not trainer.log_dir: only rank 0 draws, and that one broadcasts
        run = "/".join(Path(log_dir).parts[-2:]) if log_dir else "this run"
        prefix = pl_module.log_prefix("val") if hasattr(pl_module, "log_prefix") else "val"
        return f"run {run}", trainer.current_epoch, main_score(trainer.callback_metrics, prefix, MAIN_SCORES)
    summary = getattr(pl_module, "checkpoint_summary", None) or {}
    ckpt = getattr(trainer, "ckpt_path", None) or summary.get("name")
    if ckpt:
        return Path(str(ckpt)).name, summary.get("epoch"), summary.get("score")
    hparams = getattr(pl_module, "hparams", {}) or {}
    if hparams.get("weights"):
        return Path(str(hparams["weights"])).name, None, None
    return "untrained", None, None


class PartVisualization(Callback):
    """Draw the first validation images with their parts every validation epoch.

    The grid (image | overlay | part map | ground truth | restored) goes to every logger
    whose ``experiment`` has ``add_image`` (TensorBoard) under ``<validation prefix>/parts``
    (``val/parts``, or ``val_on_test/parts`` when validation runs on the test split); when
    no logger can show images (CSV logger, no logger) it is written as a PNG file instead.
    Only global rank 0 draws; sanity-check validation is skipped.

    Args:
        num_images: images in the grid (0 turns the callback off).
        every_n_epochs: draw on every n-th validation epoch.
        tile: side of each tile in pixels (raised to at least 256, ``visualize.MIN_PANEL``, with nearest
            upscaling of the label maps).
        dirpath: folder for the PNG fallback (default: ``<log_dir>/images``, or
            ``<default_root_dir>/images`` without a logger).
    """

    def __init__(
        self, num_images: int = 8, every_n_epochs: int = 1, tile: int = MIN_PANEL, dirpath: str | None = None
    ) -> None:
        super().__init__()
        if num_images < 0 or every_n_epochs < 1 or tile < 8:
            raise ValueError(
                f"PartVisualization needs num_images >= 0, every_n_epochs >= 1 and tile >= 8, "
                f"got {num_images}, {every_n_epochs}, {tile}"
            )
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.tile = tile
        self.dirpath = dirpath
        self._batch: dict[str, Any] | None = None
        self._outputs: SimpleNamespace | None = None

    @torch.no_grad()
    def render(
        self,
        pl_module: LightningModule,
        batch: dict[str, Any],
        datamodule: Any = None,
        outputs: Any = None,
        title: str | None = None,
    ) -> np.ndarray:
        """The grid of the first ``num_images`` of ``batch`` as (H, W, 3) uint8 RGB.

        ``pl_module`` must provide ``validation_outputs(images, index)`` and ``model`` (as
        :class:`~mpae_lightning.MPAEModule` does); ``datamodule`` supplies the ground-truth
        label count and names (``num_mask_labels``, ``part_names``), if it has masks.
        ``outputs`` (with ``logits`` and ``restored``) reuses a forward already made on
        ``batch``, as the validation step's; without it the images are run once here.
        ``title`` is drawn above the grid (see :func:`~mpae_lightning.visualize.picture_title`).
        """
        n = self.num_images
        images = batch["image"][:n]
        out = outputs if outputs is not None else pl_module.validation_outputs(images, batch["index"][:n])
        mask = batch.get("mask")
        names = getattr(datamodule, "part_names", None) if mask is not None else None
        return part_grid(
            images,
            pl_module.model.part_probabilities(out.logits[:n]),
            restored=out.restored[:n],
            ground_truth=mask[:n] if mask is not None else None,
            num_gt_labels=getattr(datamodule, "num_mask_labels", None) or None,
            label_names=names or None,
            tile=self.tile,
            title=title,
        )

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if (
            batch_idx != 0
            or dataloader_idx != 0
            or self.num_images == 0
            or trainer.sanity_checking
            or not trainer.is_global_zero
            or trainer.current_epoch % self.every_n_epochs != 0
        ):
            return
        n = self.num_images
        self._batch = {k: v[:n].detach() for k, v in batch.items() if isinstance(v, torch.Tensor)}
        # The validation step's own forward (MPAEModule returns it), so the picture costs no second pass.
        if hasattr(outputs, "logits") and hasattr(outputs, "restored"):
            self._outputs = SimpleNamespace(logits=outputs.logits[:n].detach(), restored=outputs.restored[:n].detach())

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Drawn at validation end, not epoch end: by then the module has logged this epoch's
        # scores, so the title can show the main one (``trainer.callback_metrics``).
        batch, self._batch = self._batch, None
        outputs, self._outputs = self._outputs, None
        if batch is None:
            return
        # Same prefix as the validation scores (e.g. ``val_on_test`` when validating on the test split).
        prefix = pl_module.log_prefix("val") if hasattr(pl_module, "log_prefix") else "val"
        num_parts = getattr(getattr(pl_module, "model", None), "num_parts", None)
        title = picture_title(*describe_model(trainer, pl_module), num_parts=num_parts)
        grid = self.render(pl_module, batch, getattr(trainer, "datamodule", None), outputs, title=title)
        self.log_grid(trainer, grid, f"{prefix}/parts", title=title)

    def log_grid(
        self, trainer: Trainer, grid: np.ndarray, tag: str = "val/parts", title: str | None = None
    ) -> list[str]:
        """Send ``grid`` to the loggers that show images, else write a PNG (``title`` in its metadata);
        returns where it went."""
        sent = []
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if experiment is not None and hasattr(experiment, "add_image"):
                experiment.add_image(tag, grid, trainer.global_step, dataformats="HWC")
                sent.append(type(logger).__name__)
        if sent:
            return sent
        folder = Path(self.dirpath or os.path.join(rank_zero_log_dir(trainer) or trainer.default_root_dir, "images"))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{tag.replace('/', '_')}_epoch={trainer.current_epoch:03d}_step={trainer.global_step:06d}.png"
        save_grid(path, grid, title=title)
        return [str(path)]


class PartPredictionWriter(BasePredictionWriter):
    """For every predicted image, write ``<name>_parts.png`` (palette PNG, pixel = part id,
    background = K), ``<name>_parts.npy`` (the same labels) and ``<name>_overlay.png``
    (image | overlay | part map, with column headers and a legend of the parts present).

    The part map is of the squashed S x S network input. With ``resolution="original"`` the
    labels are resized (nearest) to each image file's own width and height and the overlay is
    drawn on the original image; items without an image file (synthetic data) are their own
    original.

    Args:
        output_dir: folder for the files (created if missing).
        resolution: ``"map"`` (the evaluation map, e.g. 128 x 128) or ``"original"`` (the image file's W x H).
    """

    def __init__(self, output_dir: str = "predictions", resolution: Literal["map", "original"] = "map") -> None:
        super().__init__(write_interval="batch")
        if resolution not in ("map", "original"):
            raise ValueError(f"PartPredictionWriter resolution must be 'map' or 'original', got {resolution!r}")
        self.output_dir = output_dir
        self.resolution = resolution
        self.images_written = 0  # this process's counts in the current predict run (mpae reports them)
        self.files_written = 0

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.images_written = self.files_written = 0

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        out = Path(self.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        labels, num_parts = prediction["labels"], prediction["num_parts"]
        paths = prediction.get("path") or [None] * labels.shape[0]
        title = None
        if pl_module is not None:  # which checkpoint, epoch and score (K = num_parts - 1 foreground parts)
            title = picture_title(*describe_model(trainer, pl_module), num_parts=num_parts - 1)
        for i in range(labels.shape[0]):
            stem = prediction_stem(int(prediction["index"][i]), paths[i])
            image, normalized = batch["image"][i].detach().cpu(), True
            if self.resolution == "original" and paths[i] and os.path.isfile(str(paths[i])):
                image, normalized = pil_to_tensor(load_rgb(str(paths[i]))).float() / 255.0, False
            size = tuple(image.shape[-2:]) if self.resolution == "original" else tuple(labels.shape[-2:])
            part_ids = resize_labels(labels[i].numpy(), size)  # type: ignore[arg-type]
            self.files_written += len(write_part_files(out, stem, part_ids, num_parts, image, normalized, title))
            self.images_written += 1


def prediction_stem(index: int, source: str | os.PathLike[str] | None) -> str:
    """``<index, 6 digits>_<file stem>`` (the index alone without a file): how an image's files are named."""
    stem = f"{int(index):06d}"
    return f"{stem}_{Path(str(source)).stem.replace(os.sep, '_')}" if source else stem


def write_part_files(
    folder: Path,
    stem: str,
    part_ids: np.ndarray,
    num_labels: int,
    image: torch.Tensor,
    normalized: bool,
    title: str | None = None,
) -> list[Path]:
    """Write one image's ``<stem>_parts.png``, ``<stem>_parts.npy`` and ``<stem>_overlay.png``; return them.

    The one writer of ``mpae predict`` (:class:`PartPredictionWriter`) and ``mpae parts``, so both
    write the same files.

    Args:
        folder: an existing folder.
        stem: file name prefix (:func:`prediction_stem`).
        part_ids: (H, W) integer labels, background = ``num_labels - 1``.
        num_labels: K + 1.
        image: (3, h, w) the picture under the overlay: the network input (``normalized``) or the
            original image in [0, 1].
        normalized: whether ``image`` is ImageNet-normalised.
        title: the overlay's title line (:func:`~mpae_lightning.visualize.picture_title`).
    """
    files = [folder / f"{stem}_parts.png", folder / f"{stem}_parts.npy", folder / f"{stem}_overlay.png"]
    save_label_png(files[0], part_ids, num_labels)
    np.save(files[1], part_ids.astype(np.uint8 if num_labels <= 256 else np.int32))  # as predict_step's labels
    tile = tuple(image.shape[-2:])  # raised to >= MIN_PANEL a side by label_grid (nearest for the labels)
    panel = label_grid(image[None], part_ids[None], num_labels, tile=tile, normalized=normalized,  # type: ignore[arg-type]
                       title=title)
    save_grid(files[2], panel, title=title)
    return files


class KeypointRegressionEvaluation(Callback):
    """Report the keypoint regression error (KPR) of PDiscoNet/PDiscoFormer at test time.

    At the start of testing the regression from part centroids to keypoints is fitted on
    the DataModule's fitting images without augmentation (``build_keypoint_fit_dataset()`` when
    the DataModule has it, e.g. CelebA's MAFL fitting set, else ``build_train_eval_dataset()``;
    sharded across processes like evaluation); the test split is then scored and logged as
    ``test/keypoint_regression_error`` (percent, lower is better). Data without keypoints is
    skipped. Items with ``isotropic_scale`` (CelebA) are measured in PDiscoNet's isotropic frame.
    Opt in from the command line with
    ``--trainer.callbacks+=mpae_lightning.callbacks.KeypointRegressionEvaluation``.

    Args:
        normalization: ``"auto"`` uses the DataModule's ``keypoint_normalization`` attribute
            (CelebA: ``"interocular"``), else ``"bbox"`` when batches carry ``box`` and
            ``"image"`` otherwise; or name one of ``"bbox"``, ``"interocular"``, ``"image"``.
        max_fit_images: fit on at most this many training images per process (None: all).
        centroids: the map the part centroids are taken from: ``"grid"`` (default, as
            PDiscoNet and PDiscoFormer: the native patch-grid probabilities) or ``"eval_map"``
            (the upsampled evaluation map NMI/ARI read, 128×128 in the paper).
    """

    def __init__(
        self,
        normalization: Literal["auto", "bbox", "interocular", "image"] = "auto",
        max_fit_images: int | None = None,
        centroids: Literal["grid", "eval_map"] = "grid",
    ) -> None:
        super().__init__()
        if normalization not in ("auto", "bbox", "interocular", "image"):
            raise ValueError(f"normalization must be 'auto', 'bbox', 'interocular' or 'image', got {normalization!r}")
        if centroids not in ("grid", "eval_map"):
            raise ValueError(f"centroids must be 'grid' or 'eval_map', got {centroids!r}")
        self.normalization = normalization
        self.max_fit_images = max_fit_images
        self.centroids = centroids
        self.metric: KeypointRegression | None = None

    def _normalization(self, datamodule: Any, dataset: Any) -> str:
        if self.normalization != "auto":
            return self.normalization
        declared = getattr(datamodule, "keypoint_normalization", None)
        if declared:
            return declared
        return "bbox" if len(dataset) and "box" in dataset[0] else "image"

    @torch.no_grad()
    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        datamodule = getattr(trainer, "datamodule", None)
        self.metric = None
        if datamodule is None or not getattr(datamodule, "has_keypoints", False):
            return
        build = getattr(datamodule, "build_keypoint_fit_dataset", None) or getattr(
            datamodule, "build_train_eval_dataset", None
        )
        if build is None:
            raise TypeError(f"{type(datamodule).__name__} has no build_train_eval_dataset(): KPR needs training images with keypoints")
        dataset = build()
        normalization = self._normalization(datamodule, dataset)
        self.metric = KeypointRegression(
            pl_module.model.num_parts, datamodule.num_keypoints, normalization=normalization
        ).to(pl_module.device)
        sampler = EvalShardSampler(len(dataset), num_replicas=trainer.world_size, rank=trainer.global_rank)
        loader = DataLoader(dataset, batch_size=datamodule.eval_batch_size, sampler=sampler,
                            num_workers=getattr(datamodule, "num_workers", 0))
        seen = 0
        for batch in loader:
            if self.max_fit_images is not None and seen >= self.max_fit_images:
                break
            self._update(pl_module, batch, None, "fit")
            seen += batch["image"].shape[0]
        self.metric.fit()

    def _update(self, pl_module: LightningModule, batch: dict[str, Any], outputs: Any, split: str) -> None:
        assert self.metric is not None
        # test_step hands over {"part_probs", "grid_probs"}; otherwise the map is computed here.
        key = "grid_probs" if self.centroids == "grid" else "part_probs"
        probs = outputs.get(key) if isinstance(outputs, dict) else None
        if not isinstance(probs, torch.Tensor) or probs.ndim != 4:
            scale = 1.0 if self.centroids == "grid" else None
            probs = pl_module.model.predict_parts(batch["image"].to(pl_module.device), scale_factor=scale)
        box, frame = batch.get("box"), batch.get("isotropic_scale")
        self.metric.update(probs, batch["keypoints"].to(probs.device), batch["visible"].to(probs.device),
                           pl_module.model.image_size, boxes=box.to(probs.device) if box is not None else None,
                           split=split,  # type: ignore[arg-type]
                           coordinate_scale=frame.to(probs.device) if frame is not None else None)

    @torch.no_grad()
    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self.metric is not None:
            self._update(pl_module, batch, outputs, "eval")

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.metric is not None:
            # compute() sums the error statistics of all processes: identical on every rank.
            pl_module.log("test/keypoint_regression_error", self.metric.compute(), sync_dist=False)
            self.metric = None
