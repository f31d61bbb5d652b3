"""models/weights.py: where pretrained weights come from, and the one error that names the setting to change."""
from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from mpae_lightning.models.weights import (
    WeightsUnavailableError,
    is_local_file,
    is_random,
    load_state_dict_file,
    unreadable_reason,
)


@pytest.mark.parametrize("value", [None, "random", "RANDOM", "none", ""])
def test_random_spellings(value):
    assert is_random(value) and not is_local_file(value)


def test_download_sources_and_local_files_are_told_apart(tmp_path):
    for source in ("timm", "torchvision"):
        assert not is_random(source) and not is_local_file(source)
    for name in ("CUB_K16.pth", "w.pt", "w.bin", "w.safetensors", "last.ckpt", "dir/weights"):
        assert is_local_file(name), name  # by suffix or path separator, whether it exists or not
    existing = tmp_path / "weights"
    existing.write_bytes(b"")
    assert is_local_file(str(existing))


def test_load_unwraps_state_dict_and_model_keys(tmp_path):
    state = {"a.weight": torch.arange(3.0), "b.bias": torch.ones(2)}
    for wrapper in (lambda s: s, lambda s: {"state_dict": s, "epoch": 3}, lambda s: {"model": s}):
        path = tmp_path / "w.pth"
        torch.save(wrapper(state), path)
        loaded = load_state_dict_file(path, "weights")
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_load_reads_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"x": torch.arange(4.0)}, str(path))
    assert torch.equal(load_state_dict_file(str(path), "weights")["x"], torch.arange(4.0))


def test_missing_file_names_the_setting_and_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "vgg19.pth"
    with pytest.raises(WeightsUnavailableError, match=rf"vgg_weights: weight file {missing} does not exist"):
        load_state_dict_file(missing, "vgg_weights")


class _Payload:
    """A Python object whose unpickling runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_file_with_python_objects_is_refused_not_executed(tmp_path):
    path = tmp_path / "evil.pth"
    marker = tmp_path / "code_ran"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Payload(marker)}, path)
    with pytest.raises(WeightsUnavailableError) as info:
        load_state_dict_file(path, "weights")
    message = str(info.value)
    assert message.startswith(f"weights: could not read weight file {path}")
    assert "refused" in message and "could run code" in message and "state_dict()" in message
    assert "\n" not in message  # one line
    assert not marker.exists()  # the payload never ran


def test_unreadable_and_non_dict_files_are_named(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match=r"weights: could not read weight file .*garbage\.pth \("):
        load_state_dict_file(garbage, "weights")
    tensor = tmp_path / "tensor.pth"
    torch.save(torch.zeros(3), tensor)
    with pytest.raises(WeightsUnavailableError, match=r"tensor\.pth does not hold a state dict \(found Tensor\)"):
        load_state_dict_file(tensor, "weights")


def test_unreadable_reason_is_one_line_and_finds_a_refusal_in_the_chain():
    assert unreadable_reason(ValueError("first line\nsecond line")) == "ValueError: first line"
    assert unreadable_reason(KeyError()) == "KeyError"
    try:
        try:
            raise pickle.UnpicklingError("Weights only load failed")
        except pickle.UnpicklingError as inner:
            raise RuntimeError("wrapped") from inner
    except RuntimeError as outer:
        assert unreadable_reason(outer).startswith("refused:")
