"""Runs that stop loudly, resume exactly, and refuse bad input in one line (the `mpae` command)."""
from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import DEMO_CONFIG, REPO, TINY_DEMO_ARGS
from mpae_lightning.cli import main

#: Two batches per epoch, so "mid-epoch" and "epoch boundary" are both one step away.
SHORT = ["--data.init_args.num_train=16", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
         "--trainer.num_sanity_val_steps=0"]


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


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "mpae: error:" in line]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch run (4 steps): the reference for resumes, and a checkpoint to test with."""
    root = tmp_path_factory.mktemp("uninterrupted")
    assert _run(["fit", *_args(root, "--trainer.max_epochs=2")]) == 0
    return root


def _state(path: str) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


# ---------------------------------------------------------------------------------- exact resume
@pytest.mark.parametrize(
    "stop_at, where",
    [('{"step": 3}', "epoch 1, step 3"), ('{"validation_epoch": 0}', "the end of epoch 0")],
    ids=["mid-epoch", "epoch-boundary"],
)
def test_interrupted_run_resumes_bit_identical(trained, tmp_path, capsys, stop_at, where):
    signal_at = '--trainer.callbacks+={"class_path": "signal_helpers.SignalAt", "init_args": %s}' % stop_at
    assert _run(["fit", *_args(tmp_path, "--trainer.max_epochs=2", signal_at)]) == 143
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("mpae: stopped by SIGTERM"))
    assert where in line and "--ckpt_path last" in line, line
    saved = _ckpts(tmp_path, "last.ckpt")
    assert len(saved) == 1 and saved[0] in line
    assert _run(["fit", *_args(tmp_path, "--trainer.max_epochs=2", "--ckpt_path=last")]) == 0
    # one run, one folder: the resumed fit continued in version_0 and overwrote its last.ckpt
    assert [Path(p).name for p in _ckpts(tmp_path, "last*.ckpt")] == ["last.ckpt"]
    assert {Path(p).parts[-3] for p in _ckpts(tmp_path)} == {"version_0"}
    reference, resumed = _state(_ckpts(trained, "last.ckpt")[0]), _state(saved[0])
    assert reference.keys() == resumed.keys()
    different = [k for k in reference if not torch.equal(reference[k], resumed[k])]
    assert not different, f"{len(different)} tensors differ after resuming, e.g. {different[:3]}"
    meta = torch.load(saved[0], map_location="cpu", weights_only=True)
    assert meta["global_step"] == 4 and {"torch", "numpy", "python"} <= set(meta["callbacks"]["ExactResume"]["train_rng"])


def test_ckpt_path_last_without_a_run_fails_clearly(tmp_path, capsys):
    assert _run(["fit", *_args(tmp_path, "--ckpt_path=last")]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "no checkpoint found" in lines[0] and str(tmp_path) in lines[0], lines


def test_explicit_argument_contradicting_checkpoint_is_refused(trained, capsys):
    ckpt = _ckpts(trained, "last.ckpt")[0]
    assert _run(["test", *_args(trained, f"--ckpt_path={ckpt}"), "--model.init_args.num_parts=6"]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and "num_parts=6" in lines[0] and "num_parts=4" in lines[0], lines
    assert "Traceback" not in err


def test_test_and_predict_write_into_the_run_folder(trained, capsys):
    ckpt = _ckpts(trained, "last.ckpt")[0]
    run = Path(ckpt).parents[1]
    fit_config = (run / "config.yaml").read_text()
    assert _run(["test", *_args(trained, f"--ckpt_path={ckpt}")]) == 0
    scores = yaml.safe_load((run / "test_scores.yaml").read_text())["scores"]
    assert 0.0 <= scores["test/mask_nmi"] <= 100.0
    assert (run / "test_config.yaml").is_file() and (run / "config.yaml").read_text() == fit_config
    assert _run(["predict", *_args(trained, f"--ckpt_path={ckpt}")]) == 0
    assert len(list((run / "predictions").glob("*_parts.png"))) == 8
    assert sorted(p.name for p in run.parent.iterdir()) == ["version_0"]  # no new version folders


# ----------------------------------------------------------------------------- non-finite guard
def test_non_finite_loss_stops_at_once_without_checkpoint(tmp_path, capsys):
    assert _run(["fit", *_args(tmp_path, "--model.init_args.lr=1e6")]) == 1
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "non-finite" in lines[0] and "epoch 0, step 1" in lines[0] and "total=nan" in lines[0]
    assert "restoration=nan" in lines[0] and "lr (now 1e+06)" in lines[0]
    assert _ckpts(tmp_path) == []  # nothing saved from the bad state


def test_non_finite_steps_can_be_skipped_and_are_counted(tmp_path):
    assert _run(["fit", *_args(tmp_path, "--model.init_args.lr=1e6", "--non_finite.action=skip")]) == 0
    ckpt = torch.load(_ckpts(tmp_path, "last.ckpt")[0], map_location="cpu", weights_only=True)
    assert ckpt["callbacks"]["NonFiniteGuard"]["skipped"] >= 1
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


# -------------------------------------------------------------------------- pre-emption (signals)
#: The line a run stopped mid-epoch prints; the numbers are read from it, never expected in advance.
STOPPED_MID_EPOCH = re.compile(
    r"^mpae: stopped by (?P<name>SIG[A-Z]+) at epoch (?P<epoch>\d+), step (?P<step>\d+) "
    r"\(batch (?P<batch>\d+) of (?P<per_epoch>\d+) done\): saved (?P<ckpt>.+?); resume with "
)
#: Epochs of the pre-empted runs (4 batches each): the resumed run must end after all their steps.
PREEMPTED_EPOCHS = 2
#: Only so that a broken run cannot hang the suite; no assertion depends on how long anything takes.
HANG_GUARD_S = 1800


def _callback(class_name: str, **init_args: object) -> str:
    return '--trainer.callbacks+=' + json.dumps({"class_path": f"signal_helpers.{class_name}", "init_args": init_args})


def _preempted_args(root: Path, *extra: str) -> list[str]:
    return _args(root, "--data.init_args.num_train=32", f"--trainer.max_epochs={PREEMPTED_EPOCHS}", *extra)


def _spawn(root: Path, marker: Path, sig: signal.Signals) -> subprocess.Popen:
    """``mpae fit`` in a child process that writes ``marker`` and then waits, mid-epoch, for ``sig``."""
    wait = _callback("MarkThenWaitForSignal", marker=str(marker), signum=int(sig), step=1, give_up_after=HANG_GUARD_S)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO / "tests")])}
    root.mkdir()
    with open(root / "stdout.txt", "w") as out, open(root / "stderr.txt", "w") as err:  # files: a full pipe cannot block it
        return subprocess.Popen([sys.executable, "-m", "mpae_lightning", "fit", *_preempted_args(root, wait)],
                                cwd=REPO, env=env, stdout=out, stderr=err, text=True)


def test_sigterm_and_sigint_checkpoint_mid_epoch_and_exit_nonzero(tmp_path):
    """Each run is signalled once it waits at a known state (the marker), so the load on the machine
    cannot move the stop; the step it stopped at is read from its message and checked against the
    checkpoint, and the resumed run continues from that step to the end."""
    runs = {sig: (tmp_path / sig.name, tmp_path / f"{sig.name}.waiting") for sig in (signal.SIGTERM, signal.SIGINT)}
    procs = {sig: _spawn(root, marker, sig) for sig, (root, marker) in runs.items()}
    try:
        guard = time.monotonic() + HANG_GUARD_S
        pending = dict(procs)
        while pending and time.monotonic() < guard:
            for sig, proc in list(pending.items()):
                if runs[sig][1].exists():
                    proc.send_signal(sig)
                    del pending[sig]
                elif proc.poll() is not None:
                    pytest.fail(f"the {sig.name} run ended before it waited for the signal:\n"
                                + (runs[sig][0] / "stderr.txt").read_text()[-3000:])
            time.sleep(0.2)
        assert not pending, f"no marker from {[s.name for s in pending]} within the hang guard"
        for proc in procs.values():
            proc.wait(timeout=HANG_GUARD_S)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
    stops = {}
    for sig, proc in procs.items():
        root = runs[sig][0]
        stderr = (root / "stderr.txt").read_text()
        assert proc.returncode == 128 + sig, stderr[-3000:]
        assert "Traceback" not in stderr, stderr[-3000:]
        stopped = [line for line in stderr.splitlines() if line.startswith("mpae: stopped by")]
        assert len(stopped) == 1, stderr[-3000:]
        stop = STOPPED_MID_EPOCH.match(stopped[0])
        assert stop and stop["name"] == sig.name and "--ckpt_path last" in stopped[0], stopped[0]
        epoch, step, batch, per_epoch = (int(stop[k]) for k in ("epoch", "step", "batch", "per_epoch"))
        # mid-epoch (the run waited inside epoch 0), and the message's numbers agree with each other
        assert 1 <= batch < per_epoch and step == epoch * per_epoch + batch, stopped[0]
        saved = _ckpts(root, "last.ckpt")
        assert len(saved) == 1 and os.path.samefile(saved[0], stop["ckpt"]), (saved, stopped[0])
        ckpt = torch.load(saved[0], map_location="cpu", weights_only=True)
        assert ckpt["global_step"] == step and ckpt["epoch"] == epoch, (ckpt["global_step"], ckpt["epoch"], stopped[0])
        assert ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["batches_done"] == batch, stopped[0]
        stops[sig] = (step, per_epoch)
    # and each resumes from the step it stopped at and ends after all the steps of the run
    for sig, (step, per_epoch) in stops.items():
        root, started = runs[sig][0], tmp_path / f"{sig.name}.resumed_from"
        assert _run(["fit", *_preempted_args(root, "--ckpt_path=last", _callback("RecordTrainStart", path=str(started)))]) == 0
        assert int(started.read_text()) == step
        saved = _ckpts(root, "last*.ckpt")
        assert [Path(p).name for p in saved] == ["last.ckpt"], saved
        assert torch.load(saved[0], map_location="cpu", weights_only=True)["global_step"] == PREEMPTED_EPOCHS * per_epoch


# -------------------------------------------------------------------- one line per user error
def _files(tmp: Path) -> dict[str, Path]:
    """Bad files of every kind a user may point the command at."""
    files = {
        "empty": tmp / "empty.ckpt",
        "garbage": tmp / "garbage.ckpt",
        "folder": tmp / "a_folder",
        "no_state": tmp / "no_state_dict.ckpt",
        "foreign": tmp / "foreign.pth",
        "file": tmp / "plain_file",
    }
    files["empty"].write_bytes(b"")
    files["garbage"].write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    files["folder"].mkdir()
    torch.save({"epoch": 3}, files["no_state"])
    torch.save({"layer.weight": torch.zeros(2)}, files["foreign"])
    files["file"].write_text("a file, not a folder")
    return files


def _image_folder(tmp: Path, corrupt: bool) -> list[str]:
    root = tmp / "images"
    (root / "a").mkdir(parents=True)
    for i in range(6):
        Image.fromarray(np.full((30, 40, 3), i * 30, np.uint8)).save(root / "a" / f"{i}.png")
    if corrupt:
        (root / "a" / "broken.png").write_bytes(b"\x89PNG but truncated")
    model = [a for a in TINY_DEMO_ARGS if not a.startswith("--data.")]
    return [*model, "--data=mpae_lightning.data.ImageFolderDataModule", f"--data.init_args.root={root}",
            "--data.init_args.image_size=64", "--data.init_args.batch_size=4", "--data.init_args.mini_group=2",
            "--data.init_args.eval_batch_size=4", "--data.init_args.num_workers=2"]


# (id, subcommand, extra arguments (may use {name} of _files), words the one error line must contain)
BAD_INPUTS = [
    ("num_parts_zero", "fit", ["--model.init_args.num_parts=0"], ["num_parts", "got 0"]),
    ("num_parts_negative", "fit", ["--model.init_args.num_parts=-3"], ["num_parts", "-3"]),
    ("num_parts_not_int", "fit", ["--model.init_args.num_parts=abc"], ["model.init_args.num_parts", "abc"]),
    ("mask_ratio_one", "fit", ["--model.init_args.mask_ratio=1.0"], ["mask_ratio", "1.0"]),
    ("mask_ratio_negative", "fit", ["--model.init_args.mask_ratio=-0.1"], ["mask_ratio", "-0.1"]),
    ("batch_vs_mini_group", "fit", ["--data.init_args.batch_size=12"], ["batch_size (12)", "mini_group (8)"]),
    ("batch_size_zero", "fit", ["--data.init_args.batch_size=0"], ["batch_size (0)"]),
    ("mini_group_zero", "fit", ["--data.init_args.mini_group=0"], ["mini_group (0)"]),
    ("eval_batch_size_zero", "fit", ["--data.init_args.eval_batch_size=0"], ["eval_batch_size (0)"]),
    ("image_size_vs_patch", "fit", ["--data.init_args.image_size=60"], ["image_size=60", "patch size 8"]),
    ("num_workers_negative", "fit", ["--data.init_args.num_workers=-1"], ["num_workers", "-1"]),
    ("lr_negative", "fit", ["--model.init_args.lr=-1"], ["learning rate", "-1"]),
    ("unknown_backbone", "fit", ["--model.init_args.backbone=no_such_vit"], ["no_such_vit"]),
    ("bad_literal", "fit", ["--non_finite.action=explode"], ["non_finite.action", "explode"]),
    ("max_epochs_not_int", "fit", ["--trainer.max_epochs=x"], ["trainer.max_epochs", "x"]),
    ("missing_config", "fit", ["--config=/no/such/config.yaml"], ["/no/such/config.yaml"]),
    ("unknown_flag", "fit", ["--no_such_flag=3"], ["--no_such_flag"]),
    ("linked_set_on_model", "fit", ["--model.init_args.image_size=96"], ["model.init_args.image_size=96", "data"]),
    ("weights_missing", "fit", ["--model.init_args.weights=/no/such/weights.pth"], ["/no/such/weights.pth"]),
    ("weights_garbage", "fit", ["--model.init_args.weights={garbage}"], ["garbage.ckpt", "could not read"]),
    ("weights_foreign", "fit", ["--model.init_args.weights={foreign}"], ["foreign.pth", "layer.weight"]),
    ("ckpt_missing", "test", ["--ckpt_path=/no/such/run.ckpt"], ["/no/such/run.ckpt", "does not exist"]),
    ("ckpt_empty", "test", ["--ckpt_path={empty}"], ["empty.ckpt", "empty file"]),
    ("ckpt_garbage", "test", ["--ckpt_path={garbage}"], ["garbage.ckpt", "cannot read"]),
    ("ckpt_folder", "test", ["--ckpt_path={folder}"], ["a_folder", "is a folder"]),
    ("ckpt_without_state_dict", "test", ["--ckpt_path={no_state}"], ["no_state_dict.ckpt", "state_dict"]),
    ("root_dir_under_file", "fit", ["--trainer.default_root_dir={file}/run"], ["trainer.default_root_dir", "plain_file"]),
    ("log_dir_under_file", "fit", ["--trainer.logger.init_args.save_dir={file}/logs"], ["save_dir", "is a file"]),
    ("predictions_under_file", "predict", ["--prediction_writer.output_dir={file}/preds"],
     ["prediction_writer.output_dir", "is a file"]),
    ("max_epochs_invalid", "fit", ["--trainer.max_epochs=-5"], ["max_epochs", "-5"]),
    ("eval_map_size_zero", "fit", ["--model.init_args.eval_map_size=0"], ["eval_map_size", "got 0"]),
    ("heads_zero", "fit", ["--model.init_args.descriptor_heads=0"], ["descriptor_heads", "got 0"]),
    ("heads_not_dividing", "fit", ["--model.init_args.descriptor_heads=3"], ["descriptor_width=64", "descriptor_heads=3"]),
    ("feature_dim_zero", "fit", ["--model.init_args.feature_dim=0"], ["feature_dim", "got 0"]),
    ("depth_negative", "fit", ["--model.init_args.encoder_depth=-1"], ["encoder_depth", "-1"]),
    ("mask_size_zero", "fit", ["--data.init_args.mask_size=0"], ["mask_size (0)"]),
]


@pytest.mark.parametrize("subcommand, extra, words", [c[1:] for c in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, subcommand, extra, words):
    files = _files(tmp_path)
    extra = [a.format(**files) for a in extra]
    assert _run([subcommand, *_args(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("corrupt", [False, True], ids=["missing-root", "corrupt-image-in-worker"])
def test_data_errors_are_one_line_even_from_workers(tmp_path, capsys, corrupt):
    args = _image_folder(tmp_path, corrupt)
    if not corrupt:
        args.append(f"--data.init_args.root={tmp_path / 'nowhere'}")
    assert _run(["fit", "--config", str(DEMO_CONFIG), *args, f"--trainer.default_root_dir={tmp_path}",
                 f"--trainer.logger.init_args.save_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and "Traceback" not in err and "DataLoader worker" not in err, err[-3000:]
    assert ("broken.png" in lines[0]) if corrupt else ("nowhere" in lines[0] and "does not exist" in lines[0])


@pytest.mark.parametrize("how", ["env", "flag"])
def test_debug_shows_the_traceback(tmp_path, monkeypatch, how):
    extra = ["--debug"] if how == "flag" else []
    if how == "env":
        monkeypatch.setenv("MPAE_DEBUG", "1")
    with pytest.raises(Exception, match="num_parts"):
        main(["fit", *_args(tmp_path), "--model.init_args.num_parts=0", *extra])


def test_checkpoint_that_does_not_fit_its_own_settings_is_one_line(trained, tmp_path, capsys):
    ckpt = torch.load(_ckpts(trained, "last.ckpt")[0], map_location="cpu", weights_only=True)
    ckpt["hyper_parameters"]["num_parts"] = 6  # settings that no longer match the tensors
    bad = tmp_path / "edited.ckpt"
    torch.save(ckpt, bad)
    args = [a for a in _args(tmp_path) if "num_parts" not in a]  # no explicit K: the checkpoint's is used
    assert _run(["test", *args, f"--ckpt_path={bad}"]) == 2
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1 and "does not fit" in lines[0] and "edited.ckpt" in lines[0] and "Traceback" not in err, lines


def test_weights_from_a_checkpoint_of_another_shape_is_one_line(trained, tmp_path, capsys):
    ckpt = _ckpts(trained, "last.ckpt")[0]
    assert _run(["fit", *_args(tmp_path), f"--model.init_args.weights={ckpt}", "--model.init_args.num_parts=6"]) == 2
    lines = _error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "does not fit" in lines[0] and "last.ckpt" in lines[0], lines
