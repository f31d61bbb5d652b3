"""The ``mpae`` command: LightningCLI with MPAE's links and defaults.

Only the command lives here: checkpoints and run folders are :mod:`mpae_lightning.runs`, the
one-line messages :mod:`mpae_lightning.errors`, the model and its settings
:mod:`mpae_lightning.lightning_module`.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import inspect
import logging
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import torch
from jsonargparse import ArgumentError, DefaultHelpFormatter
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
    find_class,
    given_in,
    given_settings,
    preflight,
    read_config_file,
    resolve_checkpoint,
    run_folder_of,
    section_settings,
    use_run_folder,
    write_test_scores,
)

#: The four LightningCLI commands, in our words (``mpae --help`` and each command's ``--help``).
COMMANDS = {
    "fit": "train a model from a config, or resume a run with --ckpt_path",
    "validate": "score a checkpoint on the validation images (scores logged in its run folder)",
    "test": "score a checkpoint on the test split: NMI/ARI table and <run>/test_scores.yaml",
    "predict": "write the part maps of images (.png, .npy, overlay) with a checkpoint",
}

DESCRIPTION = """\
MPAE (Masked Part AutoEncoder, ICCV 2025): unsupervised part discovery with PyTorch Lightning.
Train, evaluate and predict part maps from a YAML config, e.g.
  mpae fit --config configs/cub.yaml --data.init_args.root /data/CUB_200_2011
  mpae test --config configs/cub.yaml --data.init_args.root /data/CUB_200_2011 --ckpt_path last
`mpae <command> --help` lists every setting of a command."""

#: ``--ckpt_path`` as the mpae command understands it (LightningCLI's text speaks of Trainer arguments).
CKPT_PATH_HELP = (
    "the checkpoint to use: a .ckpt file (e.g. <run>/checkpoints/last.ckpt) or `last`, the last checkpoint "
    "of the newest run of this config (its logger's save_dir/name). The model settings come from the "
    "checkpoint (one given differently is refused) and test, validate and predict write into that run's "
    "folder; fit resumes the run where it stopped. Without it, fit starts from scratch"
)

#: Lightning's advertisements ("Tip: ... litlogger / litmodels") come through these loggers.
_TIP_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero")
#: Warnings about other libraries' internals a user of mpae can do nothing about: (message regex, category).
_QUIET_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # MPAECLI reads ``args`` when given and sys.argv otherwise, never both: nothing to warn about.
    (r"LightningCLI's args parameter is intended to run from within Python", Warning),
)


class HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (types, defaults) with descriptions printed as written, so examples and
    command lists keep their lines."""


