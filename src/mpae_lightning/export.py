"""``mpae export``: the image-to-part-map predictor as an ONNX file or a ``torch.export`` program.

Deployment needs only what :meth:`MPAE.predict_parts <mpae_lightning.models.MPAE.predict_parts>`
runs: the frozen backbone, the descriptor ViT and the 1x1 projection. The export holds exactly
those (no restorer, no VGG-19, no loss), with a dynamic batch dimension::

    mpae export --ckpt_path runs/cub/checkpoints/last.ckpt --output cub_parts.onnx
    mpae export --ckpt_path runs/cub/checkpoints/last.ckpt --format torch --output cub_parts.pt2

Inputs: ``images`` (B, 3, S, S) ImageNet-normalised float32. Outputs: ``parts`` (B, K+1, m, m)
part probabilities (background last) and ``labels`` (B, m, m) int64, their argmax.
ONNX export needs the ``export`` extra (``pip install 'mpae-lightning[export]'``).
"""
from __future__ import annotations

import importlib.util
import inspect
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentParser
from torch import nn

from .errors import ConfigError, unknown_setting
from .models.mpae import MPAE
from .models.precision import at_least_float32

__all__ = ["FORMATS", "PartsPredictor", "export_parts_predictor", "export_main"]

#: Export formats and the file suffix each is written with.
FORMATS = {"onnx": ".onnx", "torch": ".pt2"}
#: Above this many bytes of weights an ONNX file keeps them in a side file (protobuf's 2 GB limit).
_ONNX_SINGLE_FILE_BYTES = 1_900_000_000


