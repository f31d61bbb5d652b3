"""Pretrained MPAE models in the folder format the Hugging Face Hub uses: ``model.safetensors``,
``config.json`` and a model card ``README.md``.

:class:`PretrainedMixin` gives :class:`~mpae_lightning.MPAEModule` ``save_pretrained(dir)``,
``from_pretrained(dir_or_hub_id)`` and ``push_to_hub(repo_id)``, built on
:class:`huggingface_hub.ModelHubMixin` (its documented override points ``_save_pretrained`` and
``_from_pretrained``), so a folder written here is what timm/transformers users already know.

- ``model.safetensors`` holds the weights of ``module.model`` (:class:`~mpae_lightning.models.MPAE`'s
  own key names, so plain PyTorch can read it too). The frozen backbone is left out when its
  source is public (``backbone_weights`` not random: it is rebuilt from that source, as a
  checkpoint saved with ``frozen_weights_in_checkpoint=false``); a random backbone is stored.
  VGG-19 (the training loss's, fetched lazily) is never stored.
- ``config.json`` holds every ``MPAEModule`` setting needed to rebuild it, plus a format marker.
- ``README.md`` (regenerated at every save) records the dataset, K, the backbone, the test scores
  of a ``test_scores.yaml`` written by ``mpae test`` with their protocol, and the citation.

Loading reads only ``config.json`` (JSON) and ``model.safetensors`` (tensors): nothing in the
folder can run code; any other file in it is ignored.
"""
from __future__ import annotations

import inspect

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import ModelCard, ModelCardData, ModelHubMixin

from .errors import CheckpointError, ConfigError, one_line
from .models.weights import WeightsUnavailableError, is_local_file, is_random

