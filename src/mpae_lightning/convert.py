"""``mpae convert``: turn an authors' ``.pth`` or one of our ``.ckpt`` files into a pretrained folder.

The folder (``model.safetensors`` + ``config.json`` + model card ``README.md``) is what
``MPAEModule.from_pretrained(DIR)`` loads and ``push_to_hub`` uploads::

    mpae convert CUB_K16.pth --config configs/cub.yaml --out mpae-cub-k16
    mpae convert outputs/cub/tensorboard/version_0/checkpoints/last.ckpt --out mpae-cub-k16

An authors' file holds the sizes (K, image size, widths, depths); the rest (heads, backbone)
comes from ``--config`` (its model section) or the defaults, which are the released models'.
A ``.ckpt`` holds every setting. The model card's scores come from a ``test_scores.yaml`` of
``mpae test``: ``--test_scores FILE``, or the one in the checkpoint's run folder when it scores
that checkpoint; without one the card says no scores were measured.

The frozen backbone is left out of ``model.safetensors`` when its source is public: a ``.ckpt``
trained from ``backbone_weights`` ``timm`` or a file records it; for weights that carry the
backbone (an authors' file, a resumed run) give ``--backbone_weights SOURCE``: they are compared
with that source and left out when identical. Every file is read without running code.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import ArgumentParser

from .errors import CheckpointError, ConfigError
from .pretrained import (
    CARD_NAME,
    CONFIG_NAME,
    WEIGHTS_NAME,
    check_scores_belong_to,
    dataset_name,
    is_pretrained_folder,
    official_dataset,
    read_test_scores,
    scores_beside_checkpoint,
    setting_names,
)

__all__ = ["convert", "convert_main"]


def _read_source(path: Path) -> tuple[str, Mapping[str, Any]]:
    """``("ckpt", checkpoint)`` or ``("official", state dict)``; anything else is refused in one line."""
    from .models import is_official_state_dict
    from .models.weights import load_state_dict_file, load_tensor_file, unreadable_reason

    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist; pass an authors' .pth (e.g. CUB_K16.pth) or a .ckpt written by `mpae fit`"
        )
    if path.is_dir():
        if is_pretrained_folder(path):
            raise ConfigError(f"{path} is already a pretrained folder; load it with MPAEModule.from_pretrained")
        raise CheckpointError(f"{path} is a folder; pass the .pth or .ckpt file")
    if path.suffix == ".safetensors":
        state: Any = load_state_dict_file(path, "source")
        raw: Any = state
    else:
        try:
            raw = load_tensor_file(path)
        except Exception as err:  # noqa: BLE001 - any failure to read means a bad file
            raise CheckpointError(f"cannot read {path} ({unreadable_reason(err)}); pass an authors' .pth or a .ckpt "
                                  "written by `mpae fit`") from None
        if isinstance(raw, Mapping) and isinstance(raw.get("state_dict"), Mapping) and "hyper_parameters" in raw:
            return "ckpt", raw
        state = raw
        for key in ("state_dict", "model"):
            if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
                state = state[key]
    if isinstance(state, Mapping) and is_official_state_dict(state):
        return "official", state
    found = list(state)[:5] if isinstance(state, Mapping) else type(state).__name__
    raise CheckpointError(
        f"{path} is neither an authors' MPAE checkpoint (compress_layer./Transformer./Decoder. keys) nor a .ckpt "
        f"written by `mpae fit` (state_dict + hyper_parameters); found {found}"
    )


def _config_settings(config: str | None) -> tuple[dict[str, Any], Any]:
    """The model settings of a YAML config (the data section's linked settings included) and its data section."""
    from .lightning_module import LINKED_FROM_DATA
    from .runs import linked_data_settings, read_config_file, section_settings

    if config is None:
        return {}, None
    if not Path(config).is_file():
        raise FileNotFoundError(f"--config {config} does not exist; pass a YAML config such as configs/cub.yaml")
    data = read_config_file(config)
    settings = section_settings(data.get("model"))
    data_section = data.get("data")
    settings.update(linked_data_settings(data_section, LINKED_FROM_DATA, settings))
    if settings.get("weights"):
        raise ConfigError(f"--config {config} sets model weights={settings['weights']}; the weights to convert are the "
                          "SOURCE argument: drop it from the config")
    settings.pop("weights", None)
    return settings, data_section


def _same_backbone(module: Any, source: str) -> bool:
    """True if ``module``'s backbone equals the one ``source`` builds (so it can be left out and rebuilt)."""
    from .models.backbone import FrozenBackbone

    hp = module.hparams
    reference = FrozenBackbone(hp["backbone"], weights=source, model_kwargs=hp.get("backbone_kwargs"))
    ours, theirs = module.model.backbone.state_dict(), reference.state_dict()
    return ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k].to(ours[k].dtype)) for k in ours)


