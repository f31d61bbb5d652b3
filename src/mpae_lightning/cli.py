"""The ``mpae`` command: LightningCLI with MPAE's links and defaults (no model logic here)."""
from __future__ import annotations

import importlib
import inspect
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentError
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import SIGTERMException

from . import __version__
from .callbacks import PartPredictionWriter, PartVisualization
from .data.base import PartDataModule
from .errors import CheckpointError, ConfigError, Interrupted, NonFiniteLossError, find_user_error, one_line
from .guards import ExactResume, NonFiniteGuard, Preemption, stop_signals
from .lightning_module import FROZEN_PARTS, FROZEN_RECORD, MPAEModule, frozen_parts_left_out
from .models import MPAE
from .runs import (
    check_writable,
    explicit_model_keys,
    find_last_checkpoint,
    hparam_conflicts,
    read_checkpoint,
    run_folder_of,
)

DESCRIPTION = (
    "MPAE (Masked Part AutoEncoder, ICCV 2025): unsupervised part discovery with PyTorch Lightning. "
    "Train, evaluate and predict part maps from a YAML config, e.g. "
    "`mpae fit --config configs/cub.yaml --data.init_args.root /data/CUB_200_2011`; "
    "`mpae fit --help` lists every setting."
)

#: Model settings the data section decides (model argument -> data argument).
LINKED_FROM_DATA = {"image_size": "image_size", "mini_group": "mini_group"}


