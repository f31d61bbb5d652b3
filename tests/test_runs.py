"""No corrupt checkpoint after any fault: atomic writes, one-line write errors, a save every epoch."""
from __future__ import annotations

import errno
import glob
import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

from conftest import DEMO_CONFIG, REPO, TINY_DEMO_ARGS
from mpae_lightning.cli import MPAECLI, main
from mpae_lightning.errors import CheckpointWriteError
from mpae_lightning.runs import AtomicCheckpointIO

#: Two batches per epoch and no sanity check: a 2-epoch fit is 4 steps.
SHORT = ["--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
         "--trainer.num_sanity_val_steps=0"]
#: Saves are what these tests are about: no validation, to keep them short.
NO_VAL = "--trainer.limit_val_batches=0"


def _args(root: Path, *extra: str) -> list[str]:
    return ["--config", str(DEMO_CONFIG), *TINY_DEMO_ARGS, *SHORT, f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}", *extra]


def _run(argv: list[str]) -> int:
    try:
        main(argv)
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def _ckpts(root: Path, name: str = "*.ckpt") -> list[str]:
    return sorted(glob.glob(str(root / "**" / name), recursive=True))


def _temps(root: Path) -> list[str]:
    return sorted(glob.glob(str(root / "**" / ".*.tmp"), recursive=True))


def _checkpoint(value: float) -> dict:
    return {"epoch": int(value), "state_dict": {"w": torch.full((64, 64), value)}, "name": "run"}


def _failing_save(error: BaseException, real=torch.save):
    """A ``torch.save`` that writes half the bytes into the file, then fails like a full disk would."""

    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise error

    return save


# ------------------------------------------------------------------------------------- the plugin
def test_checkpoint_round_trips_and_leaves_no_temporary_file(tmp_path):
    io_plugin = AtomicCheckpointIO()
    target = tmp_path / "new" / "folder" / "last.ckpt"  # the folder is created
    io_plugin.save_checkpoint(_checkpoint(1.0), target)
    io_plugin.save_checkpoint(_checkpoint(2.0), str(target))  # overwrites
    loaded = torch.load(target, map_location="cpu", weights_only=True)
    assert loaded["epoch"] == 2 and torch.equal(loaded["state_dict"]["w"], torch.full((64, 64), 2.0))
    assert io_plugin.load_checkpoint(target)["name"] == "run"
    assert os.listdir(target.parent) == ["last.ckpt"]
    if hasattr(os, "fchmod"):  # the mode of an ordinary new file, not mkstemp's private 0o600
        plain = tmp_path / "plain"
        plain.write_bytes(b"")
        assert target.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777


def test_remote_paths_still_go_through_fsspec():
    io_plugin = AtomicCheckpointIO()
    path = "memory://mpae-test-runs/checkpoints/last.ckpt"
    io_plugin.save_checkpoint(_checkpoint(3.0), path)
    assert io_plugin.load_checkpoint(path, weights_only=True)["epoch"] == 3
    io_plugin.remove_checkpoint(path)


@pytest.mark.parametrize(
    "error, words",
    [(OSError(errno.ENOSPC, "No space left on device"), "no space left on device (disk full)"),
     (PermissionError(errno.EACCES, "Permission denied"), "permission denied")],
    ids=["disk-full", "permission"],
)
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error, words):
    io_plugin = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io_plugin.save_checkpoint(_checkpoint(1.0), target)
    before = target.read_bytes()
    monkeypatch.setattr(torch, "save", _failing_save(error))
    with pytest.raises(CheckpointWriteError) as failure:
        io_plugin.save_checkpoint(_checkpoint(2.0), target)
    message = str(failure.value)
    assert str(target.parent) in message and words in message and "choose another folder" in message, message
    assert "previous last.ckpt is unchanged" in message
    assert failure.value.__cause__ is error
    assert target.read_bytes() == before
    assert os.listdir(target.parent) == ["last.ckpt"]  # the half-written temporary file is gone


def test_failed_write_of_a_first_checkpoint_leaves_nothing(tmp_path, monkeypatch):
    io_plugin = AtomicCheckpointIO()
    monkeypatch.setattr(torch, "save", _failing_save(RuntimeError("cannot pickle this")))
    with pytest.raises(RuntimeError, match="cannot pickle"):  # not a write error: passed on as it is
        io_plugin.save_checkpoint(_checkpoint(1.0), tmp_path / "last.ckpt")
    assert os.listdir(tmp_path) == []