def _check_backbone_source(module: Any, source: str, path: Path) -> str:
    if not _same_backbone(module, source):
        raise ConfigError(
            f"--backbone_weights {source}: the backbone in {path} differs from the one {source} gives, so it cannot be "
            "left out and rebuilt from it; drop --backbone_weights to keep the backbone in model.safetensors"
        )
    return source


def _from_official(path: Path, state: Mapping[str, Any], settings: dict[str, Any], backbone_weights: str | None) -> Any:
    from .lightning_module import MPAEModule
    from .models import official_config

    names = set(setting_names(MPAEModule))
    unknown = sorted(set(settings) - names)
    if unknown:
        raise ConfigError(f"--config: MPAEModule takes no setting {unknown[0]} (model section); fix or drop it")
    read = official_config(state)
    for name, value in read.items():
        if name in settings and settings[name] != value:
            raise ConfigError(
                f"--config sets {name}={settings[name]}, but {path.name} holds weights for {name}={value}; drop it from "
                "the config (the weights decide it)"
            )
    settings.update(read)
    has_backbone = any(str(k).removeprefix("module.").startswith("backbone1.") for k in state)
    if backbone_weights is not None and not has_backbone:
        settings["backbone_weights"] = backbone_weights
    module = MPAEModule(**settings, weights=str(path))
    if has_backbone and backbone_weights is not None and module.model.backbone is not None:
        module.set_frozen_source("backbone", _check_backbone_source(module, backbone_weights, path))
    return module


def _from_checkpoint(path: Path, checkpoint: Mapping[str, Any], backbone_weights: str | None) -> Any:
    from .lightning_module import FROZEN_RECORD, MPAEModule
    from .models.weights import is_random

    # LightningCLI records how it built the module (``_class_path``, ``_instantiator``): not settings.
    hp = {k: v for k, v in dict(checkpoint.get("hyper_parameters") or {}).items() if not str(k).startswith("_")}
    names = set(setting_names(MPAEModule))
    unknown = sorted(set(hp) - names)
    if unknown:
        raise CheckpointError(f"{path} has settings MPAEModule does not take: {unknown[:5]}; convert it with the "
                              "mpae-lightning version that wrote it")
    record = dict(checkpoint.get(FROZEN_RECORD) or {})
    holds_backbone = any(str(k).startswith("model.backbone.") for k in checkpoint["state_dict"])
    original_weights = hp.get("weights")
    # The backbone is filled from the file when it holds one; left out, it is not needed to convert
    # (it is rebuilt from its recorded source when the folder is loaded), so nothing is downloaded.
    module = MPAEModule(**{**hp, "weights": str(path), "backbone_weights": "random"})
    if hp.get("backbone") is None or module.model.backbone is None:
        return module
    if holds_backbone:
        if backbone_weights is not None:
            public = _check_backbone_source(module, backbone_weights, path)
        elif not is_random(hp.get("backbone_weights")) and not original_weights:
            public = str(hp["backbone_weights"])  # built from it and frozen since
        else:
            public = "random"  # its origin is not recorded: it stays in model.safetensors
    else:
        public = backbone_weights or (record.get("backbone") or {}).get("backbone_weights")
        if not public or is_random(public):
            raise CheckpointError(f"{path} holds no backbone weights and records no source for them; pass "
                                  "--backbone_weights SOURCE")
    module.set_frozen_source("backbone", public)
    return module


