"""What the `mpae` command prints: help in our words, no Lightning tips or library warnings, a last
line that says what each command produced and where, the test table, and nothing to score refused."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import DEMO_CONFIG, REPO, TINY_DEMO_ARGS
from mpae_lightning.cli import COMMANDS, EXTRA_COMMANDS, MPAECLI, main


def _run_args(root: Path) -> list[str]:
    return ["--config", str(DEMO_CONFIG), *TINY_DEMO_ARGS, f"--trainer.default_root_dir={root}",
            f"--trainer.logger.init_args.save_dir={root}"]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """A tiny `mpae fit` run as a user runs it (its own process, output captured as the terminal sees it)."""
    root = tmp_path_factory.mktemp("fit")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    env.pop("PYTHONWARNINGS", None)
    proc = subprocess.run(
        [sys.executable, "-m", "mpae_lightning", "fit", *_run_args(root)],
        capture_output=True, text=True, env=env, cwd=root, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, root


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    assert stop.value.code in (0, None)
    return capsys.readouterr().out


# ----------------------------------------------------------------------------------------- help
def test_help_lists_every_command_with_one_line(capsys):
    out = _help(capsys, ["--help"])
    commands = [*COMMANDS, *EXTRA_COMMANDS]
    assert {"fit", "validate", "test", "predict", "check-data"} <= set(commands)
    for name in commands:
        lines = [line for line in out.splitlines() if re.match(rf"^\s+{re.escape(name)}\s{{2,}}\w", line)]
        assert lines, f"`mpae --help` does not list {name} with a description:\n{out}"
    usage = out.splitlines()[0]
    assert all(name in usage for name in commands), usage


def test_check_data_help_shows_each_example_on_its_own_line(capsys):
    out = _help(capsys, ["check-data", "--help"])
    lines = [line.strip() for line in out.splitlines()]
    assert "mpae check-data --config configs/cub.yaml --data.init_args.root /data/CUB_200_2011" in lines, out
    assert "mpae check-data --config configs/partimagenet_seg.yaml --splits train test" in lines, out


@pytest.mark.parametrize("subcommand", ["fit", "test"])
def test_ckpt_path_help_is_in_mpae_words(capsys, subcommand):
    out = _help(capsys, [subcommand, "--help"])
    start = out.index("  --ckpt_path")
    block = " ".join(out[start:].split("\n  --", 1)[0].split())  # the option's help, one line
    assert "last" in block and "newest run" in block and "settings come from the checkpoint" in block, block
    assert "hpc" not in block and "registry" not in block, block  # not Lightning's text


@pytest.mark.parametrize("subcommand", ["fit", "predict"])
def test_command_help_ends_with_every_model_setting_and_its_default(capsys, subcommand):
    import inspect

    from mpae_lightning import MPAEModule

    out = _help(capsys, [subcommand, "--help"])
    tail = out[out.index("MPAE's settings and defaults"):]
    for name, param in inspect.signature(MPAEModule.__init__).parameters.items():
        if name != "self":
            assert f"{name}={param.default!r}" in tail, name
    assert "--model.help MPAEModule" in tail


# --------------------------------------------------------------------------------- fit's output
def test_fit_shows_no_tips_or_library_warnings(fitted):
    proc, _ = fitted
    output = proc.stdout + proc.stderr
    assert "Tip:" not in output and "litlogger" not in output and "litmodels" not in output, output
    assert "LeafSpec" not in output and "FutureWarning" not in output, output


def test_fit_last_line_names_run_folder_and_checkpoint(fitted):
    proc, _ = fitted
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"mpae: trained 1 epoch; run folder (\S+); checkpoint (\S+)", last)
    assert match, last
    run, ckpt = Path(match.group(1)), Path(match.group(2))
    assert run.is_dir() and ckpt == run / "checkpoints" / "last.ckpt" and ckpt.is_file(), last


# -------------------------------------------------------------------------------- test, predict
def _events(folder: Path) -> set[Path]:
    return set(folder.glob("events.out.tfevents*"))


def test_test_prints_the_table_writes_the_same_scores_and_no_hp_metric(fitted, capsys, recwarn):
    _, root = fitted
    run = root / "tensorboard" / "version_0"
    before = _events(run)
    main(["test", *_run_args(root), "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"mpae: scores written to {run / 'test_scores.yaml'}", out[-1]
    saved = yaml.safe_load((run / "test_scores.yaml").read_text())["scores"]
    header = next(i for i, line in enumerate(out) if line.split()[-2:] == ["NMI", "ARI"])
    rows = {re.split(r"\s{2,}", line.strip())[0]: [float(v) for v in re.split(r"\s{2,}", line.strip())[1:]]
            for line in out[header + 1:-1]}
    expected = {
        "keypoints": ["test/keypoint_nmi", "test/keypoint_ari"],
        "keypoints, foreground only": ["test/keypoint_fg_nmi", "test/keypoint_fg_ari"],
        "part masks": ["test/mask_nmi", "test/mask_ari"],
        "foreground IoU (masks)": ["test/mask_fg_iou"],
    }
    for row, keys in expected.items():
        assert row in rows, (row, out)
        assert rows[row] == pytest.approx([saved[k] for k in keys], abs=0.006), row
    # The test run logged into the training run's folder without a placeholder hp_metric (-1).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    new = _events(run) - before
    assert new, "test logged nothing"
    for path in new:
        log = EventAccumulator(str(path))
        log.Reload()
        assert "test/keypoint_nmi" in log.Tags()["scalars"]
        assert "hp_metric" not in log.Tags()["scalars"], path
        assert not any("hparams" in str(tag) for tag in log.Tags()["tensors"]), path
    # MPAECLI takes args while pytest's sys.argv has arguments: LightningCLI's warning is not shown.
    assert not [w for w in recwarn if "args parameter" in str(w.message)]


def test_predict_last_line_counts_what_was_written(fitted, tmp_path, capsys):
    _, root = fitted
    out_dir = tmp_path / "maps"
    ckpt = root / "tensorboard" / "version_0" / "checkpoints" / "last.ckpt"
    main(["predict", *_run_args(root), f"--ckpt_path={ckpt}", f"--prediction_writer.output_dir={out_dir}"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    files = sorted(out_dir.iterdir())
    assert len(files) == 3 * 16  # 16 test images: part map .png and .npy, overlay .png
    assert last == f"mpae: wrote {len(files)} files (part map .png and .npy, overlay .png) for 16 images to {out_dir}"


def test_test_on_images_without_annotations_has_nothing_to_score(fitted, tmp_path, capsys):
    _, root = fitted
    ckpt = tmp_path / "model.ckpt"  # outside a run folder, so the command logs under tmp_path/out
    shutil.copy(root / "tensorboard" / "version_0" / "checkpoints" / "last.ckpt", ckpt)
    images = tmp_path / "images" / "a"
    images.mkdir(parents=True)
    for i in range(4):
        Image.fromarray(np.full((30, 40, 3), i * 50, np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stop:
        main(["test", "--data=mpae_lightning.data.ImageFolderDataModule", f"--data.init_args.root={images.parent}",
              "--data.init_args.num_workers=0", f"--trainer.default_root_dir={out}", f"--ckpt_path={ckpt}"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mpae: error: "), err
    assert "no keypoints or masks to score" in err[0] and "ImageFolderDataModule" in err[0], err[0]
    assert str(images.parent) in err[0], err[0]
    assert not list(tmp_path.rglob("test_scores.yaml"))


def test_args_while_sys_argv_has_arguments_give_no_warning(monkeypatch, recwarn, tmp_path):
    """The demo builds MPAECLI from its own arguments while sys.argv holds the demo's."""
    monkeypatch.setattr(sys, "argv", ["demo", "--out", str(tmp_path)])
    MPAECLI(args=_run_args(tmp_path), run=False)
    assert not [w for w in recwarn if "args parameter" in str(w.message)], [str(w.message) for w in recwarn]