class PartsPredictor(nn.Module):
    """``images (B, 3, S, S) -> (parts (B, K+1, m, m), labels (B, m, m))``: :meth:`MPAE.predict_parts` for export.

    Why a separate module: ``predict_parts`` first validates its input with Python checks that
    read tensor values (a NaN/inf warning), which cannot be traced, and the model also holds the
    training-only restorer. This wrapper registers only the submodules inference uses (the
    backbone, the descriptor ViT, the feature projection), so an export carries exactly their
    weights, and computes the same function with the same submodules and the model's own
    :meth:`MPAE.part_probabilities`; ``tests/test_export.py`` checks it equals ``predict_parts``
    bit for bit. The input checks are left to the runtime: an ONNX or ``torch.export`` program
    refuses another dtype, channel count or image size by itself.

    Args:
        model: the MPAE to export (it must have its backbone).
        scale_factor: upsampling from the patch grid to the map (default: the model's
            ``eval_scale_factor``, i.e. ``eval_map_size``).
        input_antialias: whether the caller should resize images with antialiasing (the module's
            ``input_antialias``); only recorded in the metadata, the program takes S x S images.
    """

    def __init__(self, model: MPAE, scale_factor: float | None = None, input_antialias: bool = True) -> None:
        super().__init__()
        if model.backbone is None:
            raise ConfigError(
                "this MPAE has no backbone (backbone=None, it takes backbone_tokens): the exported predictor "
                "maps images to parts, so export a model built with its backbone"
            )
        scale = model.eval_scale_factor if scale_factor is None else float(scale_factor)
        if not scale > 0:
            raise ConfigError(f"scale_factor={scale_factor} must be > 0 (1 keeps the {model.grid_size[0]}x"
                              f"{model.grid_size[1]} patch grid)")
        self.backbone = model.backbone
        self.descriptor_vit = model.descriptor_vit
        self.feature_proj = model.feature_proj
        self.grid_size = tuple(model.grid_size)
        self.image_size = int(model.image_size)
        self.num_parts = int(model.num_parts)
        self.scale_factor = scale
        self.input_antialias = bool(input_antialias)  # how the caller must resize (the metadata says it)
        # A bound method holds no parameters, so the restorer does not become part of this module.
        self._part_probabilities = model.part_probabilities

    @property
    def map_size(self) -> int:
        """Side m of the part map."""
        return int(self.grid_size[0] * self.scale_factor)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, S, S) normalised float images -> part probabilities (B, K+1, m, m) and labels (B, m, m)."""
        # The steps of MPAE.encode_parts(float32_head=True) after its input checks, with the same modules.
        with torch.no_grad():
            backbone_tokens = self.backbone(images)
        with torch.autocast(device_type=images.device.type, enabled=False):
            descriptors = self.descriptor_vit(at_least_float32(images))
        h, w = self.grid_size
        with torch.autocast(device_type=images.device.type, enabled=False):
            weight = at_least_float32(self.feature_proj.weight)
            dtype = weight.dtype
            tokens = backbone_tokens.to(dtype) @ weight.flatten(1).t()
            local_features = tokens.transpose(1, 2).unflatten(2, (h, w))
            logits = torch.einsum("bkc,bchw->bkhw", descriptors.to(dtype), local_features)
        parts = self._part_probabilities(logits, self.scale_factor)
        return parts, parts.argmax(dim=1)

    def metadata(self) -> dict[str, str]:
        """What a user of the exported file needs to know, stored in it (ONNX metadata, ``.pt2`` extra file)."""
        from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

        return {
            "mpae.num_parts": str(self.num_parts),
            "mpae.background_channel": str(self.num_parts),
            "mpae.image_size": str(self.image_size),
            "mpae.map_size": str(self.map_size),
            "mpae.input": "images (B, 3, S, S) float32, RGB in [0, 1] then normalised by ImageNet mean/std",
            "mpae.input_resize": "to S x S ignoring the aspect ratio, bilinear "
            + ("with antialiasing (torchvision's resize)" if self.input_antialias
               else "without antialiasing (as OpenCV's cv2.resize INTER_LINEAR; the training data's resize)"),
            "mpae.imagenet_mean": json.dumps(list(IMAGENET_MEAN)),
            "mpae.imagenet_std": json.dumps(list(IMAGENET_STD)),
            "mpae.outputs": "parts (B, K+1, m, m) part probabilities, background last; labels (B, m, m) int64 argmax",
        }


def _as_mpae(model: Any) -> MPAE:
    if isinstance(model, MPAE):
        return model
    inner = getattr(model, "model", None)  # MPAEModule
    if isinstance(inner, MPAE):
        return inner
    raise TypeError(f"export_parts_predictor takes an MPAE or an MPAEModule, got {type(model).__name__}")


def _check_format(format: str, path: Path) -> str:
    if format not in FORMATS:
        raise ConfigError(f"--format {format}: unknown export format; use one of {', '.join(FORMATS)}")
    for other, suffix in FORMATS.items():
        if other != format and path.suffix.lower() == suffix:
            raise ConfigError(
                f"--output {path} has the suffix of the {other} format but --format is {format}; "
                f"name the file *{FORMATS[format]} or pass --format {other}"
            )
    return format


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxscript") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"ONNX export needs the package(s) {', '.join(missing)}: pip install 'mpae-lightning[export]' "
            "(onnx, onnxscript and onnxruntime), or export with --format torch"
        )


def _write_atomically(path: Path, write: Any) -> None:
    """``write(tmp_path)`` beside ``path``, then rename: a failed export never leaves a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _trace_and_write(
    predictor: PartsPredictor, example: tuple[torch.Tensor], path: Path, format: str, opset_version: int | None
) -> None:
    dynamic_shapes = {"images": {0: torch.export.Dim("batch", min=1)}}
    if format == "torch":
        program = torch.export.export(predictor, example, dynamic_shapes=dynamic_shapes)
        extra = {"mpae.json": json.dumps(predictor.metadata(), indent=1)}
        _write_atomically(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra))
        return
    onnx_program = torch.onnx.export(
        predictor,
        example,
        dynamo=True,
        dynamic_shapes=dynamic_shapes,
        input_names=["images"],
        output_names=["parts", "labels"],
        opset_version=opset_version,
        # Weights stay initializers named as in the state dict (backbone.*, descriptor_vit.*,
        # feature_proj.weight); ONNX Runtime folds and fuses the graph itself when it loads it.
        optimize=False,
        verbose=False,
    )
    onnx_program.model.metadata_props.update(predictor.metadata())
    size = sum(p.numel() * p.element_size() for p in predictor.parameters())
    if size > _ONNX_SINGLE_FILE_BYTES:  # protobuf's limit: the weights go to a side file named after the model
        onnx_program.save(path, external_data=True)
    else:
        _write_atomically(path, lambda tmp: onnx_program.save(tmp, external_data=False))


