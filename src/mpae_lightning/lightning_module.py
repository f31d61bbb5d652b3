"""MPAEModule: training, evaluation and prediction of MPAE with Lightning."""
from __future__ import annotations

import inspect
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import nn

from .metrics import KeypointPartMetrics, MaskPartMetrics
from .models import MPAE, is_official_state_dict, load_official_state_dict
from .models import MPAEOutput
from .models.weights import WeightsUnavailableError, is_local_file, is_random, load_state_dict_file

#: MPAE's settings as MPAEModule forwards them (name -> default); built objects stay Python-only.
MODEL_SETTINGS = {
    name: param.default
    for name, param in inspect.signature(MPAE).parameters.items()
    if name not in ("vgg_features", "backbone_module")
}
#: Hyper-parameters older versions saved that are no longer settings (ignored when loading).
LEGACY_SETTINGS = {"num_visualize"}

#: The frozen public weights, per part: (state-dict prefix, the setting that rebuilds them).
FROZEN_PARTS = {
    "backbone": ("model.backbone.", "backbone_weights"),
    "vgg": ("model.restoration_loss.features.", "vgg_weights"),
}
#: Checkpoint key listing the frozen parts a checkpoint was saved without, with their sources.
FROZEN_RECORD = "mpae_frozen_weights"


