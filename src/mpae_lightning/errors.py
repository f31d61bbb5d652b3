"""The errors a user can cause, and how the ``mpae`` command turns them into one line.

A user error (a setting, a file, a folder) reaches the user as ``mpae: error: <what>, <where>,
<how to fix>`` with exit code 2 and no traceback; ``MPAE_DEBUG=1`` or ``--debug`` shows it.
"""
from __future__ import annotations

import re
import signal
import traceback

from lightning.fabric.utilities.exceptions import MisconfigurationException

from .data.base import DatasetFormatError, ImageReadError
from .models.weights import WeightsUnavailableError

__all__ = [
    "CheckpointError",
    "ConfigError",
    "Interrupted",
    "NonFiniteLossError",
    "find_user_error",
    "one_line",
]


class ConfigError(ValueError):
    """A setting (command-line argument or config-file value) is invalid; the message names it."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read, is not ours, or disagrees with an explicit argument."""


class NonFiniteLossError(RuntimeError):
    """Training produced a non-finite loss or gradient (exit code 1: the run failed, not the command)."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT stopped the run (a ``BaseException``, like ``KeyboardInterrupt``).

    Args:
        signum: The signal.
        checkpoint: The resumable checkpoint written before stopping, or None.
        where: Where training stood (``"epoch 0, step 3"``), or None outside training.
    """

    def __init__(self, signum: int, checkpoint: str | None = None, where: str | None = None) -> None:
        super().__init__(signum, checkpoint, where)
        self.signum = int(signum)
        self.checkpoint = checkpoint
        self.where = where

    @property
    def exit_code(self) -> int:
        """128 + the signal number, as shells report a process killed by it (SIGTERM 143, SIGINT 130)."""
        return 128 + self.signum

    def message(self) -> str:
        name = signal.Signals(self.signum).name
        if self.checkpoint:
            return (
                f"mpae: stopped by {name} at {self.where}: saved {self.checkpoint}; resume with the same "
                f"command plus --ckpt_path last (or --ckpt_path {self.checkpoint})"
            )
        at = f" at {self.where}" if self.where else ""
        return f"mpae: stopped by {name}{at}; no checkpoint was written (nothing resumable had started)"


#: Exceptions whose message is written for the user, whatever code raised them.
_USER_ERROR_TYPES = (
    WeightsUnavailableError,
    DatasetFormatError,
    ImageReadError,
    ConfigError,
    CheckpointError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    MisconfigurationException,
)
_PACKAGE_DIR = "mpae_lightning"


def _raised_by_us(err: BaseException) -> bool:
    """True if ``err`` was raised in this package (our ValueErrors describe bad settings)."""
    text = str(err)
    if "Original Traceback" in text:  # re-raised from a DataLoader worker: look at the worker's frames
        files = re.findall(r'File "([^"]+)"', text)
        return bool(files) and _PACKAGE_DIR in files[-1]
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and _PACKAGE_DIR in frames[-1].filename


def find_user_error(err: BaseException) -> BaseException | None:
    """The first user error in ``err``'s cause chain (jsonargparse and Lightning wrap errors), or None."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _USER_ERROR_TYPES):
            return current
        if isinstance(current, (ValueError, TypeError)) and _raised_by_us(current):
            return current
        current = current.__cause__ or current.__context__
    return None


def one_line(err: BaseException) -> str:
    """The user-facing message of ``err``: a DataLoader worker's wrapper and traceback removed."""
    text = str(err) if not isinstance(err, KeyError) else str(err.args[0] if err.args else err)
    if "Original Traceback" in text:
        # torch re-raises a worker's error as "Caught X in DataLoader worker ...\nOriginal Traceback ...
        # \n<module>.X: <message>": keep the message only.
        match = None
        for match in re.finditer(rf"^(?:[\w.]+\.)?{re.escape(type(err).__name__)}: ", text, flags=re.M):
            pass
        if match is not None:
            text = text[match.end():]
    return text.strip()