def convert(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str],
    config: str | None = None,
    backbone_weights: str | None = None,
    test_scores: str | None = None,
    dataset: str | None = None,
) -> tuple[Path, list[str]]:
    """Write the pretrained folder ``out`` from ``source`` (authors' ``.pth`` or our ``.ckpt``).

    Returns the folder and notes for the user (where the scores came from, or why there are none).
    """
    from .runs import check_writable, read_config_file, run_folder_of

    path = Path(source).expanduser()
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; choose a folder")
    if out.is_dir() and any(out.iterdir()) and not is_pretrained_folder(out):
        raise ConfigError(f"--out {out} exists and holds other files; choose a new or empty folder")
    check_writable("--out", str(out))
    kind, content = _read_source(path)
    notes: list[str] = []
    data_section = None
    if kind == "official":
        settings, data_section = _config_settings(config)
        module = _from_official(path, content, settings, backbone_weights)
        dataset = dataset or dataset_name(data_section) or official_dataset(path)
        source_line = f"the authors' released checkpoint `{path.name}`"
    else:
        if config is not None:
            raise ConfigError(f"--config {config}: {path.name} holds every setting; drop --config")
        module = _from_checkpoint(path, content, backbone_weights)
        run = run_folder_of(path)
        if run is not None and (run.path / "config.yaml").is_file():
            data_section = read_config_file(str(run.path / "config.yaml")).get("data")
        dataset = dataset or dataset_name(data_section)
        source_line = f"the mpae-lightning checkpoint `{'/'.join(path.parts[-4:])}`"
    del content
    scores = None
    if test_scores is not None:
        scores = read_test_scores(test_scores)
        check_scores_belong_to(scores, path)
        notes.append(f"scores from {test_scores}")
    elif kind == "ckpt":
        found, why_not = scores_beside_checkpoint(path)
        if found is not None:
            scores = read_test_scores(found)
            notes.append(f"scores from {found}")
        else:
            notes.append(f"no scores: {why_not}")
    else:
        notes.append(f"no scores: pass --test_scores <run>/test_scores.yaml of `mpae test --model.init_args.weights "
                     f"{path.name}` to record them")
    module.save_pretrained(out, model_card_kwargs={"test_scores": scores, "dataset": dataset, "source": source_line})
    return out, notes


def convert_main(argv: list[str]) -> int:
    """Entry point of ``mpae convert``; returns the exit code (errors reach ``mpae`` as one line, exit 2)."""
    from .cli import HelpFormatter  # descriptions as written: one example per line

    description = (__doc__ or "").replace("``", "`").replace("::\n", ":\n")
    parser = ArgumentParser(prog="mpae convert", description=description, exit_on_error=False,
                            formatter_class=HelpFormatter)
    parser.add_argument("source", type=str, help="An authors' .pth (e.g. CUB_K16.pth) or a .ckpt written by `mpae fit`.")
    parser.add_argument("--out", type=str, required=True, help="The folder to write (new, empty, or an earlier one).")
    parser.add_argument("--config", type=Optional[str], default=None,
                        help="A YAML config (e.g. configs/cub.yaml) whose model section gives what an authors' "
                             ".pth does not hold (heads, backbone); not for a .ckpt.")
    parser.add_argument("--backbone_weights", type=Optional[str], default=None,
                        help="The public source of the frozen backbone (timm, or a local file): a backbone in the "
                             "file is checked against it and left out of model.safetensors when identical.")
    parser.add_argument("--test_scores", type=Optional[str], default=None,
                        help="The test_scores.yaml of `mpae test` on these weights (default for a .ckpt: its run's).")
    parser.add_argument("--dataset", type=Optional[str], default=None,
                        help="The dataset name for the model card (default: from the config or the file name).")
    cfg = parser.parse_args(argv)
    out, notes = convert(cfg.source, cfg.out, cfg.config, cfg.backbone_weights, cfg.test_scores, cfg.dataset)
    weights = out / WEIGHTS_NAME
    size = weights.stat().st_size / 2**20
    for note in notes:
        print(f"mpae convert: {note}", flush=True)
    print(f"mpae convert: wrote {weights} ({size:.1f} MiB), {out / CONFIG_NAME} and {out / CARD_NAME} from "
          f"{cfg.source}; load it with MPAEModule.from_pretrained({str(out)!r})")
    return 0