class _DropTips(logging.Filter):
    """Drop Lightning's "💡 Tip: install ..." lines; every other message passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """While an mpae command runs: no Lightning tips, no warnings about library internals.

    Scoped (filters removed afterwards), so importing mpae_lightning changes nothing for other code.
    """
    tips = _DropTips()
    loggers = [logging.getLogger(name) for name in _TIP_LOGGERS]
    for logger in loggers:
        logger.addFilter(tips)
    try:
        with warnings.catch_warnings():
            for message, category in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=message, category=category)
            yield
    finally:
        for logger in loggers:
            logger.removeFilter(tips)


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
        parser_kwargs = {
            "description": f"{DESCRIPTION}\n\ncommands:\n{command_list()}",
            "usage": f"mpae [-h] [--version] [-c CONFIG] {{{','.join([*COMMANDS, *EXTRA_COMMANDS])}}} ...",
            "version": __version__,
            "formatter_class": HelpFormatter,
            **kwargs.pop("parser_kwargs", {}),
        }
        epilog = model_settings_help()
        for name, help_text in COMMANDS.items():  # each command's --help starts with our words, ends with MPAE's settings
            parser_kwargs[name] = {"description": f"mpae {name}: {help_text}.", "epilog": epilog,
                                   "formatter_class": HelpFormatter, **parser_kwargs.get(name, {})}
        kwargs.setdefault("auto_configure_optimizers", False)
        raw = kwargs.get("args")  # the command line, for telling given settings from defaults
        self._raw_args = [str(a) for a in (sys.argv[1:] if raw is None else raw)] if not isinstance(raw, dict) else []
        self._checkpoint: dict[str, Any] | None = None
        self._given: dict[str, str] = {}
        self._free_settings: dict[str, Any] = {}
        self._start_epoch: int | None = None
        with quiet_lightning():  # no tips, no warnings about library internals
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
        parser.add_argument(
            "--out", type=Optional[str], default=None,
            help="predict: the folder for the part maps (default: <run>/predictions of the --ckpt_path run, else "
                 "./predictions); the same as --prediction_writer.output_dir",
        )
        parser.add_lightning_class_args(PartPredictionWriter, "prediction_writer")
        parser.add_lightning_class_args(PartVisualization, "visualization")
        parser.add_lightning_class_args(NonFiniteGuard, "non_finite")
        # Ours instead of Trainer.fit's (skipped in subcommands()), for a help in mpae's meaning.
        parser.add_argument("--ckpt_path", type=Optional[str], default=None, help=CKPT_PATH_HELP)

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        """LightningCLI's commands; ``ckpt_path`` is our own argument (see :data:`CKPT_PATH_HELP`)."""
        return {name: {*skip, "ckpt_path"} for name, skip in LightningCLI.subcommands().items()}

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if add_subcommands:  # `mpae test` prints its own table (after_test); --verbose true adds Lightning's
            self.parser.set_defaults({"test.verbose": False})

    # The commands, with our --ckpt_path handed to the Trainer (LightningCLI runs a method of this
    # name when the CLI has one).
    def fit(self, model: Any, **kwargs: Any) -> None:
        """``mpae fit``: Trainer.fit with ``--ckpt_path``."""
        self.trainer.fit(model, ckpt_path=self._ckpt_path(), **kwargs)

    def validate(self, model: Any, **kwargs: Any) -> None:
        """``mpae validate``: Trainer.validate with ``--ckpt_path``."""
        self.trainer.validate(model, ckpt_path=self._ckpt_path(), **kwargs)

    def test(self, model: Any, **kwargs: Any) -> None:
        """``mpae test``: Trainer.test with ``--ckpt_path``."""
        self.trainer.test(model, ckpt_path=self._ckpt_path(), **kwargs)

    def predict(self, model: Any, **kwargs: Any) -> None:
        """``mpae predict``: Trainer.predict with ``--ckpt_path``."""
        self.trainer.predict(model, ckpt_path=self._ckpt_path(), **kwargs)

    def _ckpt_path(self) -> str | None:
        """The resolved ``--ckpt_path`` of the running command (``last`` already turned into a file)."""
        value = self.config[self.subcommand].get("ckpt_path") if self.subcommand else None
        return str(value) if value else None

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
            cls = Trainer if section == "trainer" else find_class(classes[section])
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
            self._use_out(config)
            if self.subcommand != "fit":
                no_default_hp_metric(config)
            preflight(config, self.subcommand)
        if self.subcommand == "predict" and not config.get("ckpt_path") and not config.get("untrained") and not (
            config["model"].get("init_args") or {}
        ).get("weights"):
            raise ConfigError(
                "predict needs trained weights: pass --ckpt_path <run>/checkpoints/last.ckpt (or --ckpt_path last, "
                "or --model.init_args.weights FILE); --untrained true predicts with the initial, untrained weights"
            )

    def _use_out(self, config: Any) -> None:
        """``--out DIR``: where predict writes (the writer's ``output_dir``); refused elsewhere or when it
        contradicts ``--prediction_writer.output_dir``."""
        out = config.get("out")
        if not out:
            return
        if self.subcommand != "predict":
            raise ConfigError(f"--out {out} is an option of mpae predict (where the part maps go); "
                              f"mpae {self.subcommand} writes into its run folder: drop --out")
        writer = config.get("prediction_writer")
        given = any(a.startswith("--prediction_writer.output_dir") for a in self._raw_args)
        if given and writer is not None and str(writer.get("output_dir")) != str(out):
            raise ConfigError(f"--out {out} and --prediction_writer.output_dir {writer.get('output_dir')} disagree: "
                              "pass one of them")
        if writer is not None:
            writer["output_dir"] = str(out)

    def after_instantiate_classes(self) -> None:
        if self._checkpoint is not None:
            check_checkpoint_shapes(self.model, self._checkpoint, str(self.config[self.subcommand]["ckpt_path"]))
            self._start_epoch = int(self._checkpoint.get("epoch", 0))
            self._checkpoint = None  # release the memory map before training

    # ---------------------------------------------------------- what each command says at the end
    def _say(self, line: str) -> None:
        """A command's last line, on stdout, once (rank 0)."""
        if self.trainer.is_global_zero:
            print(f"mpae: {line}", flush=True)

    def after_fit(self) -> None:
        """``mpae: trained N epochs; run folder <run>; checkpoint <run>/checkpoints/last.ckpt``."""
        callback = self.trainer.checkpoint_callback
        ckpt = (callback.last_model_path or callback.best_model_path) if callback is not None else ""
        epochs = self.trainer.current_epoch
        trained = f"trained {epochs} epoch{'s' if epochs != 1 else ''}"
        if self._start_epoch is not None:
            trained = f"trained to epoch {epochs} (resumed from {self._ckpt_path()})"
        where = f"checkpoint {ckpt}" if ckpt else "no checkpoint written (no ModelCheckpoint callback)"
        # The checkpoint's run folder when there is one: under ddp_spawn this (main) process's logger
        # never ran and would name a new, empty version folder.
        run = run_folder_of(ckpt) if ckpt else None
        self._say(f"{trained}; run folder {run.path if run is not None else self.trainer.log_dir}; {where}")

    def after_validate(self) -> None:
        """``mpae: validation scores logged in <run>``."""
        self._say(f"validation scores logged in {self.trainer.log_dir}")

    def before_test(self) -> None:
        """Refuse data with nothing to score before the test loop runs (exit 2, no scores file)."""
        datamodule = self.datamodule
        flags = [getattr(datamodule, name, None) for name in ("has_keypoints", "has_masks")]
        # A PartDataModule that says so (another DataModule is tried); binary object masks
        # (has_fg_masks: CUB or Flowers-102 with segmentations) are something to score too.
        if flags == [False, False] and not getattr(datamodule, "has_fg_masks", False):
            raise ConfigError(f"mpae test: {_nothing_to_score(datamodule)}")

    def after_test(self) -> None:
        """Print the scores in the papers' layout and store them (``<run>/test_scores.yaml``)."""
        scores = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("test/")}
        if not scores:
            raise ConfigError(f"mpae test: {_nothing_to_score(self.datamodule)}")
        path = write_test_scores(self.trainer)
        if self.trainer.is_global_zero:
            print(score_table(scores), flush=True)
        self._say(f"scores written to {path}" if path else "scores not written (no log folder)")

    def after_predict(self) -> None:
        """``mpae: wrote N files (part maps and overlays) for M images to <folder>``."""
        writers = [cb for cb in self.trainer.callbacks if isinstance(cb, PartPredictionWriter)]  # type: ignore[attr-defined]
        if not writers:
            self._say("predictions done (no PartPredictionWriter: nothing written by mpae)")
            return
        for writer in writers:
            counts = torch.tensor([writer.images_written, writer.files_written], device=self.trainer.strategy.root_device)
            if self.trainer.world_size > 1:  # each process wrote its own share
                counts = self.trainer.strategy.reduce(counts, reduce_op="sum")
            images, files = (int(c) for c in counts.tolist())
            self._say(
                f"wrote {files} files (part map .png and .npy, overlay .png) for {images} images to "
                f"{writer.output_dir}"
            )