def export_parts_predictor(
    model: Any,
    path: str | os.PathLike[str],
    format: str = "onnx",
    scale_factor: float | None = None,
    opset_version: int | None = None,
) -> Path:
    """Write ``model``'s image-to-part-map predictor (:class:`PartsPredictor`) with a dynamic batch dimension.

    Args:
        model: an :class:`~mpae_lightning.models.MPAE` or an ``MPAEModule``; its weights must be
            float32 (checkpoints are). Its train/eval state is left as it was.
        path: the file to write (its folder is created).
        format: ``"onnx"`` (``torch.onnx.export``, the ``torch.export``-based exporter; needs the
            ``export`` extra) or ``"torch"`` (a ``torch.export`` program, ``torch.export.save``;
            load it with ``torch.export.load(path).module()``).
        scale_factor: map upsampling factor (default: the model's ``eval_scale_factor``).
        opset_version: ONNX opset (default: the one ``torch.onnx.export`` recommends).

    Returns:
        The path written.
    """
    mpae = _as_mpae(model)
    path = Path(path).expanduser()
    format = _check_format(format, path)
    if format == "onnx":
        _require_onnx()
    dtypes = {p.dtype for p in mpae.parameters()}
    if dtypes != {torch.float32}:
        raise ConfigError(
            f"the model's weights are {', '.join(sorted(str(d) for d in dtypes))}; export takes a float32 model "
            "(model.float()), as checkpoints are"
        )
    predictor = PartsPredictor(mpae, scale_factor, input_antialias=bool(getattr(model, "input_antialias", True)))
    device = next(mpae.parameters()).device
    # Two example images: a batch of one could be specialised into the graph; the batch stays dynamic.
    example = (torch.zeros(2, 3, mpae.image_size, mpae.image_size, device=device),)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = mpae.training
    mpae.eval()
    predictor.eval()
    try:
        # Traced without autograd (the function is inference only): the no_grad region around the
        # backbone then adds no grad-mode switch to the program, which torch.export.load would refuse.
        with torch.no_grad():
            _trace_and_write(predictor, example, path, format, opset_version)
    finally:
        mpae.train(was_training)
    return path


# ------------------------------------------------------------------------------- the command
def untrained_module(config: str | None, backbone_weights: str | None = None) -> Any:
    """An ``MPAEModule`` with its initial weights, from the model (and data image size) of a config file."""
    from .lightning_module import LINKED_FROM_DATA, MPAEModule
    from .runs import import_class, linked_data_settings, read_config_file, section_settings

    settings: dict[str, Any] = {}
    cls: type = MPAEModule
    if config is not None:
        if not Path(config).expanduser().is_file():
            raise FileNotFoundError(f"--config {config} does not exist; pass a training config (e.g. configs/demo.yaml)")
        data = read_config_file(str(Path(config).expanduser()))
        model = data.get("model")
        class_path = model.get("class_path") if isinstance(model, dict) else None
        if class_path:
            try:
                cls = import_class(class_path)
            except (ImportError, AttributeError):
                raise ConfigError(f"{config}: model.class_path {class_path} cannot be imported") from None
            if not (isinstance(cls, type) and issubclass(cls, MPAEModule)):
                raise ConfigError(f"{config}: model.class_path {class_path} is not an MPAEModule")
        settings = section_settings(model)
        settings.update(linked_data_settings(data.get("data"), LINKED_FROM_DATA, settings))
    if backbone_weights is not None:
        settings["backbone_weights"] = backbone_weights
    known = set(inspect.signature(cls.__init__).parameters) - {"self", "args", "kwargs"}
    for name in settings:
        if name not in known:
            raise unknown_setting("model.init_args", name, known, str(config))
    return cls(**settings)


