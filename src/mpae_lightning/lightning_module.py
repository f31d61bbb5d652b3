"""MPAEModule: training, evaluation and prediction of MPAE with Lightning."""
from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from torch import nn

from .losses import MPAELoss
from .metrics import ForegroundMaskMetrics, KeypointPartMetrics, MaskPartMetrics
from .models import MPAE, MPAEOutput, is_official_state_dict, load_official_state_dict
from .models.backbone import DEFAULT_BACKBONE
from .models.weights import WeightsUnavailableError, is_local_file, is_random, load_state_dict_file
from .pretrained import PretrainedMixin

#: Settings the data section decides; the ``mpae`` CLI copies them from ``data.init_args`` and
#: :meth:`MPAEModule.setup` checks them against a DataModule in Python.
LINKED_FROM_DATA = ("image_size", "mini_group", "input_antialias")

#: Settings a trained checkpoint fixes: they decide the network's parameters or its function. Given
#: differently next to a checkpoint (``--ckpt_path``, ``load_from_checkpoint(**kwargs)``) they are
#: refused; other settings (evaluation map size, loss weights, learning rate ...) may be changed.
FIXED_BY_CHECKPOINT = (
    "num_parts", "image_size", "feature_dim", "backbone", "backbone_kwargs", "backbone_dim", "patch_size",
    "descriptor_width", "descriptor_depth", "descriptor_heads", "encoder_width", "encoder_depth",
    "encoder_heads", "decoder_depth", "decoder_heads", "restore_patch", "norm_eps",
)

#: Where each frozen network lives in the state dict, and the setting that rebuilds it.
FROZEN_PARTS = {
    "backbone": ("model.backbone.", "backbone_weights"),
    "vgg": ("loss.restoration.features.", "vgg_weights"),
}
#: Checkpoint key listing the frozen parts a checkpoint was saved without, with their sources.
FROZEN_RECORD = "mpae_frozen_weights"
#: State-dict prefixes of version 0.1.0 (VGG inside the model) -> today's (VGG inside the loss).
RENAMED_PREFIXES = {"model.restoration_loss.features.": "loss.restoration.features."}
#: Keys of version 0.1.0 that no longer exist (VGG's "ready" flag: a checkpoint's VGG is its weights).
REMOVED_KEYS = ("loss.restoration.features.ready",)
#: Devices whose Adam has a fused kernel (torch.optim.Adam ``fused=True``).
FUSED_ADAM_DEVICES = ("cpu", "cuda")


def upgrade_state_dict(state: dict[str, Any]) -> dict[str, Any]:
    """A state dict of any released version in today's key names (in place; returns it)."""
    for key in list(state):
        for old, new in RENAMED_PREFIXES.items():
            if key.startswith(old):
                state[new + key[len(old):]] = state.pop(key)
                key = new + key[len(old):]
        if key in REMOVED_KEYS:
            del state[key]
    return state


def frozen_parts_left_out(checkpoint_path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The frozen parts ``checkpoint_path`` was saved without (``{}`` if self-contained), with their sources.

    Read with ``weights_only=True`` (a checkpoint never runs code) and memory-mapped, so only
    the small records are read.
    """
    from .runs import read_checkpoint

    return dict(read_checkpoint(str(checkpoint_path)).get(FROZEN_RECORD) or {})


#: Validation scores shown in the progress bar; the first one present is also ``hp_metric``
#: (``fg_iou``: data whose only annotation is object masks, e.g. Flowers-102).
MAIN_SCORES = ("keypoint_nmi", "mask_nmi", "fg_iou")


def checkpoint_summary(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The epoch of a Lightning checkpoint and, if a ``ModelCheckpoint`` monitored one of
    :data:`MAIN_SCORES`, its score at saving (``score``: (name, value)); for picture titles."""
    from .visualize import main_score

    score = None
    for state in (checkpoint.get("callbacks") or {}).values():
        monitor = state.get("monitor") if isinstance(state, dict) else None
        value = state.get("current_score") if isinstance(state, dict) else None
        if isinstance(monitor, str) and value is not None and score is None:
            score = main_score({monitor: float(value)}, monitor.rpartition("/")[0], MAIN_SCORES)
    return {"epoch": checkpoint.get("epoch"), "score": score}


#: ``predict_precision`` values and the dtype ``predict_step`` passes to ``MPAE.predict_parts``.
PREDICT_PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "bf16": torch.bfloat16}


