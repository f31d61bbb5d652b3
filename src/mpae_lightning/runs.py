"""One run, one folder: where a run's checkpoints, config, logs, test scores and predictions live.

A run is a logger version folder, ``<save_dir>/<name>/version_<N>/`` (TensorBoard and CSV
loggers), holding ``checkpoints/``, ``config.yaml``, the event logs, ``test_scores.yaml``,
``test_config.yaml`` and ``predictions/``. The ``mpae`` command uses these helpers to resolve
``--ckpt_path last``, to send test/predict/resumed fit of a run's checkpoint back into that run's
folder, to read a checkpoint once with a clear error, to refuse explicit arguments that disagree
with it, and to check output folders before anything is built.
"""
from __future__ import annotations

import errno
import glob
import importlib
import inspect
import os
import re
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .errors import CheckpointError, CheckpointWriteError, ConfigError, one_line
from .models.weights import load_tensor_file, unreadable_reason

__all__ = [
    "AtomicCheckpointIO",
    "RunFolder",
    "check_writable",
    "as_list",
    "check_checkpoint_shapes",
    "config_files",
    "find_class",
    "import_class",
    "linked_data_settings",
    "preflight",
    "resolve_checkpoint",
    "use_run_folder",
    "write_test_scores",
    "given_in",
    "given_settings",
    "read_config_file",
    "section_settings",
    "find_last_checkpoint",
    "hparam_conflicts",
    "read_checkpoint",
    "run_folder_of",
]

_VERSION = re.compile(r"^version_(\d+)$")
#: Model arguments that only say where initial weights come from; a checkpoint supplies them all.
WEIGHT_SOURCES = frozenset({"backbone_weights", "vgg_weights", "weights"})