__all__ = [
    "CARD_NAME",
    "CONFIG_NAME",
    "FORMAT",
    "FORMAT_VERSION",
    "WEIGHTS_NAME",
    "PretrainedMixin",
    "check_scores_belong_to",
    "dataset_name",
    "is_pretrained_folder",
    "read_test_scores",
    "scores_beside_checkpoint",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
CARD_NAME = "README.md"
#: config.json's ``format``: tells an MPAE folder from any other model's.
FORMAT = "mpae-lightning/pretrained"
#: config.json's ``format_version``: raised when the layout changes; newer folders are refused.
FORMAT_VERSION = 1
#: Keys of config.json that are not constructor settings.
METADATA_KEYS = ("format", "format_version", "mpae_lightning_version", "backbone_in_weights")
#: Weight-file names other libraries use; loading never reads them (pickles can run code).
_PICKLE_WEIGHTS = ("pytorch_model.bin", "model.pth", "model.pt", "model.ckpt")

CITATION = """@inproceedings{MPAE,
  title={Unsupervised Part Discovery via Descriptor-Based Masked Image Restoration with Optimized Constraints},
  author={Jiahao Xia and Yike Wu and Wenjian Huang and Jianguo Zhang and Jian Zhang},
  booktitle={ICCV},
  year={2025}
}"""

#: Display names of the data modules (``class name`` or ``class name:variant``).
_DATASET_NAMES = {
    "CUBDataModule": "CUB-200-2011",
    "CelebADataModule": "CelebA",
    "PartImageNetDataModule:ood": "PartImageNet-OOD",
    "PartImageNetDataModule:seg": "PartImageNet-Seg",
    "SyntheticPartsDataModule": "synthetic parts (the demo's procedural images)",
    "ImageFolderDataModule": "a folder of images (ImageFolderDataModule)",
}
#: The authors' released files (``CUB_K16.pth`` ...): name prefix -> dataset.
OFFICIAL_DATASETS = {
    "cub": "CUB-200-2011",
    "celeba": "CelebA",
    "partimage_s": "PartImageNet-Seg",
    "partimage_o": "PartImageNet-OOD",
}
#: What each kind of score measures (docs/evaluation.md of mpae-lightning).
_PROTOCOLS = {
    "keypoint": "keypoint mode (docs/evaluation.md §2): the part label read at each annotated keypoint "
    "of the test images, clustered against the keypoint ids; `fg_` scores take the argmax over the K "
    "foreground parts only (§4)",
    "mask": "mask mode (docs/evaluation.md §3): every pixel of the 128x128 part map against the "
    "ground-truth part masks, background included; `fg_iou`/`bg_iou` are the foreground/background IoU",
    "fg_iou": "`fg_iou`/`bg_iou` (docs/evaluation.md §10): foreground/background IoU against binary object "
    "masks (CUB's segmentations), the patch-grid map upsampled bilinearly to the mask before the argmax, "
    "as PDiscoFormer's authors compute it",
}


# ------------------------------------------------------------------------------- helpers
def _plain(value: Any) -> Any:
    """A setting as plain JSON data (jsonargparse namespaces and tuples included)."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"setting value {value!r} ({type(value).__name__}) cannot be written to {CONFIG_NAME}")


def _short_path(path: str | os.PathLike[str] | None, parts: int = 4) -> str:
    """The last few components of a path (a card does not need the author's home folder)."""
    if not path:
        return "?"
    return "/".join(Path(str(path)).parts[-parts:])


def _same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return Path(str(a)).name == Path(str(b)).name


def dataset_name(data_section: Any) -> str | None:
    """The dataset a config's ``data`` section names (``{"class_path": ..., "init_args": ...}``), or None."""
    if not isinstance(data_section, Mapping) or not data_section.get("class_path"):
        return None
    cls = str(data_section["class_path"]).rsplit(".", 1)[-1]
    init = data_section.get("init_args") or {}
    variant = init.get("variant") if isinstance(init, Mapping) else None
    return _DATASET_NAMES.get(f"{cls}:{variant}") or _DATASET_NAMES.get(cls) or cls


def official_dataset(path: str | os.PathLike[str]) -> str | None:
    """The dataset of an authors' released file, from its name (``CUB_K16.pth`` -> CUB-200-2011)."""
    stem = Path(path).name.lower()
    for prefix, name in sorted(OFFICIAL_DATASETS.items(), key=lambda item: -len(item[0])):
        if re.match(rf"{re.escape(prefix)}_k\d+", stem):
            return name
    return None


def _read_yaml(path: Path, what: str) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise FileNotFoundError(f"{what} {path}: cannot read it ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {path}: not valid YAML ({one_line(err).splitlines()[0]})") from None


def read_test_scores(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """``{"scores": {name: value}, "ckpt_path": ..., "config": test_config or None, "file": ...}``.

    ``source`` is a ``test_scores.yaml`` written by ``mpae test`` (its ``test_config.yaml``
    beside it, when present and of the same checkpoint, gives the protocol) or such a mapping.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: it is not a ``test_scores.yaml`` (no ``scores`` mapping of numbers).
    """
    file = None
    if isinstance(source, Mapping):
        data: Any = dict(source)
        where = "test_scores"
    else:
        file = Path(source).expanduser()
        where = f"test_scores {file}"
        if not file.is_file():
            raise FileNotFoundError(
                f"{where} does not exist; pass the test_scores.yaml that `mpae test --ckpt_path ...` writes in the run folder"
            )
        data = _read_yaml(file, "test_scores")
    scores = data.get("scores") if isinstance(data, Mapping) else None
    if not isinstance(scores, Mapping) or not scores or not all(
        isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool) for k, v in scores.items()
    ):
        raise ConfigError(
            f"{where}: not a test_scores.yaml written by `mpae test` (expected a `scores:` mapping of score names "
            "to numbers); run `mpae test --ckpt_path <checkpoint>` and pass the test_scores.yaml it writes"
        )
    config = data.get("config") if isinstance(data.get("config"), Mapping) else None  # already read
    file = file or (Path(data["file"]) if isinstance(data.get("file"), str) else None)
    if config is None and file is not None and (file.parent / "test_config.yaml").is_file():
        candidate = _read_yaml(file.parent / "test_config.yaml", "test config")
        recorded = candidate.get("ckpt_path") if isinstance(candidate, Mapping) else None
        if isinstance(candidate, Mapping) and (recorded or None) == (data.get("ckpt_path") or None):
            config = candidate
    return {"scores": {k: float(v) for k, v in scores.items()}, "ckpt_path": data.get("ckpt_path"),
            "config": config, "file": str(file) if file else None}


def scores_beside_checkpoint(checkpoint: str | os.PathLike[str]) -> tuple[Path | None, str | None]:
    """The run's ``test_scores.yaml`` when it scores ``checkpoint`` as it is now, else ``(None, why not)``.

    It must name this checkpoint and be newer than it (a checkpoint rewritten by more training
    after the test has other scores).
    """
    from .runs import run_folder_of

    run = run_folder_of(checkpoint)
    if run is None:
        return None, f"{checkpoint} is not in a run folder (<run>/checkpoints/), so no test_scores.yaml was looked for"
    file = run.path / "test_scores.yaml"
    if not file.is_file():
        return None, f"no test_scores.yaml in {run.path} (run `mpae test --ckpt_path {checkpoint}` to measure scores)"
    data = _read_yaml(file, "test_scores")
    recorded = data.get("ckpt_path") if isinstance(data, Mapping) else None
    if not recorded or not _same_file(recorded, checkpoint):
        return None, f"{file} scores {recorded or 'other weights'}, not {Path(checkpoint).name}"
    if file.stat().st_mtime < Path(checkpoint).stat().st_mtime:
        return None, f"{file} is older than {checkpoint} (trained further after the test); run `mpae test` again"
    return file, None


def check_scores_belong_to(scores: Mapping[str, Any], weights: str | os.PathLike[str]) -> None:
    """Refuse scores (:func:`read_test_scores`) that ``mpae test`` measured on other weights than ``weights``.

    Raises:
        ConfigError: the scores name another checkpoint or ``weights`` file, or are older than it.
    """
    where = scores.get("file") or "test_scores"
    recorded = scores.get("ckpt_path")
    if not recorded:
        config = scores.get("config") or {}
        model = config.get("model") if isinstance(config, Mapping) else None
        init = (model.get("init_args") if isinstance(model, Mapping) else None) or {}
        recorded = init.get("weights") if isinstance(init, Mapping) else None
    if not recorded:
        return  # nothing recorded to compare with: the caller vouches for them
    if not _same_file(recorded, weights):
        raise ConfigError(
            f"{where} holds the scores of {recorded}, not of {weights}; pass the test_scores.yaml of "
            f"`mpae test` run on {Path(weights).name}, or none"
        )
    file = scores.get("file")
    same = os.path.exists(recorded) and os.path.exists(weights) and os.path.samefile(recorded, weights)
    if file and same and Path(file).stat().st_mtime < Path(weights).stat().st_mtime:
        raise ConfigError(f"{where} is older than {weights} (rewritten after the test); run `mpae test` on it again")


def is_pretrained_folder(path: str | os.PathLike[str]) -> bool:
    """True for a folder holding an MPAE ``config.json`` (one written by ``save_pretrained``)."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("format") == FORMAT


def _hub_error(source: str, err: BaseException) -> WeightsUnavailableError:
    return WeightsUnavailableError(
        f"from_pretrained({source!r}): neither a local folder nor a Hub model that could be fetched "
        f"({type(err).__name__}: {one_line(err).splitlines()[0][:200] if one_line(err) else ''}); pass a folder written "
        "by save_pretrained or `mpae convert`, or, offline, download the Hub folder elsewhere "
        f"(`hf download {source} --local-dir DIR`) and pass DIR"
    )


# --------------------------------------------------------------------------------- the mixin
#: The model card's metadata (the mixin's class arguments, and the card ``save_pretrained`` writes).
CARD_DATA: dict[str, Any] = {
    "library_name": "mpae-lightning",
    "license": "mit",
    "pipeline_tag": "image-segmentation",
    "tags": ["mpae", "part-discovery", "unsupervised", "pytorch", "pytorch-lightning"],
}


def setting_names(cls: type) -> list[str]:
    """The constructor settings of ``cls`` (what ``config.json`` holds), in signature order."""
    params = inspect.signature(cls.__init__).parameters.values()
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in params if p.kind in kinds and p.name not in ("self", "config")]


class PretrainedMixin(ModelHubMixin, **CARD_DATA):
    """``save_pretrained`` / ``from_pretrained`` / ``push_to_hub`` for :class:`~mpae_lightning.MPAEModule`.

    Why a mixin of huggingface_hub's: the folder is the Hub's (safetensors, config.json, model
    card), ``push_to_hub`` and Hub ids work as for any model, and nothing is written by hand.
    The class using it has ``.model`` (an :class:`~mpae_lightning.models.MPAE`) and ``.hparams``
    holding every constructor setting.
    """

    # ------------------------------------------------------------------------------ saving
    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        config: dict | None = None,
        repo_id: str | None = None,
        push_to_hub: bool = False,
        model_card_kwargs: dict[str, Any] | None = None,
        **push_to_hub_kwargs: Any,
    ) -> str | None:
        """Write ``model.safetensors``, ``config.json`` and ``README.md`` to ``save_directory``.

        ``model_card_kwargs`` fill the card: ``test_scores`` (a ``test_scores.yaml`` of
        ``mpae test``, or its contents), ``dataset`` (its name) and ``source`` (what the weights
        were converted from). The card is rewritten at every save, so its scores are always those
        passed now; without ``test_scores`` it says none were measured. ``config`` is refused: the
        settings are the module's own.
        """
        if config is not None:
            raise ConfigError(
                f"save_pretrained(config=...): {type(self).__name__} writes {CONFIG_NAME} from its own settings; "
                "drop config=, or build the module with the settings wanted"
            )
        card = Path(save_directory) / CARD_NAME
        if card.is_file():  # the mixin keeps an existing card; ours must match the weights saved now
            card.unlink()
        return super().save_pretrained(
            save_directory, repo_id=repo_id, push_to_hub=push_to_hub, model_card_kwargs=model_card_kwargs,
            **push_to_hub_kwargs,
        )

    def _frozen_backbone_source(self) -> str | None:
        """Where the frozen backbone came from: random (stored) or a public source (left out)."""
        if getattr(self.model, "backbone", None) is None:
            return None
        return self.frozen_source("backbone")

    def pretrained_config(self) -> dict[str, Any]:
        """The ``config.json`` of this module: every setting, the backbone's source, the format marker."""
        from . import __version__

        names = setting_names(type(self))
        missing = [n for n in names if n not in self.hparams]
        if missing:
            raise ConfigError(f"{type(self).__name__} lacks the settings {missing} in its hparams; cannot write {CONFIG_NAME}")
        config = {name: _plain(self.hparams[name]) for name in names}
        source = self._frozen_backbone_source()
        stored = source is not None and is_random(source)
        config["weights"] = None  # the weights are model.safetensors
        if source is not None:
            config["backbone_weights"] = "random" if stored else str(source)
        config.update(format=FORMAT, format_version=FORMAT_VERSION, mpae_lightning_version=__version__,
                      backbone_in_weights=stored)
        return config

    def _save_pretrained(self, save_directory: Path) -> None:
        """``model.safetensors`` (the model's weights, public frozen backbone left out) and ``config.json``."""
        from safetensors.torch import save_file

        config = self.pretrained_config()
        left_out = "backbone." if self.model.backbone is not None and not config["backbone_in_weights"] else None
        tensors = {
            key: value.detach().to("cpu").contiguous()
            for key, value in self.model.state_dict().items()
            if left_out is None or not key.startswith(left_out)
        }
        metadata = {"format": "pt", "mpae_lightning_format": FORMAT, "format_version": str(FORMAT_VERSION)}
        target = save_directory / WEIGHTS_NAME
        tmp = save_directory / f".{WEIGHTS_NAME}.tmp"
        try:
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, target)  # whole or not at all
        finally:
            tmp.unlink(missing_ok=True)
        (save_directory / CONFIG_NAME).write_text(json.dumps(config, sort_keys=True, indent=2) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------------------ the card
    def generate_model_card(
        self,
        *args: Any,
        test_scores: str | os.PathLike[str] | Mapping[str, Any] | None = None,
        dataset: str | None = None,
        source: str | None = None,
        **kwargs: Any,
    ) -> ModelCard:
        """The model card: dataset, K, backbone, the ``mpae test`` scores with their protocol, citation."""
        if args or kwargs:
            raise TypeError(
                f"model_card_kwargs takes test_scores, dataset and source; got {sorted(kwargs) or list(args)}"
            )
        from . import __version__

        hp = self.hparams
        scores = read_test_scores(test_scores) if test_scores is not None else None
        config = self.pretrained_config()
        tested_data = dataset_name((scores.get("config") or {}).get("data")) if scores else None
        dataset = dataset or tested_data
        k = int(hp["num_parts"])
        title = f"MPAE part discovery: {dataset or 'unknown dataset'}, K = {k}"
        backbone = hp.get("backbone")
        if backbone is None:
            backbone_line = f"none (features given as `backbone_tokens`, width {hp.get('backbone_dim')})"
        elif config["backbone_in_weights"]:
            backbone_line = f"`{backbone}` (frozen; randomly initialised, so its weights are in `{WEIGHTS_NAME}`)"
        else:
            backbone_line = (f"`{backbone}` (frozen; not in `{WEIGHTS_NAME}`: rebuilt from "
                             f"`backbone_weights={config['backbone_weights']}` when loaded)")
        if hp.get("backbone_kwargs"):
            backbone_line += f", timm arguments `{json.dumps(_plain(hp['backbone_kwargs']), sort_keys=True)}`"
        rows = [
            ("dataset", dataset or "not recorded (pass `dataset=` or `mpae convert --dataset`)"),
            ("K (foreground parts)", f"{k} (+ background, the last channel)"),
            ("input size", f"{hp['image_size']} x {hp['image_size']}, ImageNet-normalised RGB, resized bilinearly "
             + ("with antialiasing" if hp.get("input_antialias", True) else "without antialiasing (`input_antialias`)")),
            ("backbone", backbone_line),
            ("feature width C", str(hp["feature_dim"])),
            ("evaluation map", f"{hp['eval_map_size']} x {hp['eval_map_size']}" if hp.get("eval_scale_factor") is None
             else f"patch grid x {hp['eval_scale_factor']}"),
        ]
        if source:
            rows.append(("converted from", source))
        lines = [f"# {title}", "",
                 "Unsupervised part discovery with **MPAE** (*Unsupervised Part Discovery via Descriptor-Based Masked "
                 "Image Restoration with Optimized Constraints*, Xia et al., ICCV 2025), saved by "
                 f"mpae-lightning {__version__}. Given an image, the model returns a map of K part probabilities "
                 "plus background; the parts were found without labels.", "",
                 "## Model", "", "| | |", "| --- | --- |"]
        lines += [f"| {name} | {value} |" for name, value in rows]
        lines += ["", "## Use", "", "```python", "from mpae_lightning import MPAEModule", "",
                  'module = MPAEModule.from_pretrained("path/to/this/folder")  # or the Hub id it was pushed to',
                  f"probs = module.model.predict_parts(images)  # (B, {k + 1}, m, m) part probabilities, background last",
                  "labels = probs.argmax(dim=1)                  # part id per pixel, background = K",
                  "```", "",
                  f"`{WEIGHTS_NAME}` holds the weights of `module.model` (`mpae_lightning.models.MPAE` key names), "
                  f"`{CONFIG_NAME}` every `MPAEModule` setting. Loading reads only these two files (JSON and "
                  "safetensors), so it cannot run code. VGG-19, used only by the training loss, is not included.",
                  "", "## Scores", ""]
        lines += self._score_lines(scores)
        lines += ["", "## Citation", "",
                  "The method and the released checkpoints are the authors' "
                  "([github.com/Jiahao-UTS/MPAE](https://github.com/Jiahao-UTS/MPAE)); please cite:", "",
                  "```bibtex", CITATION, "```", ""]
        card_data = ModelCardData(**CARD_DATA)
        return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))

    @staticmethod
    def _score_lines(scores: Mapping[str, Any] | None) -> list[str]:
        if not scores:
            return ["No scores were measured for these weights: none were given (`test_scores=`) or found beside "
                    "the checkpoint. Run `mpae test --ckpt_path <checkpoint>` and save again with the "
                    "`test_scores.yaml` it writes."]
        config = scores.get("config") or {}
        data = config.get("data") if isinstance(config, Mapping) else None
        trainer = (config.get("trainer") if isinstance(config, Mapping) else None) or {}
        measured = f"`{_short_path(scores['ckpt_path'])}`" if scores.get("ckpt_path") else "these weights"
        lines = [f"Measured by `mpae test` on {measured}"
                 + (f", {dataset_name(data)} test split" if dataset_name(data) else "")
                 + (f" ({_short_path(scores['file'], 3)})" if scores.get("file") else "") + ". "
                 "NMI/ARI and IoU in percent (higher is better).", ""]
        limit = trainer.get("limit_test_batches") if isinstance(trainer, Mapping) else None
        if limit not in (None, 1, 1.0):
            lines += [f"**On a subset**: `limit_test_batches={limit}`, not the whole test split.", ""]
        lines += ["| score | value |", "| --- | --- |"]
        for name, value in sorted(scores["scores"].items()):
            lines.append(f"| `{name}` | {value:.2f} |")
        kinds = [kind for kind in _PROTOCOLS if any(n.split("/")[-1].startswith(kind) for n in scores["scores"])]
        if kinds:
            lines += ["", "Protocol: " + "; ".join(_PROTOCOLS[kind] for kind in kinds) + "."]
        return lines

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        **model_kwargs: Any,
    ) -> Any:
        """Load a folder written by ``save_pretrained`` / ``mpae convert``, or a Hub model id.

        Free settings (``eval_map_size``, ``backbone_weights`` as a local copy of a left-out
        backbone, ``map_location`` ...) may be given; a setting the weights fix (K, sizes, widths,
        the backbone) given differently is refused. Only ``config.json`` and ``model.safetensors``
        are read. The module is returned in eval mode.

        Raises:
            FileNotFoundError: a local folder that does not exist.
            CheckpointError: the folder is not an MPAE folder, or its files are invalid.
            WeightsUnavailableError: a Hub id that cannot be fetched, or a backbone source that cannot be had.
        """
        source = str(pretrained_model_name_or_path)
        path = Path(source).expanduser()
        if path.is_dir():
            source = str(path)
            _check_folder(path)
        elif path.exists():
            hint = (" (an authors' .pth or a .ckpt: turn it into a folder with `mpae convert FILE --out DIR`)"
                    if path.suffix in (".pth", ".pt", ".ckpt", ".bin", ".safetensors") else "")
            raise CheckpointError(f"from_pretrained({source!r}) is a file; pass the folder written by save_pretrained{hint}")
        elif source.startswith(("/", ".", "~")) or source.count("/") > 1 or "\\" in source:
            raise FileNotFoundError(
                f"from_pretrained({source!r}): the folder does not exist; pass a folder written by save_pretrained or "
                "`mpae convert`, or a Hub id such as user/name"
            )
        from huggingface_hub.errors import EntryNotFoundError, HFValidationError

        try:
            # Read and check config.json first: the mixin assumes an object of settings.
            if path.is_dir():
                config_file = str(path / CONFIG_NAME)
            else:
                from huggingface_hub import hf_hub_download

                config_file = hf_hub_download(repo_id=source, filename=CONFIG_NAME, revision=revision,
                                              cache_dir=cache_dir, force_download=force_download, token=token,
                                              local_files_only=local_files_only)
            _read_config_file(config_file, source)
            return super().from_pretrained(
                source, force_download=force_download, token=token, cache_dir=cache_dir,
                local_files_only=local_files_only, revision=revision, **model_kwargs,
            )
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CheckpointError(
                f"{source}/{CONFIG_NAME} is not valid JSON ({one_line(err)}); the folder is damaged or not one "
                "written by save_pretrained: write it again"
            ) from None
        except (CheckpointError, WeightsUnavailableError, ConfigError):
            raise
        except (OSError, EntryNotFoundError, HFValidationError) as err:
            if path.is_dir():
                raise
            raise _hub_error(source, err) from None

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: Any = None,
        map_location: str = "cpu",
        **model_kwargs: Any,
    ) -> Any:
        """Build the module from ``config.json`` (read by the mixin) and fill it from ``model.safetensors``."""
        from .lightning_module import FIXED_BY_CHECKPOINT
        from .runs import hparam_conflicts

        where = model_id
        settings = _checked_config(config, where, setting_names(cls))
        given = {k: v for k, v in model_kwargs.items() if k in FIXED_BY_CHECKPOINT}
        conflicts = hparam_conflicts(given, settings)
        if conflicts:
            name, value, saved = conflicts[0]
            raise ConfigError(
                f"{name}={value} was given, but {where} holds weights for {name}={saved}; the weights fix {name}: "
                "drop the argument"
            )
        if model_kwargs.get("weights"):
            raise ConfigError(f"weights={model_kwargs['weights']} was given, but from_pretrained loads the weights of "
                              f"{where}; drop weights=")
        unknown = sorted(set(model_kwargs) - set(settings) - {"weights"})
        if unknown:
            raise ConfigError(f"from_pretrained({where!r}): unknown setting(s) {unknown} for {cls.__name__}")
        weights_file = _weights_file(model_id, revision, cache_dir, force_download, local_files_only, token)
        keys = _safetensors_keys(weights_file, where)
        stored = any(k.startswith("backbone.") for k in keys)
        if stored != bool(config.get("backbone_in_weights")):
            raise CheckpointError(
                f"{where}: {CONFIG_NAME} says backbone_in_weights={config.get('backbone_in_weights')}, but {WEIGHTS_NAME} "
                f"{'holds' if stored else 'lacks'} backbone.* tensors; the folder is inconsistent: write it again"
            )
        kwargs = {**settings, **model_kwargs, "weights": None}
        if stored:
            kwargs["backbone_weights"] = "random"  # filled from model.safetensors below
        elif kwargs.get("backbone") is not None:
            setting, value = "backbone_weights", kwargs.get("backbone_weights")
            if is_random(value):
                raise ConfigError(
                    f"{where} holds no backbone weights (they are rebuilt from backbone_weights="
                    f"{settings.get('backbone_weights')}), so backbone_weights={value!r} cannot be used; pass the source "
                    "or a local copy of it"
                )
            if is_local_file(value) and not Path(str(value)).expanduser().is_file():
                raise WeightsUnavailableError(
                    f"{where} holds no backbone weights: they are rebuilt from {setting}={value}, which does not exist "
                    f"here; pass {setting}=<a local copy of those weights> (from_pretrained({where!r}, {setting}=...))"
                )
        try:
            module = cls(**kwargs)
        except WeightsUnavailableError as err:
            raise WeightsUnavailableError(
                f"{where} holds no backbone weights, and rebuilding them failed: {err}"
            ) from None
        except (TypeError, ValueError) as err:
            raise CheckpointError(
                f"{where}/{CONFIG_NAME}: cannot build {cls.__name__} from its settings ({one_line(err)})"
            ) from None
        _load_weights(module.model, weights_file, where, skip_backbone=not stored)
        module.to(map_location)
        module.eval()
        return module


