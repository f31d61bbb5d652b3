"""Where pretrained weights come from, and the one error users see when they cannot be had."""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch


class WeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded or read.

    The message always names the setting that takes a local file instead, so an
    offline user knows exactly what to change.
    """


#: Values of a ``*_weights`` argument meaning "randomly initialised" (tests, demos).
RANDOM_WEIGHTS = ("random", "none", "")


def is_random(weights: str | None) -> bool:
    return weights is None or str(weights).lower() in RANDOM_WEIGHTS


def is_local_file(weights: str | None) -> bool:
    """True if ``weights`` names a file path rather than a download source."""
    if is_random(weights):
        return False
    text = str(weights)
    return os.sep in text or text.endswith((".pth", ".pt", ".bin", ".safetensors", ".ckpt")) or Path(text).exists()


def unreadable_reason(err: BaseException) -> str:
    """Why a weight file could not be read, in one line (the exception's first line, or a refusal).

    ``torch.load(weights_only=True)`` raises :class:`pickle.UnpicklingError` for a file holding
    Python objects other than tensors and plain containers: unpickling those could run code, so
    such a file is refused, never loaded another way.
    """
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, pickle.UnpicklingError):
            return (
                "refused: it holds Python objects besides tensors, and unpickling them could run code; "
                "save a plain state dict (torch.save(model.state_dict(), path)) or a .safetensors file"
            )
        current = current.__cause__ or current.__context__
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "")
    return f"{type(err).__name__}: {first[:200]}" if first else type(err).__name__


def load_tensor_file(path: str | os.PathLike) -> object:
    """``torch.load`` a file with ``weights_only=True``, memory-mapped when its format allows.

    Memory mapping (no full copy in RAM) works for the zip format ``torch.save`` writes since
    PyTorch 1.6; older files (some released checkpoints) are read whole. Never runs code.
    """
    return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))


def load_state_dict_file(path: str | os.PathLike, setting: str) -> dict[str, torch.Tensor]:
    """Read a ``.pth``/``.pt``/``.safetensors`` state dict, unwrapping ``state_dict``/``model`` keys."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsUnavailableError(f"{setting}: weight file {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        raise WeightsUnavailableError(f"{setting}: could not read weight file {path} ({unreadable_reason(err)})") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise WeightsUnavailableError(f"{setting}: {path} does not hold a state dict (found {type(state).__name__}).")
    return state