#: Rows of the ``mpae test`` table: (row, NMI key, ARI key) then (row, key) for single scores.
_PAIR_ROWS = (
    ("keypoints", "keypoint_nmi", "keypoint_ari"),
    ("keypoints, foreground only", "keypoint_fg_nmi", "keypoint_fg_ari"),
    ("part masks", "mask_nmi", "mask_ari"),
    ("part masks, foreground only", "mask_fg_nmi", "mask_fg_ari"),
)
_SINGLE_ROWS = (
    ("keypoint regression error (lower is better)", "keypoint_regression_error"),
    ("foreground IoU (masks)", "mask_fg_iou"),
    ("background IoU (masks)", "mask_bg_iou"),
    ("foreground IoU (object masks)", "fg_iou"),
    ("background IoU (object masks)", "bg_iou"),
    ("parts per image (a count)", "parts_per_image"),
)


def score_table(scores: dict[str, float], prefix: str = "test/") -> str:
    """The test scores as the papers show them: NMI and ARI (percent) with and without background
    for keypoints and masks, then the single scores; any other logged score is listed last."""
    get = {k[len(prefix):]: v for k, v in scores.items() if k.startswith(prefix)}
    rows: list[tuple[str, list[str]]] = []
    for name, nmi, ari in _PAIR_ROWS:
        if nmi in get or ari in get:
            rows.append((name, [nmi, ari]))
    rows += [(name, [key]) for name, key in _SINGLE_ROWS if key in get]
    shown = {key for _, keys in rows for key in keys}
    rows += [(key, [key]) for key in sorted(get) if key not in shown]
    title = "test scores (percent)"
    width = max(len(name) for name, _ in [(title, []), *rows])
    value = lambda key: f"{get[key]:8.2f}" if key in get else f"{'-':>8}"  # noqa: E731
    lines = [f"{title:<{width}}  {'NMI':>8}  {'ARI':>8}"]
    lines += [f"{name:<{width}}  {'  '.join(value(k) for k in keys)}" for name, keys in rows]
    return "\n".join(lines)


def _nothing_to_score(datamodule: Any) -> str:
    """Why a test cannot score ``datamodule``, naming it and what to do instead."""
    name = type(datamodule).__name__
    root = getattr(datamodule, "root", None)
    data = f"data {name}" + (f" (root={root})" if root else "")
    return (
        f"{data} has no keypoints or masks to score; test needs annotated data (CUB, CelebA, PartImageNet, "
        "Flowers-102 with segmentations, synthetic parts); to see the parts of these images run mpae predict "
        "with the same arguments"
    )


