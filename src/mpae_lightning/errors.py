"""The errors a user can cause, and how the ``mpae`` command turns them into one line.

A user error (a setting, a file, a folder) reaches the user as ``mpae: error: <what>, <where>,
<how to fix>`` with exit code 2 and no traceback; ``MPAE_DEBUG=1`` or ``--debug`` shows it.
"""
from __future__ import annotations

import os
import re
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

from jsonargparse import ArgumentError
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException

from .data.base import DatasetFormatError, ImageReadError
from .models.weights import WeightsUnavailableError

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "ConfigError",
    "Interrupted",
    "NonFiniteLossError",
    "find_user_error",
    "one_line",
    "parse_error_line",
    "run_cleanly",
    "split_debug",
    "unknown_setting",
]


class ConfigError(ValueError):
    """A setting (command-line argument or config-file value) is invalid; the message names it."""


class CheckpointError(ValueError):
    """A checkpoint cannot be read, is not ours, or disagrees with an explicit argument."""


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, permission denied, ...); the previous one is untouched.

    An ``OSError``, so code that handles a failed write keeps working; the message names the file,
    the cause in words and the fix.
    """


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
    CheckpointWriteError,
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


# ------------------------------------------------------------------ how an mpae command ends
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



def unknown_setting(section: str, name: str, known: list[str] | set[str], where: str) -> ConfigError:
    """The error for a setting ``section.name`` that the class does not take, with the closest valid names."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid names: {', '.join(sorted(known))}"
    return ConfigError(f"{where}: unknown setting {section}.{name}{hint}")


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
    from .guards import stop_signals  # the signal handlers need Lightning's trainer hooks

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