def frozen_parts_left_out(checkpoint_path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The frozen parts ``checkpoint_path`` was saved without (``{}`` if self-contained), with their sources.

    Memory-maps the file, so only the small records are read.
    """
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", mmap=True, weights_only=False)
    except RuntimeError:  # not a zip-format file: mmap is unsupported
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
    return dict(checkpoint.get(FROZEN_RECORD) or {})


#: Validation scores shown in the progress bar; the first one present is also ``hp_metric``.
MAIN_SCORES = ("keypoint_nmi", "mask_nmi")


class MPAEModule(LightningModule):
    """MPAE with its losses, Adam + MultiStepLR, NMI/ARI evaluation and part-map prediction.

    Precision, devices, DDP, gradient clipping (the paper clips at 2.0) and
    accumulation come from the Trainer. The frozen backbone and VGG stay in eval
    mode. Image size and mini-group are normally linked from the DataModule by the
    ``mpae`` CLI; in Python they are checked against the DataModule at ``setup``.

    Every setting of :class:`~mpae_lightning.models.MPAE` (``num_parts``, ``image_size``,
    the widths and depths, the loss weights, ``l1_weight``, ``norm_eps``,
    ``eval_scale_factor`` ...) is passed through ``**model_kwargs`` and written once, in
    MPAE; LightningCLI follows the forwarding, so each is ``--model.init_args.<name>``
    and ``mpae fit --model.help MPAEModule`` documents it. All of them, defaults
    included, are saved in the hyper-parameters.

    Args:
        lr: Adam learning rate (authors' code 5e-4; the supplement says 5e-3).
        weight_decay: Adam weight decay (paper: none).
        milestones: MultiStepLR epochs.
        gamma: MultiStepLR factor.
        weights: initial weights: an authors' ``.pth`` (e.g. ``CUB_K16.pth``) or one of our
            Lightning ``.ckpt`` files; detected from the keys.
        frozen_weights_in_checkpoint: save the frozen DINOv2 and VGG-19 weights in every
            checkpoint (default: self-contained files that load offline). ``false`` leaves
            them out (about 398 MB less per file at CUB settings) and records their
            sources (``backbone``, ``backbone_weights``, ``vgg_weights``); loading then
            rebuilds them from those sources, so it needs the network or local files.
            Randomly initialised frozen parts are always kept.
        compile: ``torch.compile`` the transformer blocks and the part-map losses
            (:meth:`MPAE.compile_regions`) when a fit/validate/test/predict starts. Off by default:
            it pays on GPUs, and the first steps then spend up to a minute compiling.
        **model_kwargs: the settings of :class:`~mpae_lightning.models.MPAE`.
    """

    def __init__(
        self,
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        milestones: list[int] | None = None,
        gamma: float = 0.2,
        weights: str | None = None,
        frozen_weights_in_checkpoint: bool = True,
        compile: bool = False,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        for legacy in LEGACY_SETTINGS.intersection(model_kwargs):
            model_kwargs.pop(legacy)  # saved by older versions; no longer a model setting
        unknown = sorted(set(model_kwargs) - set(MODEL_SETTINGS))
        if unknown:
            raise TypeError(f"MPAEModule got unknown settings {unknown}; MPAE's settings are {sorted(MODEL_SETTINGS)}")
        self.save_hyperparameters()
        # Every MPAE setting, defaults included, so a checkpoint does not depend on today's defaults.
        self.hparams.update({k: v for k, v in MODEL_SETTINGS.items() if k not in self.hparams})
        model_kwargs.update({k: self.hparams[k] for k in MODEL_SETTINGS})
        state, backbone_included = self._read_initial_weights(weights)
        if backbone_included:  # the file supplies the backbone: do not download it
            model_kwargs["backbone_weights"] = "random"
        # Where the frozen weights really came from ("random" also when a file supplied them).
        self._frozen_sources = {"backbone": model_kwargs["backbone_weights"], "vgg": model_kwargs["vgg_weights"]}
        # Built objects are Python-only (MPAE itself takes them); LightningCLI offers the rest.
        self.model = MPAE(vgg_features=None, backbone_module=None, **model_kwargs)
        if state is not None:
            self._load_initial_weights(state, weights)
        self.metrics = nn.ModuleDict()

    # ----------------------------------------------------------------- weights
    @staticmethod
    def _read_initial_weights(weights: str | None) -> tuple[dict[str, torch.Tensor] | None, bool]:
        if not weights:
            return None, False
        state = load_state_dict_file(weights, "weights")
        if is_official_state_dict(state):
            return state, any(k.removeprefix("module.").startswith("backbone1.") for k in state)
        if any(k.startswith("model.") for k in state):
            return state, any(k.startswith("model.backbone.") for k in state)
        raise ValueError(
            f"weights={weights}: neither an official MPAE checkpoint (compress_layer./Transformer./Decoder. keys) "
            f"nor an mpae-lightning checkpoint (model.* keys); found e.g. {list(state)[:5]}"
        )

    def _load_initial_weights(self, state: dict[str, torch.Tensor], source: str | None) -> None:
        if is_official_state_dict(state):
            load_official_state_dict(self.model, state)
            return
        own = self.state_dict()
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in state and not k.startswith(("model.backbone.", "model.restoration_loss."))]
        if mismatched or missing:
            raise ValueError(
                f"weights={source} does not fit this configuration: shape mismatches {mismatched[:5]}, "
                f"missing {missing[:5]} (check num_parts, image_size and the widths)"
            )
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> "MPAEModule":  # type: ignore[override]
        """As Lightning's, but builds only what the checkpoint lacks.

        A self-contained checkpoint (the default) holds the backbone and VGG weights, so
        nothing is downloaded (VGG is lazy and marked ready by the checkpoint). One saved
        with ``frozen_weights_in_checkpoint=False`` rebuilds them from the sources it
        records; offline, pass local files as ``backbone_weights=`` / ``vgg_weights=``.
        """
        left_out = frozen_parts_left_out(checkpoint_path)
        if "backbone" not in left_out:
            kwargs.setdefault("backbone_weights", "random")
        kwargs.setdefault("weights", None)
        needs = (f"{checkpoint_path} was saved without the frozen {' and '.join(left_out)} weights "
                 f"(frozen_weights_in_checkpoint=false), so they are rebuilt from their sources {left_out}")
        for part, info in left_out.items():
            setting = FROZEN_PARTS[part][1]
            source = kwargs.get(setting, info[setting])
            if is_local_file(source) and not Path(source).expanduser().is_file():
                raise WeightsUnavailableError(
                    f"{needs}, but {setting}={source} does not exist: pass {setting}=<a local copy> (CLI: "
                    f"--model.init_args.{setting})"
                )
        try:
            return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
        except WeightsUnavailableError as err:
            raise WeightsUnavailableError(f"{needs}: {err}") from None

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave the frozen pretrained weights out when asked, recording where they come from."""
        if self.hparams.get("frozen_weights_in_checkpoint", True):
            return
        state, record = checkpoint["state_dict"], {}
        for part, (prefix, setting) in FROZEN_PARTS.items():
            source = self._frozen_sources[part]
            if is_random(source):
                continue  # random weights cannot be rebuilt: they stay in the file
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
            record[part] = {setting: source}
        if "backbone" in record:
            record["backbone"].update(backbone=self.hparams.backbone, backbone_kwargs=self.hparams.backbone_kwargs)
        checkpoint[FROZEN_RECORD] = record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Fill the frozen weights a checkpoint left out from this module's own (built from their sources)."""
        record = checkpoint.get(FROZEN_RECORD) or {}
        state, own = checkpoint["state_dict"], self.state_dict()
        for part, info in record.items():
            prefix, setting = FROZEN_PARTS[part]
            if is_random(self._frozen_sources[part]):
                raise ValueError(
                    f"this checkpoint was saved without the frozen {part} weights (frozen_weights_in_checkpoint=false; "
                    f"source {info}), but this model built them randomly: set {setting}={info[setting]!r} "
                    f"(or a local copy of those weights) to load it"
                )
            if part == "backbone":  # a VGG without keys stays lazy and resolves its source on first use
                state.update({k: v for k, v in own.items() if k.startswith(prefix)})

    # ------------------------------------------------------------------ set-up
    def configure_model(self) -> None:
        """Compile the model's regions if asked (idempotent: Lightning calls this for every stage)."""
        if self.hparams.compile:
            self.model.compile_regions()

    def setup(self, stage: str) -> None:
        resuming = self._trainer is not None and bool(self._trainer.ckpt_path)
        if stage in ("fit", "validate") and not resuming:
            # Fail fast (offline, missing file) before any data is read. With a ckpt_path the
            # checkpoint, restored after setup, normally carries VGG; else the first loss fetches it.
            self.model.resolve_vgg()
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None:
            return
        for name in ("image_size", "mini_group"):
            value = getattr(datamodule, name, None)
            own = self.hparams[name]
            if value is not None and value != own:
                raise ValueError(
                    f"model.{name}={own} but data.{name}={value}; they must agree "
                    "(the mpae CLI links them from the data section)"
                )
        self.build_metrics(
            num_keypoints=datamodule.num_keypoints if getattr(datamodule, "has_keypoints", False) else 0,
            num_mask_labels=datamodule.num_mask_labels if getattr(datamodule, "has_masks", False) else 0,
        )

    def on_fit_start(self) -> None:
        # Lightning warns about every module in eval mode when training starts; the frozen
        # backbone and VGG are so on purpose. Silence exactly that count, so any other
        # module left in eval mode is still reported.
        roots = ("model.backbone", "model.restoration_loss.features")
        frozen = [name for name, _ in self.named_modules() if name in roots or name.startswith(tuple(f"{r}." for r in roots))]
        if frozen:
            message = re.escape(f"Found {len(frozen)} module(s) in eval mode at the start of training")
            warnings.filterwarnings("ignore", message=message)

    def build_metrics(self, num_keypoints: int = 0, num_mask_labels: int = 0) -> None:
        """Create the val/test metrics for the data's annotations (called from ``setup``)."""
        k1 = self.model.num_parts + 1
        for split in ("val", "test"):
            if num_keypoints and f"{split}_keypoint" not in self.metrics:
                self.metrics[f"{split}_keypoint"] = KeypointPartMetrics(num_keypoints, k1)
            if num_mask_labels and f"{split}_mask" not in self.metrics:
                self.metrics[f"{split}_mask"] = MaskPartMetrics(num_mask_labels, k1)

    def configure_optimizers(self) -> dict[str, Any]:
        params = self.model.trainable_parameters()
        optimizer = torch.optim.Adam(
            params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=self._fused_adam(params) or None
        )
        milestones = self.hparams.milestones or []
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=list(milestones), gamma=self.hparams.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    def _fused_adam(self, params: list[nn.Parameter]) -> bool:
        """Adam's fused kernel (one pass over all parameters) where the Trainer allows it.

        Why: on the CPU the default Adam is a Python loop of ~8 kernels per parameter (20 ms a
        step for MPAE's 139 tensors; fused: 8 ms). Lightning refuses gradient clipping with fused
        optimizers under mixed precision (they unscale internally), so those keep the default.
        """
        from lightning.pytorch.plugins.precision import DoublePrecision, Precision

        try:
            from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
        except ImportError:  # pragma: no cover - a torch without the helper: keep the default
            return False
        trainer = self._trainer
        if trainer is None or type(trainer.precision_plugin) not in (Precision, DoublePrecision):
            return False
        devices = _get_fused_kernels_supported_devices()
        return bool(params) and all(p.device.type in devices and p.is_floating_point() for p in params)

    # ---------------------------------------------------------------- training
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K+1, m, m) part probabilities at evaluation resolution."""
        return self.model.predict_parts(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        out = self.model.compute_losses(batch["image"])
        self.last_train_losses = {k: v.detach() for k, v in out.losses.items()}  # NonFiniteGuard names bad terms
        self._log_losses("train", out.losses, batch["image"].shape[0], on_step=True)
        return out.total

    def _log_losses(self, stage: str, losses: dict[str, torch.Tensor], batch_size: int, on_step: bool) -> None:
        # Every scalar: the terms of MPAE's LOSS_TERMS, their parts and the total, each once under
        # its own name; the total is also what the progress bar shows.
        for name in [k for k, v in losses.items() if v.ndim == 0]:
            self.log(f"{stage}/{name}", losses[name].detach().float(), on_step=on_step, on_epoch=not on_step,
                     batch_size=batch_size, sync_dist=not on_step, prog_bar=name == "total")

    def on_train_epoch_start(self) -> None:
        # MultiStepLR steps per epoch, so one value per epoch is the whole schedule.
        optimizer = self.optimizers(use_pl_optimizer=False)
        self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=False, on_epoch=True, sync_dist=False)

    # -------------------------------------------------------------- evaluation
    def _update_metrics(self, batch: dict[str, Any], stage: str, probs: torch.Tensor) -> None:
        if f"{stage}_keypoint" in self.metrics and "keypoints" in batch:
            self.metrics[f"{stage}_keypoint"].update(probs, batch["keypoints"], batch["visible"], self.model.image_size)
        if f"{stage}_mask" in self.metrics and "mask" in batch:
            self.metrics[f"{stage}_mask"].update(probs, batch["mask"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> MPAEOutput:
        # One pass gives all: losses (masking noise fixed by the sample index, so validation
        # curves are comparable), the part map scored by the metrics, and the picture's tensors.
        out = self.validation_outputs(batch["image"], batch["index"])
        self._update_metrics(batch, "val", self.model.part_probabilities(out.logits))
        self._log_losses(self.log_prefix("val"), out.losses, batch["image"].shape[0], on_step=False)
        return out  # handed to PartVisualization; Lightning keeps no validation outputs

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        probs = self.model.predict_parts(batch["image"])
        self._update_metrics(batch, "test", probs)
        return probs  # handed to test-time callbacks (e.g. KeypointRegressionEvaluation); not kept by Lightning

    def validation_outputs(self, images: torch.Tensor, index: torch.Tensor) -> MPAEOutput:
        """Losses, part logits and restored images with the masking noise fixed by each sample's
        dataset index, so validation losses and pictures are comparable across epochs."""
        return self.model.compute_losses(images, noise=self._fixed_noise(index))

    def _fixed_noise(self, index: torch.Tensor) -> torch.Tensor:
        rows = []
        for i in index.tolist():
            gen = torch.Generator().manual_seed(int(i))
            rows.append(torch.rand(self.model.num_patches, generator=gen))
        return torch.stack(rows).to(self.device)

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, stage: str) -> dict[str, float]:
        """Compute (this syncs the contingency tables across processes), log and reset.

        Names say what is scored: ``keypoint_*`` (part labels read at the annotated
        keypoints) and ``mask_*`` (part map against the ground-truth part masks), under
        :meth:`log_prefix` of the stage.
        """
        results: dict[str, float] = {}
        for kind in ("keypoint", "mask"):
            metric = self.metrics[f"{stage}_{kind}"] if f"{stage}_{kind}" in self.metrics else None
            if metric is None:
                continue
            scores = {k: float(v) for k, v in metric.compute().items()}
            metric.reset()
            parts = scores.pop("parts_per_image")  # the same count in both: logged once
            results.update({f"{kind}_{k}": v for k, v in scores.items()})
            results.setdefault("parts_per_image", parts)
        prefix = self.log_prefix(stage)
        for name, value in results.items():
            # Identical on every rank already, so no further reduction.
            self.log(f"{prefix}/{name}", value, prog_bar=name in MAIN_SCORES, sync_dist=False)
        main = next((results[k] for k in MAIN_SCORES if k in results), None)
        if stage == "val" and main is not None and self.trainer.state.fn == "fit":
            # TensorBoard's HPARAMS tab compares runs by hp_metric (otherwise stuck at -1).
            self.log("hp_metric", main, sync_dist=False)
        return results

    def log_prefix(self, stage: str) -> str:
        """``val``, ``test``; validation on other images than a validation split says so.

        CUB, CelebA and PartImageNet validate on the test split, as the authors do, so
        their validation scores are logged as ``val_on_test/...``;
        ``ImageFolderDataModule`` without a hold-out validates on its training images
        (``val_on_train/...``). With ``val_fraction > 0`` (a held-out slice of the
        training split) it is plain ``val/...``.
        """
        if stage != "val":
            return stage
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        source = getattr(datamodule, "val_split", "val")
        return "val" if source in ("val", "holdout") else f"val_on_{source}"

    # -------------------------------------------------------------- prediction
    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        probs = self.model.predict_parts(batch["image"])
        # Only the small label maps are returned: Trainer.predict keeps every prediction in memory.
        return {
            "labels": probs.argmax(dim=1).to(torch.uint8 if probs.shape[1] <= 256 else torch.int32).cpu(),
            "index": batch["index"].cpu(),
            "path": batch.get("path"),
            "num_parts": probs.shape[1],
        }
