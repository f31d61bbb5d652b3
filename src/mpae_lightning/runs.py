"""One run, one folder: where a run's checkpoints, config, logs, test scores and predictions live.

A run is a logger version folder, ``<save_dir>/<name>/version_<N>/`` (TensorBoard and CSV
loggers), holding ``checkpoints/``, ``config.yaml``, the event logs, ``test_scores.yaml``,
``test_config.yaml`` and ``predictions/``. The ``mpae`` command uses these helpers to resolve
``--ckpt_path last``, to send test/predict/resumed fit of a run's checkpoint back into that run's
folder, to read a checkpoint once with a clear error, to refuse explicit arguments that disagree
with it, and to check output folders before anything is built.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, ConfigError

__all__ = [
    "RunFolder",
    "check_writable",
    "explicit_model_keys",
    "find_last_checkpoint",
    "hparam_conflicts",
    "read_checkpoint",
    "run_folder_of",
]

_VERSION = re.compile(r"^version_(\d+)$")
#: Model arguments that only say where initial weights come from; a checkpoint supplies them all.
WEIGHT_SOURCES = frozenset({"backbone_weights", "vgg_weights", "weights"})
#: Data arguments linked into the model by the ``mpae`` command.
LINKED_FROM_DATA = ("image_size", "mini_group")


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
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure to read means a bad file
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(
            f"cannot read {where} ({type(err).__name__}: {first[:200]}); expected a .ckpt written by "
            "`mpae fit`; the file may be truncated or of another format"
        ) from err
    if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, Mapping) else type(ckpt).__name__
        raise CheckpointError(
            f"{where} is not a Lightning checkpoint (no 'state_dict'; found {keys}); for the authors' "
            ".pth files use --model.init_args.weights instead"
        )
    return dict(ckpt)


def explicit_model_keys(args: list[str]) -> dict[str, str]:
    """Model settings given on the command line: ``{hparam name: the argument as typed}``.

    ``--model.init_args.num_parts=8``, ``--model.num_parts 8`` and the linked data arguments
    (``--data.init_args.image_size``) all count.
    """
    found: dict[str, str] = {}
    for token in args:
        if not token.startswith("--"):
            continue
        key = token[2:].split("=", 1)[0]
        for prefix in ("model.init_args.", "model."):
            if key.startswith(prefix):
                name = key[len(prefix):].split(".", 1)[0]
                if name not in ("class_path", "init_args", "dict_kwargs", "help"):
                    found[name] = token.split("=", 1)[0]
                break
        else:
            for prefix in ("data.init_args.", "data."):
                if key.startswith(prefix) and key[len(prefix):] in LINKED_FROM_DATA:
                    found[key[len(prefix):]] = token.split("=", 1)[0]
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
