"""errors.py: the one-line messages, including the two places that read another library's text.

Each dependency on another library's message is pinned in setup.cfg and has one test here, so
an upgrade that changes the text fails a test instead of a user:

* jsonargparse (``>=4.39,<5``): :func:`parse_error_line` turns its nested parse error into a line;
* torch's DataLoader worker wrapper ("Original Traceback"; torch ``>=2.1,<3``): :func:`one_line` keeps the worker's message.
"""
from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentError, ArgumentParser
from torch.utils.data import DataLoader, Dataset

from mpae_lightning import MPAEModule
from mpae_lightning.errors import ConfigError, find_user_error, one_line, parse_error_line, unknown_setting


def test_jsonargparse_nested_error_becomes_one_line_naming_key_and_value():
    """Pinned dependency: jsonargparse's error text for a class argument of the wrong type."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(MPAEModule, "model")
    argv = ["--model=mpae_lightning.MPAEModule", "--model.init_args.num_parts=abc"]
    with pytest.raises(ArgumentError) as caught:
        parser.parse_args(argv)
    line = parse_error_line(str(caught.value), ["fit", *argv])
    assert "\n" not in line
    assert line.startswith("model.init_args.num_parts:"), line
    assert "abc" in line and "mpae fit --help" in line, line


class _Broken(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        raise ConfigError(f"image {index} is broken; fix the file")


def test_error_from_a_dataloader_worker_keeps_only_the_workers_message():
    """Pinned dependency: torch re-raises a worker's error with its traceback inside the message."""
    loader = DataLoader(_Broken(), batch_size=1, num_workers=1)
    with pytest.raises(ConfigError) as caught:
        next(iter(loader))
    assert "Original Traceback" in str(caught.value)  # what torch does today; the test of the pin
    assert one_line(caught.value) == "image 0 is broken; fix the file"
    assert find_user_error(caught.value) is caught.value


def test_unknown_setting_suggests_the_closest_names():
    err = unknown_setting("model.init_args", "num_prts", {"num_parts", "feature_dim"}, "cfg.yaml")
    assert str(err) == "cfg.yaml: unknown setting model.init_args.num_prts; did you mean num_parts?"
    far = unknown_setting("trainer", "zzz", {"max_epochs"}, "the command line")
    assert "unknown setting trainer.zzz" in str(far) and "valid names: max_epochs" in str(far)


def test_find_user_error_skips_foreign_errors_and_finds_ours_in_the_chain():
    try:
        try:
            raise ConfigError("bad setting")
        except ConfigError as inner:
            raise RuntimeError("wrapped by a library") from inner
    except RuntimeError as outer:
        assert str(find_user_error(outer)) == "bad setting"
    assert find_user_error(RuntimeError("a bug, not a user error")) is None
    assert find_user_error(ValueError("raised outside the package")) is None