class MPAECLI(LightningCLI):
    """``mpae fit|validate|test|predict --config configs/<dataset>.yaml``.

    Image size and mini-group are set once, in the ``data`` section, and copied into
    the model; a different value set for the model is refused. The optimiser (Adam)
    and schedule (MultiStepLR) are the model's own settings (``lr``, ``weight_decay``,
    ``milestones``, ``gamma``), so LightningCLI's ``--optimizer``/``--lr_scheduler``
    are not offered. Our samplers shard batches themselves, so Lightning's
    distributed sampler is off by default. With ``--ckpt_path`` the backbone and VGG
    are built randomly and filled from the checkpoint, so nothing is downloaded
    (unless the checkpoint was saved without them: then they come from their sources).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        trainer_defaults = {"use_distributed_sampler": False, **kwargs.pop("trainer_defaults", {})}
        trainer_defaults["callbacks"] = [*_as_list(trainer_defaults.get("callbacks")), ExactResume(), Preemption()]
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = {"description": DESCRIPTION, "version": __version__, **kwargs.pop("parser_kwargs", {})}
        kwargs.setdefault("auto_configure_optimizers", False)
        raw = kwargs.get("args")  # the command line, for telling explicit arguments from config values
        self._raw_args = [str(a) for a in (sys.argv[1:] if raw is None else raw)] if not isinstance(raw, dict) else []
        self._checkpoint: dict[str, Any] | None = None
        super().__init__(
            MPAEModule,
            PartDataModule,
            *args,
            subclass_mode_model=True,
            subclass_mode_data=True,
            trainer_defaults=trainer_defaults,
            parser_kwargs=parser_kwargs,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(PartPredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(PartVisualization, "visualization")
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite")

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False  # main() prints parse errors as one `mpae: error:` line
        return parser

    def _parse_ckpt_path(self) -> None:
        """Resolve ``--ckpt_path last``, read the checkpoint once, refuse contradicting arguments."""
        subcommand = self.config.get("subcommand")
        if subcommand:
            self._checkpoint = resolve_checkpoint(self.config[subcommand], self._raw_args)
        super()._parse_ckpt_path()

    def _link_data_into_model(self, config: Any) -> None:
        """Copy image size and mini-group from ``data`` into ``model``; refuse a different model value.

        Not a jsonargparse link: a link silently overwrites what the user set for the model.
        A value equal to the model's default is taken as unset.
        """
        model_args, data_args = config["model"]["init_args"], config["data"]["init_args"]
        model_class = _import(config["model"]["class_path"])
        for model_key, data_key in LINKED_FROM_DATA.items():
            if data_args.get(data_key) is None:
                continue
            own, wanted = model_args.get(model_key), data_args[data_key]
            if own is not None and own != _default(model_class, model_key) and own != wanted:
                self.parser.error(
                    f"model.init_args.{model_key}={own} conflicts with data.init_args.{data_key}={wanted}: "
                    f"{model_key} is set in the data section only (--data.init_args.{data_key} {own}); "
                    "the model takes it from there"
                )
            model_args[model_key] = wanted

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        self._link_data_into_model(config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path:
            # Frozen weights the checkpoint holds are built randomly and then filled from it;
            # those it was saved without are rebuilt from their sources.
            if self._checkpoint is not None:  # already read (memory-mapped) by _parse_ckpt_path
                left_out = dict(self._checkpoint.get(FROZEN_RECORD) or {})
            else:
                left_out = frozen_parts_left_out(ckpt_path) if os.path.isfile(ckpt_path) else {}
            for part, (_, setting) in FROZEN_PARTS.items():
                if part not in left_out:
                    config["model"]["init_args"][setting] = "random"

        if self.subcommand:
            use_run_folder(config, self.subcommand, self.save_config_kwargs, self._raw_args)
            preflight(config, self.subcommand)

    def after_instantiate_classes(self) -> None:
        if self._checkpoint is not None:
            check_checkpoint_shapes(self.model, self._checkpoint, str(self.config[self.subcommand]["ckpt_path"]))
            self._checkpoint = None  # release the memory map before training

    def after_test(self) -> None:
        """Store the test scores beside the run (``<run>/test_scores.yaml``)."""
        write_test_scores(self.trainer)


def _import(class_path: str) -> type:
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def _default(cls: type, name: str) -> Any:
    """Default of ``cls(name=...)``, following ``**kwargs`` into MPAE (which MPAEModule forwards them to)."""
    for owner in (cls, MPAE):
        param = inspect.signature(owner).parameters.get(name)
        if param is not None:
            return param.default
    return inspect.Parameter.empty


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ------------------------------------------------------------------ checkpoints and run folders
def _log_roots(config: Any) -> tuple[list[Path], list[Path]]:
    """Where runs live (``<save_dir>/<name>`` of the logger) and other checkpoint folders."""
    trainer = config["trainer"]
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    roots, extra = [], [root / "checkpoints"]
    for logger in _as_list(trainer.get("logger")):
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if init is not None and init.get("save_dir") is not None:
            roots.append(Path(init["save_dir"]) / str(init.get("name") or ""))
    if not roots:
        roots.append(root / "lightning_logs")
    for callback in _as_list(trainer.get("callbacks")):
        init = callback.get("init_args") if hasattr(callback, "get") else None
        if init is not None and init.get("dirpath"):
            extra.append(Path(init["dirpath"]))
    return roots, extra


def resolve_checkpoint(config: Any, raw_args: list[str]) -> dict[str, Any] | None:
    """Turn ``ckpt_path`` into a readable file and return the checkpoint (memory-mapped).

    ``last`` means the last checkpoint of the newest run of this config; when there is none the
    command fails (it never trains from scratch silently). Explicit command-line model arguments
    that disagree with the checkpoint's hyper-parameters are refused, since Lightning would
    silently replace them with the checkpoint's.
    """
    ckpt_path = config.get("ckpt_path")
    if not ckpt_path:
        return None
    if str(ckpt_path) in ("best", "hpc", "registry") or str(ckpt_path).startswith("registry:"):
        return None
    if str(ckpt_path) == "last":
        roots, extra = _log_roots(config)
        found = find_last_checkpoint(roots, extra)
        if found is None:
            where = ", ".join(str(r / "version_*" / "checkpoints") for r in roots)
            raise CheckpointError(
                f"--ckpt_path last: no checkpoint found in {where}; train first (mpae fit without --ckpt_path) "
                "or pass the checkpoint file"
            )
        config["ckpt_path"] = ckpt_path = str(found)
    checkpoint = read_checkpoint(str(ckpt_path))
    hparams = checkpoint.get("hyper_parameters") or {}
    explicit = explicit_model_keys(raw_args)
    values = {}
    for name, typed in explicit.items():
        section = "data" if typed.startswith("--data.") else "model"
        values[name] = config[section]["init_args"].get(name)
    conflicts = hparam_conflicts(values, hparams)
    if conflicts:
        name, given, saved = conflicts[0]
        others = f" (and {', '.join(c[0] for c in conflicts[1:])})" if len(conflicts) > 1 else ""
        raise CheckpointError(
            f"{explicit[name]}={given} disagrees with the checkpoint {ckpt_path}, which has {name}={saved}{others}; "
            "drop the argument to use the checkpoint's value, or train a new model without --ckpt_path"
        )
    return checkpoint


def check_checkpoint_shapes(model: torch.nn.Module, checkpoint: dict[str, Any], path: str) -> None:
    """Refuse a checkpoint whose tensors do not fit the model built from the settings (one line, not 100)."""
    own = model.state_dict()
    for key, value in checkpoint.get("state_dict", {}).items():
        if key in own and hasattr(value, "shape") and tuple(value.shape) != tuple(own[key].shape):
            raise CheckpointError(
                f"ckpt_path={path} does not fit the model these settings build: {key} has shape "
                f"{tuple(value.shape)} in the checkpoint and {tuple(own[key].shape)} here; use the settings it was "
                "trained with (its config.yaml sits in the run folder)"
            )


def use_run_folder(config: Any, subcommand: str, save_config_kwargs: dict[str, Any], raw_args: list[str]) -> None:
    """One run, one folder: a run's own checkpoint sends logs, configs, scores and predictions back to it.

    Resumed fits continue in the run's version folder; test and validate log there (with
    ``<subcommand>_config.yaml`` instead of overwriting the training ``config.yaml``); predict
    writes to ``<run>/predictions`` unless ``--prediction_writer.output_dir`` is given.
    """
    if subcommand != "fit":
        save_config_kwargs["config_filename"] = f"{subcommand}_config.yaml"
    ckpt_path = config.get("ckpt_path")
    run = run_folder_of(ckpt_path) if ckpt_path and os.path.isfile(str(ckpt_path)) else None
    if run is None:
        return
    for logger in _as_list(config["trainer"].get("logger")):
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if init is not None and "save_dir" in init and "version" in init:
            init["save_dir"], init["name"], init["version"] = run.save_dir, run.name, run.version
    if subcommand == "predict" and not any(a.startswith("--prediction_writer.output_dir") for a in raw_args):
        writer = config.get("prediction_writer")
        if writer is not None:
            writer["output_dir"] = str(run.path / "predictions")


def write_test_scores(trainer: Any) -> None:
    """Write the logged ``test/*`` scores to ``<log_dir>/test_scores.yaml`` (rank 0)."""
    if trainer.global_rank != 0 or not trainer.log_dir:
        return
    scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    if scores:
        path = Path(trainer.log_dir) / "test_scores.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump({"ckpt_path": trainer.ckpt_path, "scores": scores}, sort_keys=True))


# ------------------------------------------------------------------------------------ pre-flight
def preflight(config: Any, subcommand: str) -> None:
    """Check every setting and output folder before any model is built or weight downloaded.

    The DataModule is built once (its constructor only checks arguments); the model is built on
    the ``meta`` device with random weight sources, which runs every constructor check (part
    count, mask ratio, image size against the patch size, ...) without allocating or downloading.
    """
    for section in ("data", "model"):
        spec = config.get(section)
        if spec is None or not spec.get("class_path"):
            continue
        init_args = spec["init_args"].as_dict() if hasattr(spec["init_args"], "as_dict") else dict(spec["init_args"] or {})
        if section == "model":
            init_args.update(backbone_weights="random", vgg_weights="random", weights=None)
        try:
            if section == "model":
                with torch.device("meta"):
                    model = _import(spec["class_path"])(**init_args)
                    if hasattr(model, "configure_optimizers"):
                        model.configure_optimizers()  # optimizer settings (lr, betas, ...) checked too
            else:
                _import(spec["class_path"])(**init_args)
        except (ValueError, TypeError, RuntimeError, KeyError, ArithmeticError) as err:
            # Built from the settings alone, so any refusal is about a setting.
            raise ConfigError(f"{section}.init_args ({spec['class_path'].rsplit('.', 1)[-1]}): {one_line(err)}") from err
    trainer = config["trainer"]
    check_writable("trainer.default_root_dir", trainer.get("default_root_dir"))
    for i, logger in enumerate(_as_list(trainer.get("logger"))):
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if init is not None:
            check_writable("trainer.logger.init_args.save_dir", init.get("save_dir"))
    for callback in _as_list(trainer.get("callbacks")):
        init = callback.get("init_args") if hasattr(callback, "get") else None
        if init is not None and init.get("dirpath"):
            check_writable(f"{callback['class_path'].rsplit('.', 1)[-1]}.dirpath", init["dirpath"])
    if subcommand == "predict" and config.get("prediction_writer") is not None:
        check_writable("prediction_writer.output_dir", config["prediction_writer"].get("output_dir"))


# ---------------------------------------------------------------------------------- entry point
def parse_error_line(message: str, argv: list[str]) -> str:
    """One line from jsonargparse's nested message: the full key, what was expected, and the value given.

    ``Parser key "model": ... Parser key "num_parts": Expected a <class 'int'>. Got value: abc`` becomes
    ``model.init_args.num_parts: expected a <class 'int'>. Got value: abc``.
    """
    lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
    keys = re.findall(r'Parser key "([^"]+)"', message)
    subcommand = next((a for a in argv if not a.startswith("-")), "fit")
    fix = f"see `mpae {subcommand} --help` for the accepted values"
    if not keys:
        return f"{lines[0] if lines else message}; {fix}"
    path = keys[0] + ("".join(f".init_args.{k}" for k in keys[1:2]) if keys[0] in ("model", "data") else "")
    last = max(i for i, line in enumerate(lines) if 'Parser key "' in line)
    detail = lines[last].split(":", 1)[1].strip() if lines[last].count(":") and not lines[last].endswith(":") else ""
    rest = [line.lstrip("- ") for line in lines[last + 1:] if not line.startswith(("Subtypes:", "Errors:", "Given value type"))]
    if not detail:
        detail = rest[0] if rest else ""
        if detail.startswith("Does not validate") and len(rest) > 1:
            given = next((line for line in rest if line.startswith("Given value:")), "")
            detail = f"{rest[1]}. {given}".strip(". ")
    return f"{path}: {detail}; {fix}"



def split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether the traceback is wanted (``--debug`` or ``MPAE_DEBUG=1``)."""
    return [a for a in argv if a != "--debug"], bool(os.environ.get("MPAE_DEBUG")) or "--debug" in argv


def run_cleanly(
    body: Callable[[], Any], argv: list[str], debug: bool, interrupted: Callable[[Interrupted], str] | None = None
) -> None:
    """Run a command's ``body`` as the ``mpae`` commands end: user errors as one line (exit 2), a
    non-finite loss as one line (exit 1), pre-emption as one line and exit 128 + signal.

    Args:
        body: the command's work.
        argv: its arguments, quoted by the parse-error line.
        debug: re-raise instead (``MPAE_DEBUG=1`` / ``--debug``): the full traceback.
        interrupted: the line to print on SIGTERM/SIGINT (default: ``Interrupted.message``).
    """
    try:
        with stop_signals():
            body()
    except Interrupted as stop:
        print(interrupted(stop) if interrupted else stop.message(), file=sys.stderr)
        raise SystemExit(stop.exit_code) from None
    except SIGTERMException:
        print("mpae: stopped by SIGTERM; no checkpoint was written", file=sys.stderr)
        raise SystemExit(143) from None
    except ArgumentError as err:
        if debug:
            raise
        print(f"mpae: error: {parse_error_line(str(err), argv)}", file=sys.stderr)
        raise SystemExit(2) from None
    except NonFiniteLossError as err:
        if debug:
            raise
        print(f"mpae: error: {err}", file=sys.stderr)
        raise SystemExit(1) from None
    except Exception as err:  # noqa: BLE001 - only user errors are turned into a message
        user = find_user_error(err)
        if user is None or debug:
            raise
        print(f"mpae: error: {one_line(user)}", file=sys.stderr)
        raise SystemExit(2) from None


def main(args: list[str] | None = None) -> None:
    """Console entry point: user errors as one line (exit 2), pre-emption as exit 128 + signal.

    ``MPAE_DEBUG=1`` or ``--debug`` shows the traceback instead.
    """
    argv, debug = split_debug([str(a) for a in (sys.argv[1:] if args is None else args)])

    def body() -> None:
        if argv[:1] == ["check-data"]:
            from .check_data import check_data_main

            raise SystemExit(check_data_main(argv[1:]))
        if args is None:  # from the console: LightningCLI reads sys.argv (without --debug)
            sys.argv[1:] = argv
        MPAECLI(args=None if args is None else argv)

    run_cleanly(body, argv, debug)


if __name__ == "__main__":
    main()