class RunFolder:
    """A logger version folder ``<save_dir>/<name>/version_<N>``.

    Args:
        path: The version folder.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        match = _VERSION.match(self.path.name)
        if match is None:
            raise ValueError(f"{self.path} is not a logger version folder (version_<N>)")
        self.version = int(match.group(1))
        self.name = self.path.parent.name
        self.save_dir = str(self.path.parent.parent)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"


def run_folder_of(checkpoint: str | os.PathLike[str]) -> RunFolder | None:
    """The run a checkpoint belongs to (``<run>/checkpoints/<file>.ckpt``), or None if it is not in one."""
    parent = Path(checkpoint).resolve().parent
    if parent.name != "checkpoints" or not _VERSION.match(parent.parent.name):
        return None
    return RunFolder(parent.parent)


def _newest_checkpoint(folder: Path) -> Path | None:
    """``last.ckpt`` if present (the newest state of the run), else the newest ``*.ckpt``."""
    if not folder.is_dir():
        return None
    last = folder / "last.ckpt"
    if last.is_file():
        return last
    files = [p for p in folder.glob("*.ckpt") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_mtime) if files else None


def find_last_checkpoint(log_roots: list[Path], extra_dirs: list[Path]) -> Path | None:
    """The last checkpoint of the newest run under ``log_roots`` (``<save_dir>/<name>`` folders).

    Runs are ordered by version number; the newest run that has a checkpoint wins. ``extra_dirs``
    (an explicit ``ModelCheckpoint.dirpath``, ``default_root_dir/checkpoints``) are searched too.
    """
    candidates: list[Path] = []
    for root in log_roots:
        if not root.is_dir():
            continue
        runs = sorted(
            (p for p in root.iterdir() if p.is_dir() and _VERSION.match(p.name)),
            key=lambda p: int(_VERSION.match(p.name).group(1)),  # type: ignore[union-attr]
        )
        for run in reversed(runs):
            found = _newest_checkpoint(run / "checkpoints")
            if found is not None:
                candidates.append(found)
                break
    for folder in extra_dirs:
        found = _newest_checkpoint(folder)
        if found is not None:
            candidates.append(found)
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def read_checkpoint(path: str) -> dict[str, Any]:
    """Load a Lightning checkpoint memory-mapped (cheap even for large files), with a one-line error.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: it is a folder, empty, truncated, not a checkpoint, or has no ``state_dict``.
    """
    where = f"ckpt_path={path}"
    if not os.path.exists(path):
        raise FileNotFoundError(f"{where} does not exist; pass a .ckpt written by `mpae fit` or --ckpt_path last")
    if os.path.isdir(path):
        raise CheckpointError(f"{where} is a folder; pass the .ckpt file inside it (e.g. {path}/last.ckpt)")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{where} is an empty file; the save or copy was interrupted, use another checkpoint")
    try:
        ckpt = load_tensor_file(path)
    except Exception as err:  # noqa: BLE001 - any failure to read means a bad file
        raise CheckpointError(
            f"cannot read {where} ({unreadable_reason(err)}); expected a .ckpt written by "
            "`mpae fit`; the file may be truncated or of another format"
        ) from err
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(
            f"{where} is not a Lightning checkpoint (no 'state_dict'; found {keys}); for the authors' "
            ".pth files use --model.init_args.weights instead"
        )
    return dict(ckpt)


def config_files(args: list[str]) -> list[str]:
    """The ``--config``/``-c`` files of a command line, in the order they are applied."""
    files = []
    for i, token in enumerate(args):
        if token in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif token.startswith("--config="):
            files.append(token.split("=", 1)[1])
    return files


def read_config_file(path: str) -> dict[str, Any]:
    """A YAML config as a dict; a syntax error names the file, line and column.

    Raises:
        ConfigError: the YAML does not parse, or is not a mapping.
    """
    try:
        text = Path(path).read_text()
    except OSError:
        return {}  # a missing or unreadable file is reported by the parser, with its path
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        context = getattr(err, "context", None)
        raise ConfigError(
            f"{where}: YAML syntax error: {problem}" + (f" ({context})" if context else "")
            + "; fix the file (lists are `[a, b]` or `- item` lines, nested keys are indented)"
        ) from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a YAML mapping of sections (trainer, model, data), got {type(data).__name__}")
    return dict(data)


def section_settings(section: Any) -> dict[str, Any]:
    """The settings of a class section of a config (``init_args``, or the section itself without ``class_path``)."""
    if not isinstance(section, Mapping):
        return {}
    if isinstance(section.get("init_args"), Mapping):
        return dict(section["init_args"])
    return {k: v for k, v in section.items() if k not in ("class_path", "init_args", "dict_kwargs")}


def given_in(where: str, section: str) -> bool:
    """Whether a :func:`given_settings` source names the ``section`` (``model`` or ``data``)."""
    return f"({section}." in where or f"(--{section}." in where


def given_settings(args: list[str], subcommand: str | None, linked: tuple[str, ...]) -> dict[str, str]:
    """Model settings the user gave, ``{name: where}``: in a config file or on the command line.

    The data settings linked into the model (``linked``) count too. The last source wins, as in
    the parser: the command line over config files, a later file over an earlier one.
    """
    found: dict[str, str] = {}
    for path in config_files(args):
        data = read_config_file(path)
        if subcommand and isinstance(data.get(subcommand), Mapping):
            data = dict(data[subcommand])
        for name in section_settings(data.get("model")):
            found[name] = f"{path} (model.init_args.{name})"
        for name in section_settings(data.get("data")):
            if name in linked:
                found[name] = f"{path} (data.init_args.{name})"
    for token in args:
        if not token.startswith("--"):
            continue
        key = token[2:].split("=", 1)[0]
        for section in ("model", "data"):
            for prefix in (f"{section}.init_args.", f"{section}."):
                if key.startswith(prefix):
                    name = key[len(prefix):].split(".", 1)[0]
                    if name not in ("class_path", "init_args", "dict_kwargs", "help") and (
                        section == "model" or name in linked
                    ):
                        found[name] = f"the command line ({token.split('=', 1)[0]})"
                    break
    return found


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return set(a) == set(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return float(a) == float(b)
    return a == b


def hparam_conflicts(explicit: Mapping[str, Any], hparams: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(name, explicit value, checkpoint value)`` for every explicit setting the checkpoint contradicts."""
    conflicts = []
    for name, value in explicit.items():
        if name in WEIGHT_SOURCES or name not in hparams:
            continue
        if hasattr(value, "as_dict"):
            value = value.as_dict()
        if not _same(value, hparams[name]):
            conflicts.append((name, value, hparams[name]))
    return conflicts


def import_class(class_path: str) -> type:
    """The class a config's ``class_path`` names."""
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def find_class(class_path: str | None) -> type | None:
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