# ----------------------------------------------------------------------------- loading helpers
def _check_folder(path: Path) -> None:
    """A local folder must hold both files; say what it holds instead."""
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME) if not (path / name).is_file()]
    if not missing:
        return
    present = sorted(p.name for p in path.iterdir())[:8]
    pickles = [name for name in present if name in _PICKLE_WEIGHTS or name.endswith((".pth", ".ckpt", ".bin"))]
    hint = (f"; {pickles[0]} is a pickle, which is never loaded here: turn it into a folder with "
            f"`mpae convert {path / pickles[0]} --out DIR`") if pickles else ""
    raise CheckpointError(
        f"{path} is not an MPAE pretrained folder: {' and '.join(missing)} missing (it holds {present or 'nothing'}); "
        f"pass a folder written by save_pretrained or `mpae convert`{hint}"
    )


def _check_is_ours(config: Any, where: str) -> None:
    """Refuse a config.json that is not an object carrying our format marker."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{where}/{CONFIG_NAME} holds a {type(config).__name__}, not an object of settings")
    if config.get("format") != FORMAT:
        raise CheckpointError(
            f"{where}/{CONFIG_NAME} is not an MPAE config (\"format\" is {config.get('format')!r}, expected {FORMAT!r}); "
            "pass a folder written by save_pretrained or `mpae convert`"
        )


def _read_config_file(file: str, where: str) -> dict[str, Any]:
    """config.json as an object of settings with our format marker (JSON only: nothing else is parsed)."""
    try:
        with open(file, encoding="utf-8") as handle:
            config = json.load(handle)
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(
            f"{where}/{CONFIG_NAME} is not valid JSON ({one_line(err)}); the folder is damaged or not one written by "
            "save_pretrained: write it again"
        ) from None
    _check_is_ours(config, where)
    return config


def _checked_config(config: Any, where: str, names: list[str]) -> dict[str, Any]:
    """The constructor settings of a config.json, after checking it is ours, complete and nothing more."""
    from .lightning_module import FIXED_BY_CHECKPOINT

    if config is None:
        raise CheckpointError(f"{where} has no {CONFIG_NAME}; pass a folder written by save_pretrained or `mpae convert`")
    _check_is_ours(config, where)
    version = config.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}/{CONFIG_NAME} has format_version {version!r}; this mpae-lightning reads up to {FORMAT_VERSION}: "
            "upgrade mpae-lightning"
        )
    unknown = sorted(set(config) - set(names) - set(METADATA_KEYS))
    if unknown:
        raise CheckpointError(
            f"{where}/{CONFIG_NAME} has settings this mpae-lightning does not know: {unknown[:5]}; upgrade mpae-lightning "
            "or write the folder again"
        )
    missing = sorted(n for n in FIXED_BY_CHECKPOINT if n in names and n not in config)
    if missing:
        raise CheckpointError(f"{where}/{CONFIG_NAME} lacks the settings {missing[:5]}; write the folder again")
    if config.get("weights"):
        raise CheckpointError(
            f"{where}/{CONFIG_NAME} sets weights={config['weights']!r}; a pretrained folder's weights are its "
            f"{WEIGHTS_NAME} only (weights must be null)"
        )
    return {k: v for k, v in config.items() if k in names}


def _weights_file(model_id: str, revision: str | None, cache_dir: Any, force_download: bool,
                  local_files_only: bool, token: Any) -> str:
    if os.path.isdir(model_id):
        return os.path.join(model_id, WEIGHTS_NAME)
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=model_id, filename=WEIGHTS_NAME, revision=revision, cache_dir=cache_dir,
                           force_download=force_download, token=token, local_files_only=local_files_only)


def _safetensors_keys(path: str, where: str) -> set[str]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return set(handle.keys())
    except Exception as err:  # noqa: BLE001 - any failure means the file is not a readable safetensors file
        raise CheckpointError(
            f"{where}/{WEIGHTS_NAME} is not a readable safetensors file ({type(err).__name__}: "
            f"{(one_line(err) or '').splitlines()[0][:160] if one_line(err) else ''}); write the folder again"
        ) from None


def _load_weights(model: Any, path: str, where: str, skip_backbone: bool) -> None:
    """Copy ``model.safetensors`` into ``model``, checked strictly (keys and shapes)."""
    from safetensors.torch import load_file

    try:
        state = load_file(path)
    except Exception as err:  # noqa: BLE001
        raise CheckpointError(f"{where}/{WEIGHTS_NAME} could not be read ({type(err).__name__}); write the folder again") from None
    own = model.state_dict()
    expected = {k for k in own if not (skip_backbone and k.startswith("backbone."))}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    mismatched = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{where}/{WEIGHTS_NAME} does not fit the model {CONFIG_NAME} describes (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatches {mismatched[:3]}); the folder is inconsistent: write it again"
        )
    model.load_state_dict(state, strict=False)
