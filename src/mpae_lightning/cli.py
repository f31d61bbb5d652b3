"""The ``mpae`` command: LightningCLI with MPAE's links and defaults.

Only the command lives here: checkpoints and run folders are :mod:`mpae_lightning.runs`, the
one-line messages :mod:`mpae_lightning.errors`, the model and its settings
:mod:`mpae_lightning.lightning_module`.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys
from typing import Any

from jsonargparse import ArgumentError
from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from . import __version__
from .callbacks import PartPredictionWriter, PartVisualization
from .data.base import PartDataModule
from .errors import ConfigError, run_cleanly, split_debug, unknown_setting
from .guards import ExactResume, NonFiniteGuard, Preemption
from .lightning_module import (
    FIXED_BY_CHECKPOINT,
    FROZEN_PARTS,
    FROZEN_RECORD,
    LINKED_FROM_DATA,
    MPAEModule,
    frozen_parts_left_out,
)
from .runs import (
    as_list,
    check_checkpoint_shapes,
    config_files,
    given_in,
    given_settings,
    import_class,
    preflight,
    read_config_file,
    resolve_checkpoint,
    section_settings,
    use_run_folder,
    write_test_scores,
)

DESCRIPTION = (
    "MPAE (Masked Part AutoEncoder, ICCV 2025): unsupervised part discovery with PyTorch Lightning. "
    "Train, evaluate and predict part maps from a YAML config, e.g. "
    "`mpae fit --config configs/cub.yaml --data.init_args.root /data/CUB_200_2011`; "
    "`mpae fit --help` lists every setting."
)


class MPAECLI(LightningCLI):
    """``mpae fit|validate|test|predict --config configs/<dataset>.yaml``.

    Image size and mini-group are set once, in the ``data`` section, and copied into
    the model; a different value set for the model is refused. The optimiser (Adam)
    and schedule (MultiStepLR) are the model's own settings (``lr``, ``weight_decay``,
    ``milestones``, ``gamma``), so LightningCLI's ``--optimizer``/``--lr_scheduler``
    are not offered. Our samplers shard batches themselves, so Lightning's
    distributed sampler is off by default. With ``--ckpt_path`` the settings come from
    the checkpoint (one given differently, in a config file or on the command line, is
    refused) and the backbone is built randomly and filled from it, so nothing is
    downloaded (unless the checkpoint was saved without it: then it comes from its source).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        trainer_defaults = {"use_distributed_sampler": False, **kwargs.pop("trainer_defaults", {})}
        trainer_defaults["callbacks"] = [*as_list(trainer_defaults.get("callbacks")), ExactResume(), Preemption()]
        # Checkpoints written whole or not at all, beside their target (runs.AtomicCheckpointIO);
        # --trainer.plugins replaces it. A class path, so config.yaml records it and can be re-run.
        trainer_defaults.setdefault("plugins", [{"class_path": "mpae_lightning.runs.AtomicCheckpointIO"}])
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        parser_kwargs = {"description": DESCRIPTION, "version": __version__, **kwargs.pop("parser_kwargs", {})}
        kwargs.setdefault("auto_configure_optimizers", False)
        raw = kwargs.get("args")  # the command line, for telling given settings from defaults
        self._raw_args = [str(a) for a in (sys.argv[1:] if raw is None else raw)] if not isinstance(raw, dict) else []
        self._checkpoint: dict[str, Any] | None = None
        self._given: dict[str, str] = {}
        self._free_settings: dict[str, Any] = {}
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
        # MPAEModule is the model unless another is named, so `--ckpt_path X` alone is a full command.
        parser.set_defaults({"model": {"class_path": "mpae_lightning.MPAEModule"}})
        parser.add_argument(
            "--untrained", type=bool, default=False,
            help="predict with the model's initial weights (random, or --model.init_args.weights); without it, "
                 "predict needs trained weights: --ckpt_path FILE, --ckpt_path last or --model.init_args.weights FILE",
        )
        parser.add_lightning_class_args(PartPredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(PartVisualization, "visualization")
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite")

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)  # a typo is an error, never a silently expanded prefix
        parser = super().init_parser(**kwargs)
        parser.exit_on_error = False  # main() prints parse errors as one `mpae: error:` line
        return parser

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse; then resolve ``--ckpt_path`` (``last``), read the checkpoint once and refuse given
        settings that contradict it. Config files are read first so a YAML error names its line."""
        for path in config_files(self._raw_args):
            read_config_file(path)
        try:
            super().parse_arguments(parser, args)
        except ArgumentError:
            self._check_setting_names()  # an unknown name gets "did you mean"
            raise
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            self._given = given_settings(self._raw_args, subcommand, LINKED_FROM_DATA)
            self._checkpoint = resolve_checkpoint(config, self._given, LINKED_FROM_DATA, FIXED_BY_CHECKPOINT)
            if self._checkpoint is not None:  # the user's free settings win over the checkpoint's
                model_args = config["model"].get("init_args") or {}
                self._free_settings = {
                    name: model_args[name] for name, where in self._given.items()
                    if name not in FIXED_BY_CHECKPOINT and name in model_args and given_in(where, "model")
                }

    def _check_setting_names(self) -> None:
        """Refuse a model, data or trainer setting the chosen class does not take, suggesting the closest."""
        raw = self._raw_args
        subcommand = raw[0] if raw and raw[0] in self.subcommands() else None
        given: list[tuple[str, str, str]] = []  # (section, name, where)
        classes = {"model": "mpae_lightning.MPAEModule", "data": None}
        for path in config_files(raw):
            data = read_config_file(path)
            data = dict(data[subcommand]) if subcommand and isinstance(data.get(subcommand), dict) else data
            for section in ("model", "data", "trainer"):
                spec = data.get(section)
                if isinstance(spec, dict) and spec.get("class_path") and section in classes:
                    classes[section] = spec["class_path"]
                names = spec.keys() if section == "trainer" and isinstance(spec, dict) else section_settings(spec)
                given += [(section, name, path) for name in names]
        for token in raw:
            key = token[2:].split("=", 1)[0].rstrip("+") if token.startswith("--") else ""
            section, _, rest = key.partition(".")
            if section in ("model", "data") and rest in ("", "class_path"):
                value = token.split("=", 1)[1] if "=" in token else None
                classes[section] = value or classes[section]
            elif section in ("model", "data", "trainer") and rest:
                name = rest.removeprefix("init_args.").split(".", 1)[0]
                if name not in ("init_args", "class_path", "dict_kwargs", "help"):
                    given.append((section, name, "the command line"))
        for section, name, where in given:
            cls = Trainer if section == "trainer" else _find_class(classes[section])
            known = _init_names(cls) if cls is not None else None
            if known is not None and name not in known:
                prefix = section if section == "trainer" else f"{section}.init_args"
                raise unknown_setting(prefix, name, known, where)

    def _link_data_into_model(self, config: Any) -> None:
        """Copy image size and mini-group from ``data`` into ``model``; refuse a model value set apart.

        Not a jsonargparse link: a link silently overwrites what the user set for the model.
        """
        model_args, data_args = config["model"]["init_args"], config["data"]["init_args"]
        for name in LINKED_FROM_DATA:
            if data_args.get(name) is None:
                continue
            own, wanted = model_args.get(name), data_args[name]
            if own != wanted and given_in(self._given.get(name, ""), "model"):
                raise ConfigError(
                    f"model.init_args.{name}={own} conflicts with data.init_args.{name}={wanted}: "
                    f"{name} is set in the data section only (--data.init_args.{name} {own}); "
                    "the model takes it from there"
                )
            model_args[name] = wanted

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        for name, value in self._free_settings.items():  # Lightning filled the checkpoint's values
            config["model"]["init_args"][name] = value
        self._link_data_into_model(config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path:
            # A backbone the checkpoint holds is built randomly and then filled from it; one it was
            # saved without is rebuilt from its source. VGG (training only) is fetched lazily.
            if self._checkpoint is not None:  # already read (memory-mapped) by parse_arguments
                left_out = dict(self._checkpoint.get(FROZEN_RECORD) or {})
            else:
                left_out = frozen_parts_left_out(ckpt_path) if os.path.isfile(ckpt_path) else {}
            if "backbone" not in left_out:
                config["model"]["init_args"][FROZEN_PARTS["backbone"][1]] = "random"
        if self.subcommand:
            use_run_folder(config, self.subcommand, self.save_config_kwargs, self._raw_args)
            preflight(config, self.subcommand)
        if self.subcommand == "predict" and not config.get("ckpt_path") and not config.get("untrained") and not (
            config["model"].get("init_args") or {}
        ).get("weights"):
            raise ConfigError(
                "predict needs trained weights: pass --ckpt_path <run>/checkpoints/last.ckpt (or --ckpt_path last, "
                "or --model.init_args.weights FILE); --untrained true predicts with the initial, untrained weights"
            )

    def after_instantiate_classes(self) -> None:
        if self._checkpoint is not None:
            check_checkpoint_shapes(self.model, self._checkpoint, str(self.config[self.subcommand]["ckpt_path"]))
            self._checkpoint = None  # release the memory map before training

    def after_test(self) -> None:
        """Store the test scores beside the run (``<run>/test_scores.yaml``)."""
        write_test_scores(self.trainer)


def _find_class(class_path: str | None) -> type | None:
    """The class a ``class_path`` (or a short name of one of ours) names, or None if unknown."""
    if not class_path:
        return None
    for candidate in (class_path, f"mpae_lightning.{class_path}", f"mpae_lightning.data.{class_path}"):
        if "." not in candidate:
            continue
        try:
            return import_class(candidate)
        except (ImportError, AttributeError, ValueError):
            continue
    return None


def _init_names(cls: type) -> set[str] | None:
    """The keyword names ``cls(...)`` takes, or None when it takes any (``**kwargs``)."""
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


#: Commands beside LightningCLI's fit/validate/test/predict: name -> "module:function(argv) -> exit code".
EXTRA_COMMANDS = {
    "check-data": "mpae_lightning.check_data:check_data_main",
}


def main(args: list[str] | None = None) -> None:
    """Console entry point: user errors as one line (exit 2), pre-emption as exit 128 + signal.

    ``MPAE_DEBUG=1`` or ``--debug`` shows the traceback instead.
    """
    argv, debug = split_debug([str(a) for a in (sys.argv[1:] if args is None else args)])

    def body() -> None:
        if argv[:1] and argv[0] in EXTRA_COMMANDS:
            module, _, function = EXTRA_COMMANDS[argv[0]].partition(":")
            raise SystemExit(getattr(importlib.import_module(module), function)(argv[1:]))
        if args is None:  # from the console: LightningCLI reads sys.argv (without --debug)
            sys.argv[1:] = argv
        MPAECLI(args=None if args is None else argv)

    run_cleanly(body, argv, debug)


if __name__ == "__main__":
    main()