def linked_data_settings(data_section: Any, linked: tuple[str, ...], model_settings: Mapping[str, Any] | None = None
                         ) -> dict[str, Any]:
    """The ``linked`` settings a config's data section decides, as the CLI would link them.

    A value the section gives; else, for a setting ``model_settings`` leaves out, its data
    class's default where that class takes the setting (``CelebADataModule``'s
    ``input_antialias`` is False, unlike the model's default).
    """
    given = section_settings(data_section)
    cls = find_class(data_section.get("class_path")) if isinstance(data_section, Mapping) else None
    params = inspect.signature(cls).parameters if cls is not None else {}
    settings = {}
    for name in linked:
        if given.get(name) is not None:
            settings[name] = given[name]
        elif name in params and params[name].default is not inspect.Parameter.empty and name not in (model_settings or {}):
            settings[name] = params[name].default
    return settings


def as_list(value: Any) -> list[Any]:
    """A config value that may be one item, a list or None, as a list."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# ------------------------------------------------------------------ the mpae command's runs
def _log_roots(config: Any) -> tuple[list[Path], list[Path]]:
    """Where runs live (``<save_dir>/<name>`` of the logger) and other checkpoint folders."""
    trainer = config["trainer"]
    root = Path(trainer.get("default_root_dir") or os.getcwd())
    roots, extra = [], [root / "checkpoints"]
    for logger in as_list(trainer.get("logger")):
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if init is not None and init.get("save_dir") is not None:
            roots.append(Path(init["save_dir"]) / str(init.get("name") or ""))
    if not roots:
        roots.append(root / "lightning_logs")
    for callback in as_list(trainer.get("callbacks")):
        init = callback.get("init_args") if hasattr(callback, "get") else None
        if init is not None and init.get("dirpath"):
            extra.append(Path(init["dirpath"]))
    return roots, extra


def resolve_checkpoint(
    config: Any, given: Mapping[str, str], linked: tuple[str, ...] = (), fixed: tuple[str, ...] = ()
) -> dict[str, Any] | None:
    """Turn ``ckpt_path`` into a readable file and return the checkpoint (memory-mapped).

    ``last`` means the last checkpoint of the newest run of this config; when there is none the
    command fails (it never trains from scratch silently). A setting the checkpoint fixes
    (``fixed``) that the user gave differently (``given``: ``{name: where}``, from a config file
    or the command line) is refused, naming both values and where each comes from; settings the
    user did not give come from the checkpoint, the ``linked`` data settings included.
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
    values = {}
    for name in given:
        if name not in fixed:
            continue
        section = "data" if name in linked and given_in(given[name], "data") else "model"
        init_args = (config.get(section) or {}).get("init_args") or {}
        values[name] = init_args.get(name)
    conflicts = hparam_conflicts(values, hparams)
    if conflicts:
        name, value, saved = conflicts[0]
        others = f" (and {', '.join(c[0] for c in conflicts[1:])})" if len(conflicts) > 1 else ""
        raise CheckpointError(
            f"{given[name]} sets {name}={value}, but the checkpoint {ckpt_path} was trained with {name}={saved}"
            f"{others}; drop the setting to use the checkpoint's value, or train a new model without --ckpt_path"
        )
    data = config.get("data")
    data_args = data.get("init_args") if hasattr(data, "get") else None
    if data_args is not None:
        for name in linked:  # e.g. the image size: predicting on a new folder needs no repetition
            if name not in given and name in hparams and name in data_args:
                data_args[name] = hparams[name]
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
    writes to ``<run>/predictions`` unless ``--prediction_writer.output_dir`` is given. Without a
    configured logger (``mpae predict --ckpt_path X`` with no config) the run's folder is logged
    into with Lightning's default logger, not a new ``./lightning_logs/version_<N>``.
    """
    if subcommand != "fit":
        save_config_kwargs["config_filename"] = f"{subcommand}_config.yaml"
    ckpt_path = config.get("ckpt_path")
    run = run_folder_of(ckpt_path) if ckpt_path and os.path.isfile(str(ckpt_path)) else None
    if run is None:
        return
    if config["trainer"].get("logger") in (None, True):
        # Lightning's default logger would open <default_root_dir>/lightning_logs/version_<next>
        # (the current folder without a config): the run's own folder instead.
        config["trainer"]["logger"] = default_logger(run, hp_metric=subcommand == "fit")
    for logger in as_list(config["trainer"].get("logger")):
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if init is not None and "save_dir" in init and "version" in init:
            init["save_dir"], init["name"], init["version"] = run.save_dir, run.name, run.version
    if subcommand == "predict" and not any(a.startswith("--prediction_writer.output_dir") for a in raw_args):
        writer = config.get("prediction_writer")
        if writer is not None:
            writer["output_dir"] = str(run.path / "predictions")


def default_logger(run: RunFolder, hp_metric: bool = True) -> Any:
    """The logger Lightning creates by default (TensorBoard when installed, else CSV), as a config
    entry that logs into ``run``."""
    from importlib.util import find_spec

    from jsonargparse import Namespace

    init = Namespace(save_dir=run.save_dir, name=run.name, version=run.version)
    if find_spec("tensorboard") or find_spec("tensorboardX"):
        init["default_hp_metric"] = hp_metric
        return Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger", init_args=init)
    return Namespace(class_path="lightning.pytorch.loggers.CSVLogger", init_args=init)


def rank_zero_log_dir(trainer: Any) -> str | None:
    """``trainer.log_dir`` as rank 0 sees it, without its broadcast.

    ``Trainer.log_dir`` broadcasts rank 0's folder to every process, so code that only rank 0 runs
    (pictures, the scores file) must not read it under DDP: rank 0 would wait for the others
    forever. Same folder: the first logger's ``log_dir`` (``save_dir`` for loggers without one),
    else ``default_root_dir``.
    """
    if trainer.loggers:
        logger = trainer.loggers[0]
        return getattr(logger, "log_dir", None) or logger.save_dir
    return trainer.default_root_dir


def write_test_scores(trainer: Any) -> Path | None:
    """Write the logged ``test/*`` scores to ``<log_dir>/test_scores.yaml`` (rank 0); return its path.

    ``{ckpt_path, scores: {"test/keypoint_nmi": ..., ...}}``, the numbers ``mpae test`` prints.
    Nothing is written (None) without scores, without a log folder, or on other ranks.
    """
    log_dir = rank_zero_log_dir(trainer) if trainer.global_rank == 0 else None
    if not log_dir:
        return None
    scores = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
    if not scores:
        return None
    path = Path(log_dir) / "test_scores.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"ckpt_path": trainer.ckpt_path, "scores": scores}, sort_keys=True))
    return path


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
                    model = import_class(spec["class_path"])(**init_args)
                    if hasattr(model, "configure_optimizers"):
                        model.configure_optimizers()  # optimizer settings (lr, betas, ...) checked too
            else:
                import_class(spec["class_path"])(**init_args)
        except (ValueError, TypeError, RuntimeError, KeyError, ArithmeticError) as err:
            # Built from the settings alone, so any refusal is about a setting.
            raise ConfigError(f"{section}.init_args ({spec['class_path'].rsplit('.', 1)[-1]}): {one_line(err)}") from err
    trainer = config["trainer"]
    check_writable("trainer.default_root_dir", trainer.get("default_root_dir"))
    for i, logger in enumerate(as_list(trainer.get("logger"))):
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if init is not None:
            check_writable("trainer.logger.init_args.save_dir", init.get("save_dir"))
    for callback in as_list(trainer.get("callbacks")):
        init = callback.get("init_args") if hasattr(callback, "get") else None
        if init is not None and init.get("dirpath"):
            check_writable(f"{callback['class_path'].rsplit('.', 1)[-1]}.dirpath", init["dirpath"])
    if subcommand == "predict" and config.get("prediction_writer") is not None:
        check_writable("prediction_writer.output_dir", config["prediction_writer"].get("output_dir"))


def check_writable(key: str, path: str | os.PathLike[str] | None) -> None:
    """Refuse an output folder that cannot be created or written (before the first batch, not after).

    Raises:
        ConfigError: a file sits where a folder of ``path`` should be, or the nearest existing
            folder is not writable; the message names ``key`` and the path.
    """
    if path is None or str(path) == "" or "://" in str(path):
        return
    target = Path(os.path.expanduser(str(path))).absolute()
    probe = target
    while not probe.exists():
        if probe.parent == probe:
            return
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(
            f"{key}={path}: {probe} is a file, so the folder cannot be created there; choose another folder"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path}: cannot write in {probe} (permission denied); choose a writable folder")


# ------------------------------------------------------------------------------- atomic writes
#: Why a write failed, in words, and what to do about it (by ``errno``).
_WRITE_CAUSES: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device (disk full)", "free space there or choose another folder"),
    getattr(errno, "EDQUOT", -2): ("disk quota exceeded", "free space within your quota or choose another folder"),
    errno.EACCES: ("permission denied", "make the folder writable or choose another folder"),
    errno.EPERM: ("permission denied", "make the folder writable or choose another folder"),
    errno.EROFS: ("read-only file system", "choose a writable folder"),
    errno.ENOENT: ("the folder does not exist (removed during the run?)", "recreate it or choose another folder"),
    errno.ENOTDIR: ("a file sits where a folder of the path should be", "choose another folder"),
    errno.EEXIST: ("a file sits where a folder of the path should be", "choose another folder"),
    errno.EFBIG: ("file too large for this file system", "choose a folder on another file system"),
    errno.EIO: ("input/output error (failing disk or network share)", "check the disk or choose another folder"),
}
_FIX_OPTIONS = "(--trainer.default_root_dir, --trainer.logger.init_args.save_dir or ModelCheckpoint's dirpath)"
_UMASK: list[int] = []


def _new_file_mode() -> int:
    """The mode an ordinary new file gets (0o666 less the umask), read once; mkstemp's files are 0o600."""
    if not _UMASK:
        current = os.umask(0o022)
        os.umask(current)
        _UMASK.append(current)
    return 0o666 & ~_UMASK[0]


def _fsync_folder(folder: str) -> None:
    """Make a rename durable: fsync the folder where the platform allows it (not on Windows)."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems (network shares) refuse to fsync a folder; the rename stands
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write every checkpoint whole or not at all, beside its target, so no fault leaves a corrupt one.

    Each checkpoint (ModelCheckpoint's, ``last.ckpt``, the pre-emption checkpoint) is written to a
    hidden temporary file in the target's own folder, flushed and fsynced, then renamed over the
    target (``os.replace``, atomic on one file system) and the folder fsynced. A crash, kill or
    full disk during the save leaves the previous checkpoint as it was. Unlike Lightning's default
    (a full in-memory copy, then a temporary file in ``$TMPDIR`` that is *copied* over the target
    when ``$TMPDIR`` is another file system) it needs neither extra memory nor space elsewhere.

    Remote paths (``s3://``, ...) go through Lightning's :class:`TorchCheckpointIO` unchanged.

    Raises:
        CheckpointWriteError: the write failed (disk full, permission denied, ...); the message
            names the file, the cause and the fix. The temporary file is removed.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | os.PathLike[str], storage_options: Any | None = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically (temporary file beside it, fsync, rename)."""
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        target = os.path.abspath(os.fspath(path))
        folder, name = os.path.split(target)
        tmp: str | None = None
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
            os.close(fd)
            with open(tmp, "wb") as f:  # by name, so errors and ``f.name`` show the path
                if hasattr(os, "fchmod"):
                    try:
                        os.fchmod(f.fileno(), _new_file_mode())
                    except OSError:  # some network file systems refuse; the private mode is harmless
                        pass
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
            tmp = None
            # Partial files of earlier saves of this target that a SIGKILL or power loss left behind:
            # the target just written supersedes them (one process writes a given checkpoint).
            for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.*.tmp")):
                try:
                    os.remove(stale)
                except OSError:
                    pass
        except BaseException as err:  # noqa: BLE001 - any failure (or a signal) removes the partial file
            if tmp is not None:
                try:
                    os.remove(tmp)
                except OSError:
                    pass
            if isinstance(err, OSError) and not isinstance(err, CheckpointWriteError):
                raise CheckpointWriteError(_write_error_message(target, folder, err)) from err
            raise
        _fsync_folder(folder)

    def load_checkpoint(
        self, path: str | os.PathLike[str], map_location: Any = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        """Read a checkpoint to resume from, always with ``weights_only=True``: a checkpoint never runs code."""
        if weights_only is False:
            raise CheckpointError(f"ckpt_path={path}: checkpoints are read with weights_only=True only (no code)")
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


def _write_error_message(target: str, folder: str, err: OSError) -> str:
    """``cannot write checkpoint <file> in <folder>: <cause>; <fix>`` for a failed save."""
    cause, fix = _WRITE_CAUSES.get(err.errno or -1, (None, "check the folder or choose another one"))
    if cause is None:
        cause = (err.strerror or str(err) or type(err).__name__).strip().lower()
    kept = (
        f"the previous {os.path.basename(target)} is unchanged"
        if os.path.isfile(target)
        else "no checkpoint was written"
    )
    return f"cannot write checkpoint {target} in {folder}: {cause}; {kept}; {fix} {_FIX_OPTIONS}"