def no_default_hp_metric(config: Any) -> None:
    """TensorBoard loggers of test/validate/predict log no placeholder ``hp_metric`` (-1).

    With ``default_hp_metric`` a TensorBoardLogger writes ``hp_metric = -1`` and an HPARAMS entry
    whenever a Trainer starts; in the training run's folder that would hide the run's real one.
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    for logger in as_list(config["trainer"].get("logger")):
        init = logger.get("init_args") if hasattr(logger, "get") else None
        cls = find_class(logger.get("class_path")) if init is not None else None
        if isinstance(cls, type) and issubclass(cls, TensorBoardLogger) and "default_hp_metric" in init:
            init["default_hp_metric"] = False


def _init_names(cls: type) -> set[str] | None:
    """The keyword names ``cls(...)`` takes, or None when it takes any (``**kwargs``)."""
    params = inspect.signature(cls).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


#: Commands beside LightningCLI's fit/validate/test/predict: name -> "module:function(argv) -> exit code"
#: (or a tuple ("module:function", "one-line help")). ``mpae --help`` shows the help, else the first
#: sentence of the module's docstring, read without importing the module.
EXTRA_COMMANDS = {
    "check-data": "mpae_lightning.check_data:check_data_main",
    "parts": "mpae_lightning.parts:parts_main",
    "export": "mpae_lightning.export:export_main",
    "convert": "mpae_lightning.convert:convert_main",
}


def _command_target(entry: str | tuple[str, str]) -> str:
    """``module:function`` of an :data:`EXTRA_COMMANDS` entry."""
    return entry if isinstance(entry, str) else entry[0]


def _command_help(entry: str | tuple[str, str]) -> str:
    """One line about an extra command: its own help, else its module docstring's first sentence.

    The docstring is read from the source file with ``ast`` (no import: a command's imports can
    cost seconds, and ``mpae --help`` lists them all).
    """
    if not isinstance(entry, str):
        return entry[1]
    module = entry.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module)
        source = Path(spec.origin).read_text(encoding="utf-8") if spec is not None and spec.origin else ""
        doc = ast.get_docstring(ast.parse(source)) or ""
    except (ImportError, OSError, SyntaxError, ValueError):
        return ""
    first = " ".join(doc.split("\n\n", 1)[0].split())
    if first.startswith("``") and "``: " in first:  # "``mpae check-data``: read ..." -> "read ..."
        first = first.split("``: ", 1)[1]
    return first.split(". ", 1)[0].rstrip(".")


def model_settings_help(width: int = 88) -> str:
    """The end of each command's ``--help``: every :class:`MPAEModule` setting with its default.

    (In subclass mode LightningCLI's help shows ``--model`` only; ``--model.help MPAEModule``
    describes each setting.)
    """
    params = [p for name, p in inspect.signature(MPAEModule.__init__).parameters.items() if name != "self"]
    entries = [f"{p.name}={p.default!r}" if p.default is not p.empty else p.name for p in params]
    lines, line = [], " "
    for entry in entries:
        if len(line) + len(entry) + 2 > width:
            lines.append(line.rstrip(","))
            line = " "
        line += f" {entry},"
    lines.append(line.rstrip(","))
    return ("MPAE's settings and defaults (--model.init_args.NAME VALUE, or the model section of a config;\n"
            "`--model.help MPAEModule` describes each, `--data.help CUBDataModule` a DataModule's):\n"
            + "\n".join(lines))


def command_list() -> str:
    """Every ``mpae`` command with one line about it, for ``mpae --help``."""
    commands = {**COMMANDS, **{name: _command_help(entry) for name, entry in EXTRA_COMMANDS.items()}}
    width = max(len(name) for name in commands)
    return "\n".join(f"  {name:<{width}}  {text}".rstrip() for name, text in commands.items())


def main(args: list[str] | None = None) -> None:
    """Console entry point: user errors as one line (exit 2), pre-emption as exit 128 + signal.

    ``MPAE_DEBUG=1`` or ``--debug`` shows the traceback instead.
    """
    argv, debug = split_debug([str(a) for a in (sys.argv[1:] if args is None else args)])

    def body() -> None:
        if argv[:1] and argv[0] in EXTRA_COMMANDS:
            module, _, function = _command_target(EXTRA_COMMANDS[argv[0]]).partition(":")
            raise SystemExit(getattr(importlib.import_module(module), function)(argv[1:]))
        if args is None:  # from the console: LightningCLI reads sys.argv (without --debug)
            sys.argv[1:] = argv
        MPAECLI(args=None if args is None else argv)

    run_cleanly(body, argv, debug)


if __name__ == "__main__":
    main()