def test_folder_that_cannot_be_created_is_a_write_error(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")
    with pytest.raises(CheckpointWriteError, match="a file sits where a folder") as failure:
        AtomicCheckpointIO().save_checkpoint(_checkpoint(1.0), tmp_path / "a_file" / "last.ckpt")
    assert "no checkpoint was written" in str(failure.value)


# -------------------------------------------------------------------------------- the mpae command
def test_mpae_uses_the_atomic_plugin_unless_told_otherwise(tmp_path):
    cli = MPAECLI(args=_args(tmp_path), run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is AtomicCheckpointIO
    other = "--trainer.plugins=lightning.pytorch.plugins.io.TorchCheckpointIO"
    cli = MPAECLI(args=[*_args(tmp_path), other], run=False)
    assert type(cli.trainer.strategy.checkpoint_io) is not AtomicCheckpointIO


def test_disk_full_during_fit_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    real = torch.save
    saves: list[bytes] = []

    def save(obj, f, *args, **kwargs):
        if ".last.ckpt." not in str(getattr(f, "name", "")):
            return real(obj, f, *args, **kwargs)
        if saves:  # the second save (end of epoch 1): the disk is full
            saves.append((Path(f.name).parent / "last.ckpt").read_bytes())
            return _failing_save(OSError(errno.ENOSPC, "No space left on device"), real)(obj, f, *args, **kwargs)
        saves.append(b"")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert _run(["fit", *_args(tmp_path, "--trainer.max_epochs=2", NO_VAL)]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "mpae: error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    (last,) = _ckpts(tmp_path, "last.ckpt")
    assert str(Path(last).parent) in lines[0] and "disk full" in lines[0] and "free space" in lines[0], lines[0]
    assert len(saves) == 2 and Path(last).read_bytes() == saves[1]
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    assert _temps(tmp_path) == []
    assert "mpae_lightning.runs.AtomicCheckpointIO" in (Path(last).parents[1] / "config.yaml").read_text()


#: Runs ``mpae`` (argv after the code) with a ``torch.save`` that, at save number $KILL_AT_SAVE of
#: last.ckpt, writes half of the checkpoint and then SIGKILLs its own process: a crash mid-save.
KILLED_IN_SAVE = """
import io, os, signal, sys, torch
real, count = torch.save, [0]
def save(obj, f, *args, **kwargs):
    if ".last.ckpt." in str(getattr(f, "name", "")):
        count[0] += 1
        if count[0] == int(os.environ["KILL_AT_SAVE"]):
            buffer = io.BytesIO()
            real(obj, buffer, *args, **kwargs)
            f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *args, **kwargs)
torch.save = save
from mpae_lightning.cli import main
main(sys.argv[1:])
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_kill_during_a_save_keeps_the_previous_checkpoint_and_resumes(tmp_path):
    env = {**os.environ, "KILL_AT_SAVE": "2",
           "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    proc = subprocess.run(
        [sys.executable, "-c", KILLED_IN_SAVE, "fit", *_args(tmp_path, "--trainer.max_epochs=2", NO_VAL)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert len(_temps(tmp_path)) == 1  # the half-written save went to a temporary file...
    (last,) = _ckpts(tmp_path, "last.ckpt")  # ...and last.ckpt is still the end of epoch 0
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 2
    assert _run(["fit", *_args(tmp_path, "--trainer.max_epochs=2", NO_VAL, "--ckpt_path=last")]) == 0
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["epoch"] == 1 and resumed["global_step"] == 4
    assert [Path(p).name for p in _ckpts(tmp_path)] == ["last.ckpt"]
    assert _temps(tmp_path) == []  # the next good save removed the killed save's partial file


# ------------------------------------------------------------------------------ a save every epoch
class CrashAtEpoch(Callback):
    """Raise at the start of epoch ``epoch``: the run dies after the previous epoch ended."""

    def __init__(self, epoch: int = 1) -> None:
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        if trainer.current_epoch == self.epoch:
            raise RuntimeError(f"crash at the start of epoch {self.epoch}")


@pytest.mark.parametrize("limit_val_batches", ["0", "1.0"], ids=["no-validation", "validation"])
def test_every_epoch_is_saved(tmp_path, limit_val_batches):
    crash = '--trainer.callbacks+={"class_path": "test_runs.CrashAtEpoch", "init_args": {"epoch": 1}}'
    argv = ["fit", *_args(tmp_path, "--trainer.max_epochs=2", f"--trainer.limit_val_batches={limit_val_batches}", crash)]
    with pytest.raises(RuntimeError, match="crash at the start of epoch 1"):
        main(argv)
    (last,) = _ckpts(tmp_path)
    assert Path(last).name == "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 2


def test_resuming_reads_checkpoints_without_running_code(tmp_path):
    """AtomicCheckpointIO is also how `mpae fit --ckpt_path` reads: weights_only=True, never code."""
    import os as _os

    from mpae_lightning.errors import CheckpointError
    from mpae_lightning.runs import AtomicCheckpointIO

    class Payload:
        def __reduce__(self):
            return (_os.mkdir, (str(tmp_path / "PWNED"),))

    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, path)
    io = AtomicCheckpointIO()
    with pytest.raises(Exception):
        io.load_checkpoint(path)
    with pytest.raises(CheckpointError, match="weights_only=True"):
        io.load_checkpoint(path, weights_only=False)
    assert not (tmp_path / "PWNED").exists()
    good = tmp_path / "good.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, good)
    assert torch.equal(io.load_checkpoint(good)["state_dict"]["w"], torch.ones(2))


def test_linked_data_settings_take_the_data_class_defaults():
    """What the CLI would link from a data section: given values, else the data class's own defaults."""
    from mpae_lightning.lightning_module import LINKED_FROM_DATA
    from mpae_lightning.runs import linked_data_settings

    celeba = {"class_path": "mpae_lightning.data.CelebADataModule", "init_args": {"root": "x"}}
    assert linked_data_settings(celeba, LINKED_FROM_DATA) == {"image_size": 224, "mini_group": 8, "input_antialias": False}
    folder = {"class_path": "ImageFolderDataModule", "init_args": {"root": "x", "image_size": 112, "input_antialias": False}}
    assert linked_data_settings(folder, LINKED_FROM_DATA)["input_antialias"] is False
    cub = {"class_path": "mpae_lightning.data.CUBDataModule", "init_args": {"root": "x"}}
    assert linked_data_settings(cub, LINKED_FROM_DATA) == {"image_size": 448, "mini_group": 8, "input_antialias": True}
    # an unknown class: only what the section says
    assert linked_data_settings({"class_path": "nowhere.Data", "init_args": {"mini_group": 4}}, LINKED_FROM_DATA) == {
        "mini_group": 4}
    assert linked_data_settings(None, LINKED_FROM_DATA) == {}
    # a data class's default never overrides what the model section sets itself
    assert linked_data_settings(cub, LINKED_FROM_DATA, {"image_size": 224}) == {"mini_group": 8, "input_antialias": True}