class MPAEModule(LightningModule, PretrainedMixin):
    """MPAE (:attr:`model`) with its training objective (:attr:`loss`), Adam + MultiStepLR,
    NMI/ARI evaluation and part-map prediction.

    ``save_pretrained(dir)`` / ``from_pretrained(dir_or_hub_id)`` / ``push_to_hub(repo_id)``
    (:class:`~mpae_lightning.pretrained.PretrainedMixin`, huggingface_hub's model mixin) write and
    read ``model.safetensors`` + ``config.json`` + a model card.

    Precision, devices, DDP and accumulation come from the Trainer; the paper's gradient
    clipping (norm 2.0) is the module's default, so a plain ``Trainer`` trains as the configs
    do. The frozen backbone and VGG stay in eval mode. Image size, mini-group and
    ``input_antialias`` are normally linked from the DataModule by the ``mpae`` CLI; in Python they
    are checked against the DataModule at ``setup``. Every setting is saved in the
    hyper-parameters, defaults included, so a checkpoint does not depend on today's defaults.

    Args:
        num_parts: K, the number of foreground parts (background is added).
        image_size: input side S (the ``mpae`` CLI takes it from the data section).
        feature_dim: C, width of the feature map, the descriptors and the decoder.
        backbone: timm name of the frozen ViT (default DINOv2 ViT-B/14 with registers).
        backbone_weights: ``"timm"`` (download), a local file (timm or Meta DINOv2 format) or ``"random"``.
        backbone_kwargs: extra ``timm.create_model`` arguments (e.g. a small random ViT for demos).
        backbone_dim: token width when ``backbone`` is ``None``.
        patch_size: patch size when ``backbone`` is ``None``.
        descriptor_width: width of the descriptor ViT.
        descriptor_depth: blocks of the descriptor ViT.
        descriptor_heads: heads of the descriptor ViT.
        encoder_width: width of the masked patch encoder.
        encoder_depth: blocks of the masked patch encoder.
        encoder_heads: heads of the masked patch encoder.
        decoder_depth: blocks of the decoder.
        decoder_heads: heads of the decoder (``None``: C // 64).
        restore_patch: side of each restored patch.
        mask_ratio: fraction of patches hidden from the encoder.
        eval_map_size: side of the evaluation map when ``eval_scale_factor`` is ``None``.
        eval_scale_factor: upsampling factor from the patch grid to the evaluation map.
        norm_eps: LayerNorm epsilon of the masked encoder and decoder.
        mini_group: chunk size of the presence loss (the ``mpae`` CLI takes it from the data section).
        presence_weight: lambda_p.
        distribution_weight: lambda_d.
        semantic_weight: lambda_s.
        l1_weight: weight of the pixel L1 inside the restoration loss.
        arcface_s: ArcFace logit scale s.
        arcface_m: ArcFace angular margin m.
        vgg_weights: ``"torchvision"`` (download on first use), a local ``.pth`` or ``"random"``.
        lr: Adam learning rate (authors' code 5e-4; the supplement says 5e-3).
        weight_decay: Adam weight decay (paper: none).
        milestones: MultiStepLR epochs.
        gamma: MultiStepLR factor.
        gradient_clip_val: clip the gradient norm at this value before each optimizer step (the
            paper: 2.0), also under a plain ``Trainer``; ``Trainer(gradient_clip_val=...)`` takes
            precedence, ``None`` or 0 turns clipping off.
        weights: initial weights: an authors' ``.pth`` (e.g. ``CUB_K16.pth``) or one of our
            Lightning ``.ckpt`` files; detected from the keys.
        frozen_weights_in_checkpoint: save the frozen DINOv2 weights in every checkpoint
            (default: self-contained files that load offline). ``false`` leaves them out and
            records their source; loading then rebuilds them from it. Public VGG-19 weights are
            never saved (they are the loss's, rebuilt from ``vgg_weights`` when training resumes);
            randomly initialised frozen weights are always kept.
        compile: ``torch.compile`` the transformer blocks and the part-map losses
            (:meth:`MPAE.compile_regions`, :meth:`MPAELoss.compile_regions`) when a
            fit/validate/test/predict starts. Off by default: it pays on GPUs.
        predict_precision: precision of ``predict_step`` (``mpae predict``) after the backbone:
            ``"32"`` (default, the authors' float32, as ``mpae test`` always scores) or ``"bf16"``
            (opt-in, faster: the backbone, descriptor ViT, F and logits run in bfloat16 via
            ``MPAE.predict_parts(dtype=torch.bfloat16)``). Measured: 99.2 % of the 128x128 map's
            labels equal float32's, 2.9x faster on a CPU with AMX (full-size model, random
            weights; ``benchmarks/RESULTS.md``, change 13). Validation and test ignore it.
        input_antialias: how :meth:`predict_images` (and ``mpae parts``) resize images to S x S:
            antialiased (default) or bilinear without antialiasing, as the authors' CelebA loader.
            The ``mpae`` CLI takes it from the data section (``CelebADataModule``: False), so a
            checkpoint predicts on new images as its training data was read.
    """

    def __init__(
        self,
        num_parts: int = 16,
        image_size: int = 224,
        feature_dim: int = 256,
        backbone: str | None = DEFAULT_BACKBONE,
        backbone_weights: str | None = "timm",
        backbone_kwargs: dict[str, Any] | None = None,
        backbone_dim: int | None = None,
        patch_size: int | None = None,
        descriptor_width: int = 256,
        descriptor_depth: int = 6,
        descriptor_heads: int = 8,
        encoder_width: int = 256,
        encoder_depth: int = 2,
        encoder_heads: int = 4,
        decoder_depth: int = 2,
        decoder_heads: int | None = None,
        restore_patch: int = 8,
        mask_ratio: float = 0.9,
        eval_map_size: int = 128,
        eval_scale_factor: float | None = None,
        norm_eps: float = 1e-5,
        mini_group: int = 8,
        presence_weight: float = 1.0,
        distribution_weight: float = 0.5,
        semantic_weight: float = 0.25,
        l1_weight: float = 0.1,
        arcface_s: float = 20.0,
        arcface_m: float = 0.5,
        vgg_weights: str | None = "torchvision",
        lr: float = 5e-4,
        weight_decay: float = 0.0,
        milestones: list[int] | None = None,
        gamma: float = 0.2,
        gradient_clip_val: float | None = 2.0,
        weights: str | None = None,
        frozen_weights_in_checkpoint: bool = True,
        compile: bool = False,
        predict_precision: Literal["32", "bf16"] = "32",
        input_antialias: bool = True,
    ) -> None:
        super().__init__()
        # Whether the weights came from somewhere (checkpoint, pretrained folder, ``weights=``, a
        # state dict): predict_images refuses untrained ones unless asked (see has_trained_weights).
        self._weights_loaded = False
        if predict_precision not in PREDICT_PRECISIONS:
            raise ValueError(f"predict_precision must be one of {', '.join(map(repr, PREDICT_PRECISIONS))}, "
                             f"got {predict_precision!r}")
        self.save_hyperparameters()
        state, backbone_included = self._read_initial_weights(weights)
        if backbone_included:  # the file supplies the backbone: do not download it
            backbone_weights = "random"
        # Where the frozen weights really came from ("random" also when a file supplied them).
        self._frozen_sources = {"backbone": backbone_weights, "vgg": vgg_weights}
        self.model = MPAE(
            num_parts=num_parts,
            image_size=image_size,
            feature_dim=feature_dim,
            backbone=backbone,
            backbone_weights=backbone_weights,
            backbone_kwargs=backbone_kwargs,
            backbone_dim=backbone_dim,
            patch_size=patch_size,
            descriptor_width=descriptor_width,
            descriptor_depth=descriptor_depth,
            descriptor_heads=descriptor_heads,
            encoder_width=encoder_width,
            encoder_depth=encoder_depth,
            encoder_heads=encoder_heads,
            decoder_depth=decoder_depth,
            decoder_heads=decoder_heads,
            restore_patch=restore_patch,
            mask_ratio=mask_ratio,
            eval_map_size=eval_map_size,
            eval_scale_factor=eval_scale_factor,
            norm_eps=norm_eps,
        )
        self.loss = MPAELoss(
            mini_group=mini_group,
            presence_weight=presence_weight,
            distribution_weight=distribution_weight,
            semantic_weight=semantic_weight,
            l1_weight=l1_weight,
            arcface_s=arcface_s,
            arcface_m=arcface_m,
            vgg_weights=vgg_weights,
        )
        if state is not None:
            self._load_initial_weights(state, weights)
        self.metrics = nn.ModuleDict()
        # Set when weights come from a Lightning checkpoint: its file name, epoch and recorded main score.
        self.checkpoint_summary: dict[str, Any] = {}

    # ----------------------------------------------------------------- weights
    @staticmethod
    def _read_initial_weights(weights: str | None) -> tuple[dict[str, torch.Tensor] | None, bool]:
        if not weights:
            return None, False
        state = load_state_dict_file(weights, "weights")
        if is_official_state_dict(state):
            return state, any(k.removeprefix("module.").startswith("backbone1.") for k in state)
        if any(k.startswith("model.") for k in state):
            return upgrade_state_dict(dict(state)), any(k.startswith("model.backbone.") for k in state)
        raise ValueError(
            f"weights={weights}: neither an official MPAE checkpoint (compress_layer./Transformer./Decoder. keys) "
            f"nor an mpae-lightning checkpoint (model.* keys); found e.g. {list(state)[:5]}"
        )

    def _load_initial_weights(self, state: dict[str, torch.Tensor], source: str | None) -> None:
        if is_official_state_dict(state):
            load_official_state_dict(self.model, state)
            self._weights_loaded = True
            return
        own = self.state_dict()
        frozen = tuple(prefix for prefix, _ in FROZEN_PARTS.values())
        mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        missing = [k for k in own if k not in state and not k.startswith(frozen)]
        if mismatched or missing:
            raise ValueError(
                f"weights={source} does not fit this configuration: shape mismatches {mismatched[:5]}, "
                f"missing {missing[:5]} (check num_parts, image_size and the widths)"
            )
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
        if any(k.startswith(FROZEN_PARTS["vgg"][0]) for k in state):
            self.loss.vgg.mark_loaded()

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: Any, *args: Any, **kwargs: Any) -> "MPAEModule":  # type: ignore[override]
        """As Lightning's, but never runs code from the file and builds only what the checkpoint lacks.

        The file is read with ``weights_only=True`` (tensors and plain settings only), so a
        malicious pickle is refused instead of executed. A self-contained checkpoint (the
        default) holds the backbone weights, so nothing is downloaded; VGG-19 is needed only to
        train and is fetched lazily. One saved with ``frozen_weights_in_checkpoint=False``
        rebuilds the backbone from the source it records; offline, pass a local file as
        ``backbone_weights=``.
        """
        if kwargs.pop("weights_only", True) is not True:
            raise ValueError("MPAEModule checkpoints hold only tensors and settings: load them with weights_only=True")
        from .runs import hparam_conflicts, read_checkpoint

        checkpoint = read_checkpoint(str(checkpoint_path))
        left_out = dict(checkpoint.get(FROZEN_RECORD) or {})
        fixed = {k: v for k, v in kwargs.items() if k in FIXED_BY_CHECKPOINT}
        conflicts = hparam_conflicts(fixed, checkpoint.get("hyper_parameters") or {})
        del checkpoint  # release the memory map
        if conflicts:
            name, value, saved = conflicts[0]
            raise ValueError(
                f"{name}={value} was given, but the checkpoint {checkpoint_path} was trained with {name}={saved}; "
                f"the checkpoint fixes {name}: drop the argument"
            )
        if "backbone" not in left_out:
            kwargs.setdefault("backbone_weights", "random")
        kwargs.setdefault("weights", None)
        needs = (f"{checkpoint_path} was saved without the frozen {' and '.join(left_out)} weights, "
                 f"so they are rebuilt from their sources {left_out}")
        if "backbone" in left_out:
            setting = FROZEN_PARTS["backbone"][1]
            source = kwargs.get(setting, left_out["backbone"][setting])
            if is_local_file(source) and not Path(source).expanduser().is_file():
                raise WeightsUnavailableError(
                    f"{needs}, but {setting}={source} does not exist: pass {setting}=<a local copy> (CLI: "
                    f"--model.init_args.{setting})"
                )
        try:
            module = super().load_from_checkpoint(checkpoint_path, *args, weights_only=True, **kwargs)
            module.checkpoint_summary["name"] = Path(str(checkpoint_path)).name  # for picture titles
            return module
        except WeightsUnavailableError as err:
            raise WeightsUnavailableError(f"{needs}: {err}") from None

    def load_state_dict(self, state_dict: Any, *args: Any, **kwargs: Any) -> Any:
        """``nn.Module.load_state_dict``; the module then counts as holding trained weights
        (Lightning's checkpoint loading and ``weights=`` come through here)."""
        result = super().load_state_dict(state_dict, *args, **kwargs)
        self._weights_loaded = True
        return result

    @classmethod
    def _from_pretrained(cls, *, config: Any = None, **kwargs: Any) -> Any:  # type: ignore[override]
        """The mixin's loading; the module then counts as holding trained weights. (``config`` is named:
        huggingface_hub passes the folder's config.json only to a ``_from_pretrained`` that names it.)"""
        module = super()._from_pretrained(config=config, **kwargs)
        module._weights_loaded = True
        return module

    @property
    def has_trained_weights(self) -> bool:
        """True once weights were loaded (``load_from_checkpoint``, ``from_pretrained``, ``weights=``,
        ``load_state_dict``) or trained (``global_step > 0``); False for freshly initialised ones."""
        return self._weights_loaded or self.global_step > 0

    def frozen_source(self, part: str) -> str:
        """Where the frozen ``part`` ("backbone" or "vgg") came from: "random" (kept in checkpoints)
        or a public source it is rebuilt from (left out)."""
        return self._frozen_sources[part]

    def set_frozen_source(self, part: str, source: str) -> None:
        """Record the public source of a frozen part whose weights were checked equal to it (``mpae
        convert``), so checkpoints and pretrained folders leave them out and rebuild them from it."""
        if part not in FROZEN_PARTS:
            raise ValueError(f"frozen part must be one of {sorted(FROZEN_PARTS)}, got {part!r}")
        self._frozen_sources[part] = source

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Leave public frozen weights out (VGG always, the backbone when asked), recording their sources."""
        state, record = checkpoint["state_dict"], {}
        for part, (prefix, setting) in FROZEN_PARTS.items():
            source = self._frozen_sources[part]
            keep = part == "backbone" and self.hparams.get("frozen_weights_in_checkpoint", True)
            if keep or is_random(source):
                continue  # random weights cannot be rebuilt: they stay in the file
            for key in [k for k in state if k.startswith(prefix)]:
                del state[key]
            record[part] = {setting: source}
        if "backbone" in record:
            record["backbone"].update(backbone=self.hparams.backbone, backbone_kwargs=self.hparams.backbone_kwargs)
        checkpoint[FROZEN_RECORD] = record

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Upgrade older key names, and fill the frozen weights a checkpoint left out from this module's own."""
        self.checkpoint_summary = checkpoint_summary(checkpoint)
        state, own = upgrade_state_dict(checkpoint["state_dict"]), self.state_dict()
        record = checkpoint.get(FROZEN_RECORD) or {}
        for part, (prefix, setting) in FROZEN_PARTS.items():
            if any(k.startswith(prefix) for k in state):
                if part == "vgg":
                    self.loss.vgg.mark_loaded()  # the checkpoint's VGG is the one it trained with
                continue
            if part == "backbone" and is_random(self._frozen_sources[part]) and part in record:
                raise ValueError(
                    f"this checkpoint was saved without the frozen {part} weights (frozen_weights_in_checkpoint=false; "
                    f"source {record[part]}), but this model built them randomly: set {setting}="
                    f"{record[part][setting]!r} (or a local copy of those weights) to load it"
                )
            # Built from their recorded source (the VGG lazily, on first use): take this module's own.
            state.update({k: v for k, v in own.items() if k.startswith(prefix)})

    # ------------------------------------------------------------------ set-up
    def attached_trainer(self) -> Any:
        """The Trainer running this module, or None outside one (``self.trainer`` raises then)."""
        try:
            return self.trainer
        except RuntimeError:
            return None

    def configure_model(self) -> None:
        """Compile the model's regions if asked (idempotent: Lightning calls this for every stage)."""
        if self.hparams.compile:
            self.model.compile_regions()
            self.loss.compile_regions()

    def setup(self, stage: str) -> None:
        trainer = self.attached_trainer()
        resuming = trainer is not None and bool(trainer.ckpt_path)
        if stage in ("fit", "validate") and not resuming:
            # Fail fast (offline, missing file) before any data is read. With a ckpt_path the
            # checkpoint, restored after setup, normally carries VGG; else the first loss fetches it.
            self.loss.resolve()
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is None:
            return
        for name in LINKED_FROM_DATA:
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
            fg_masks=bool(getattr(datamodule, "has_fg_masks", False)),
        )

    def on_fit_start(self) -> None:
        # Lightning warns about every module in eval mode when training starts; the frozen
        # backbone and VGG are so on purpose. Silence exactly that count, so any other
        # module left in eval mode is still reported.
        roots = ("model.backbone", "loss.restoration.features")
        frozen = [name for name, _ in self.named_modules() if name in roots or name.startswith(tuple(f"{r}." for r in roots))]
        if frozen:
            message = re.escape(f"Found {len(frozen)} module(s) in eval mode at the start of training")
            warnings.filterwarnings("ignore", message=message)

    def build_metrics(self, num_keypoints: int = 0, num_mask_labels: int = 0, fg_masks: bool = False) -> None:
        """Create the val/test metrics for the data's annotations (called from ``setup``); ``fg_masks``:
        the items carry binary object masks (``fg_mask``, e.g. CUB's segmentations)."""
        num_parts = self.model.num_parts
        for split in ("val", "test"):
            if num_keypoints and f"{split}_keypoint" not in self.metrics:
                self.metrics[f"{split}_keypoint"] = KeypointPartMetrics(num_keypoints, num_parts)
            if num_mask_labels and f"{split}_mask" not in self.metrics:
                self.metrics[f"{split}_mask"] = MaskPartMetrics(num_mask_labels, num_parts)
            if fg_masks and f"{split}_fg_mask" not in self.metrics:
                self.metrics[f"{split}_fg_mask"] = ForegroundMaskMetrics(num_parts)

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

        trainer = self.attached_trainer()
        if trainer is None or type(trainer.precision_plugin) not in (Precision, DoublePrecision):
            return False
        return bool(params) and all(p.device.type in FUSED_ADAM_DEVICES and p.is_floating_point() for p in params)

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """The paper's clipping (gradient norm at ``gradient_clip_val``) when the Trainer sets none."""
        if gradient_clip_val is None and gradient_clip_algorithm is None:
            gradient_clip_val, gradient_clip_algorithm = self.hparams.get("gradient_clip_val"), "norm"
        if gradient_clip_val:
            self.clip_gradients(optimizer, gradient_clip_val, gradient_clip_algorithm)

    # ---------------------------------------------------------------- training
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, K+1, m, m) part probabilities at evaluation resolution."""
        return self.model.predict_parts(images)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        losses = self.training_losses(batch)
        self.last_train_losses = {k: v.detach() for k, v in losses.items()}  # NonFiniteGuard names bad terms
        self._log_losses("train", losses, batch["image"].shape[0], on_step=True)
        return losses["total"]

    def _log_losses(self, stage: str, losses: dict[str, torch.Tensor], batch_size: int, on_step: bool) -> None:
        # Every scalar: the terms of MPAELoss (LOSS_TERMS), their parts and the total, each once under
        # its own name; the total is also what the progress bar shows.
        for name in [k for k, v in losses.items() if v.ndim == 0]:
            self.log(f"{stage}/{name}", losses[name].detach().float(), on_step=on_step, on_epoch=not on_step,
                     batch_size=batch_size, sync_dist=not on_step, prog_bar=name == "total")

    def on_train_epoch_start(self) -> None:
        # MultiStepLR steps per epoch, so one value per epoch is the whole schedule.
        optimizer = self.optimizers(use_pl_optimizer=False)
        self.log("train/lr", float(optimizer.param_groups[0]["lr"]), on_step=False, on_epoch=True, sync_dist=False)

    # -------------------------------------------------------------- evaluation
    def _update_metrics(
        self, batch: dict[str, Any], stage: str, probs: torch.Tensor, grid_probs: torch.Tensor | None = None
    ) -> None:
        """``probs``: the evaluation map (NMI/ARI); ``grid_probs``: the patch-grid map, which the
        foreground IoU upsamples to the mask size as PDiscoFormer does."""
        if f"{stage}_keypoint" in self.metrics and "keypoints" in batch:
            self.metrics[f"{stage}_keypoint"].update(probs, batch["keypoints"], batch["visible"], self.model.image_size)
        if f"{stage}_mask" in self.metrics and "mask" in batch:
            self.metrics[f"{stage}_mask"].update(probs, batch["mask"], grid_probs)
        if f"{stage}_fg_mask" in self.metrics and "fg_mask" in batch:
            self.metrics[f"{stage}_fg_mask"].update(probs if grid_probs is None else grid_probs, batch["fg_mask"])

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> MPAEOutput:
        # One pass gives all: losses (masking noise fixed by the sample index, so validation
        # curves are comparable), the part map scored by the metrics, and the picture's tensors.
        out = self.validation_outputs(batch["image"], batch["index"])
        self._update_metrics(batch, "val", self.model.part_probabilities(out.logits),
                             self.model.part_probabilities(out.logits, scale_factor=1))
        self._log_losses(self.log_prefix("val"), self.loss(out), batch["image"].shape[0], on_step=False)
        return out  # handed to PartVisualization; Lightning keeps no validation outputs

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, torch.Tensor]:
        # predict_parts' float32 logits, turned into both maps: the evaluation map and the patch grid.
        logits = self.model.encode_parts(batch["image"], float32_head=True).logits
        probs = self.model.part_probabilities(logits)
        grid_probs = self.model.part_probabilities(logits, scale_factor=1)
        self._update_metrics(batch, "test", probs, grid_probs)
        # handed to test-time callbacks (e.g. KeypointRegressionEvaluation); not kept by Lightning
        return {"part_probs": probs, "grid_probs": grid_probs}

    def validation_outputs(self, images: torch.Tensor, index: torch.Tensor) -> MPAEOutput:
        """The model's forward with the masking noise fixed by each sample's dataset index, so
        validation losses and pictures are comparable across epochs."""
        return self.model(images, noise=self._fixed_noise(index))

    def training_losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The objective on one training batch, the same on 1 or N processes.

        Each image's masking noise comes from its own ``mask_seed`` (set by the training loader
        from the seed, the epoch and the image's position in the global batch; the global
        generator only for batches without it), and under DDP the presence loss gathers the
        mini-groups that span processes (:func:`~mpae_lightning.losses.gather.gather_with_grad`).
        """
        from .losses.gather import distributed_world, gather_with_grad

        noise = self._fixed_noise(batch["mask_seed"]) if "mask_seed" in batch else None
        gather = gather_with_grad if distributed_world() > 1 else None
        return self.loss(self.model(batch["image"], noise=noise), gather=gather)

    def _fixed_noise(self, seeds: torch.Tensor) -> torch.Tensor:
        """(B, h*w) uniform masking noise, row i drawn from a generator seeded with ``seeds[i]``."""
        rows = []
        for i in seeds.tolist():
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
        keypoints), ``mask_*`` (part map against the ground-truth part masks) and ``fg_iou`` /
        ``bg_iou`` (foreground against binary object masks, e.g. CUB's segmentations), under
        :meth:`log_prefix` of the stage.
        """
        results: dict[str, float] = {}
        for kind, stem in (("keypoint", "keypoint_"), ("mask", "mask_"), ("fg_mask", "")):
            metric = self.metrics[f"{stage}_{kind}"] if f"{stage}_{kind}" in self.metrics else None
            if metric is None:
                continue
            scores = {k: float(v) for k, v in metric.compute().items()}
            metric.reset()
            parts = scores.pop("parts_per_image", None)  # the same count in both: logged once
            results.update({f"{stem}{k}": v for k, v in scores.items()})
            if parts is not None:
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
        datamodule = getattr(self.attached_trainer(), "datamodule", None)
        source = getattr(datamodule, "val_split", "val")
        return "val" if source in ("val", "holdout") else f"val_on_{source}"

    # -------------------------------------------------------------- prediction
    @property
    def input_antialias(self) -> bool:
        """Whether :meth:`predict_images` resizes images with antialiasing (setting ``input_antialias``)."""
        return bool(self.hparams.get("input_antialias", True))

    @property
    def predict_dtype(self) -> torch.dtype | None:
        """The dtype prediction runs in after the backbone (``predict_precision``; None: float32)."""
        return PREDICT_PRECISIONS[self.hparams.get("predict_precision", "32")]

    def predict_images(
        self,
        images: Any,
        batch_size: int = 16,
        resolution: Literal["map", "original"] = "map",
        probabilities: bool = True,
        untrained: bool = False,
        **predict_options: Any,
    ) -> list[Any]:
        """The parts of image files, folders, PIL images or (H, W, 3) uint8 arrays, one
        :class:`~mpae_lightning.inference.PartMaps` per image, in order.

        Any size and mode is read and resized as the training data was (RGB, squashed to S x S,
        with or without antialiasing as ``input_antialias`` says, ImageNet-normalised), in
        batches on this module's device, in eval mode without gradients.
        ``labels`` hold part ids 0..K-1 and K for the background (the last channel, as everywhere in
        MPAE); with ``resolution="original"`` they are resized (nearest) to each image's own size.
        See :func:`mpae_lightning.inference.predict_images`.

        Raises:
            ValueError: the weights are untrained (nothing loaded, never trained) and ``untrained`` is False.
        """
        from .inference import predict_images

        return predict_images(self, images, batch_size=batch_size, resolution=resolution,
                              probabilities=probabilities, untrained=untrained, **predict_options)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        # Only prediction honours predict_precision; test_step and forward stay float32 (the scores).
        probs = self.model.predict_parts(batch["image"], dtype=self.predict_dtype)
        # Only the small label maps are returned: Trainer.predict keeps every prediction in memory.
        return {
            "labels": probs.argmax(dim=1).to(torch.uint8 if probs.shape[1] <= 256 else torch.int32).cpu(),
            "index": batch["index"].cpu(),
            "path": batch.get("path"),
            "num_parts": probs.shape[1],
        }