def export_main(argv: list[str]) -> int:
    """Entry point of ``mpae export``; returns the exit code."""
    parser = ArgumentParser(
        prog="mpae export", exit_on_error=False,
        description="Write the image-to-part-map predictor of a checkpoint (MPAE.predict_parts) as an ONNX file or "
                    "a torch.export program, with a dynamic batch dimension; no VGG-19, no training-only parts."
    )
    parser.add_argument("--ckpt_path", type=str, default=None,
                        help="checkpoint written by `mpae fit` (read with weights_only=True; it holds every setting)")
    parser.add_argument("--output", type=str, default=None, help="file to write (e.g. parts.onnx or parts.pt2)")
    parser.add_argument("--format", type=str, default=None,
                        help="onnx (the default) or torch (a torch.export program; the default for a .pt2 --output)")
    parser.add_argument("--untrained", type=bool, default=False, nargs="?", const=True,
                        help="export the initial weights (random part branch; backbone as backbone_weights says) "
                             "instead of a checkpoint's; settings from --config")
    parser.add_argument("--config", type=str, default=None,
                        help="with --untrained: a training config whose model section (and data image_size) is used")
    parser.add_argument("--backbone_weights", "--model.init_args.backbone_weights", type=str, default=None,
                        help="a local backbone file: for a checkpoint saved without its backbone "
                             "(frozen_weights_in_checkpoint=False) on a machine without network, or with --untrained")
    parser.add_argument("--scale_factor", type=float, default=None,
                        help="part map side = patch grid side x scale_factor (default: the model's eval_map_size)")
    parser.add_argument("--opset", type=int, default=None,
                        help="ONNX opset version (default: the one torch.onnx.export recommends)")
    cfg = parser.parse_args(argv)
    if not cfg.output:
        raise ConfigError("mpae export needs --output FILE (e.g. --output parts.onnx)")
    output = Path(cfg.output).expanduser()
    format = cfg.format or ("torch" if output.suffix.lower() == FORMATS["torch"] else "onnx")
    _check_format(format, output)
    if format == "onnx":
        _require_onnx()  # before the checkpoint is read
    from .runs import check_writable

    check_writable("--output", output.parent)
    if output.is_dir():
        raise ConfigError(f"--output {cfg.output} is a folder; name the file to write, e.g. {output / 'parts'}{FORMATS[format]}")
    if cfg.scale_factor is not None and not cfg.scale_factor > 0:
        raise ConfigError(f"--scale_factor {cfg.scale_factor} must be > 0 (the part map side is the patch grid "
                          "side times it; 1 keeps the patch grid)")
    if cfg.ckpt_path and cfg.untrained:
        raise ConfigError("--ckpt_path and --untrained exclude each other: export the checkpoint's weights or the "
                          "initial ones")
    if cfg.ckpt_path:
        if cfg.config:
            raise ConfigError(f"--config {cfg.config} is not read with --ckpt_path: the checkpoint holds every "
                              "setting; drop --config")
        from .lightning_module import MPAEModule

        if not os.path.exists(os.path.expanduser(cfg.ckpt_path)):
            raise FileNotFoundError(f"--ckpt_path {cfg.ckpt_path} does not exist; pass a .ckpt written by `mpae fit` "
                                    "(e.g. <run folder>/checkpoints/last.ckpt)")
        kwargs = {} if cfg.backbone_weights is None else {"backbone_weights": cfg.backbone_weights}
        module = MPAEModule.load_from_checkpoint(os.path.expanduser(cfg.ckpt_path), map_location="cpu", **kwargs)
        source = cfg.ckpt_path
    elif cfg.untrained:
        module = untrained_module(cfg.config, cfg.backbone_weights)
        source = "initial (untrained) weights" + (f" of {cfg.config}" if cfg.config else "")
    else:
        raise ConfigError("mpae export needs trained weights: pass --ckpt_path FILE (a .ckpt written by "
                          "`mpae fit`), or --untrained to export the initial weights")
    predictor = PartsPredictor(module.model, cfg.scale_factor)
    written = export_parts_predictor(module, output, format=format, scale_factor=cfg.scale_factor,
                                     opset_version=cfg.opset)
    what = "ONNX model" if format == "onnx" else "torch.export program"
    s, m, k = predictor.image_size, predictor.map_size, predictor.num_parts
    print(f"mpae export: wrote the {what} of the part predictor ({source}; images (B, 3, {s}, {s}) -> parts "
          f"(B, {k + 1}, {m}, {m}) and labels (B, {m}, {m}), any batch size B) to {written}")
    return 0
