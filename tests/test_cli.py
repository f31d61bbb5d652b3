"""The `mpae` command end to end on tiny synthetic data: fit, test, predict, official weights."""
from __future__ import annotations

import glob
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mpae_lightning.cli import MPAECLI, main
from reference_utils import reference_files


def _last_ckpt(root: Path) -> str:
    found = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    assert found, f"no last.ckpt under {root}"
    return found[0]


def test_fit_test_predict_from_checkpoint(tmp_path, tiny_demo_args, capsys):
    main(["fit", *tiny_demo_args])
    ckpt = _last_ckpt(tmp_path)
    events = glob.glob(str(tmp_path / "**" / "events.out.tfevents*"), recursive=True)
    assert events, "TensorBoard log missing"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    log = EventAccumulator(events[0])
    log.Reload()
    assert "val/parts" in log.Tags()["images"], "no part-overlay grid logged at validation"
    assert {"val/total", "val/keypoint_nmi", "val/keypoint_fg_nmi", "val/mask_nmi"} <= set(log.Tags()["scalars"])

    cli = MPAECLI(args=["test", *tiny_demo_args, f"--ckpt_path={ckpt}"])
    logged = cli.trainer.callback_metrics
    for key in ("test/keypoint_nmi", "test/keypoint_ari", "test/keypoint_fg_nmi", "test/keypoint_fg_ari",
                "test/mask_nmi", "test/mask_ari"):
        assert key in logged, key
        assert 0.0 <= float(logged[key]) <= 100.0
    # test with --ckpt_path must not try to download (weights were set to random, then restored)
    assert cli.model.hparams.backbone_weights == "random"

    validated = MPAECLI(args=["validate", *tiny_demo_args, f"--ckpt_path={ckpt}"]).trainer.callback_metrics
    assert {"val/keypoint_nmi", "val/mask_nmi", "val/total"} <= set(validated)

    out = tmp_path / "pred"
    main(["predict", *tiny_demo_args, f"--ckpt_path={ckpt}", f"--prediction_writer.output_dir={out}"])
    pngs = sorted(out.glob("*_parts.png"))
    npys = sorted(out.glob("*_parts.npy"))
    overlays = sorted(out.glob("*_overlay.png"))
    assert len(pngs) == len(npys) == len(overlays) == 16  # every test image once
    labels = np.asarray(Image.open(pngs[0]))
    assert labels.shape == (128, 128)
    assert labels.max() <= 4 and labels.min() >= 0  # K=4 foreground + background id 4
    assert np.array_equal(labels, np.load(npys[0]))
    panel = Image.open(overlays[0])  # image | overlay | part map, the 64 px input upscaled 4x, title, headers, legend
    assert panel.width == 3 * 256 + 2 * 2 and panel.height > 256 + 20
    assert panel.text["Title"].startswith(f"MPAE K=4  |  {Path(ckpt).name}  |  epoch 0  |  "), panel.text


def test_linked_arguments_come_from_data(tiny_demo_args):
    cli = MPAECLI(args=[*tiny_demo_args, "--data.init_args.mini_group=4"], run=False)
    assert cli.model.hparams.image_size == 64
    assert cli.model.hparams.mini_group == 4
    assert cli.model.loss.mini_group == 4


def test_batch_not_divisible_by_mini_group_is_rejected(tiny_demo_args):
    with pytest.raises(ValueError, match="mini_group"):
        MPAECLI(args=[*tiny_demo_args, "--data.init_args.batch_size=12"], run=False)
    # a mini-group larger than the batch is one group per batch (the authors' torch.split), not an error
    cli = MPAECLI(args=[*tiny_demo_args, "--data.init_args.batch_size=4"], run=False)
    assert cli.datamodule.batch_size == 4 and cli.model.hparams.mini_group == 8


def _official_state_dict(fixture: dict, dim: int) -> dict:
    """An authors'-format checkpoint built from the reference fixture's keys (+ module. prefix)."""
    state = dict(fixture["state_dict"])
    state["compress_layer.weight"] = torch.randn(state["compress_layer.weight"].shape[0], dim, 1, 1) * 0.02
    return {f"module.{k}": v for k, v in state.items()}


def test_test_with_authors_weights(tmp_path):
    fixture = torch.load(reference_files("mpae_reference_*.pt")[0], weights_only=True)
    cfg = fixture["config"]
    patch = int(fixture["state_dict"]["Transformer.conv1.weight"].shape[-1])
    dim = 32
    weights = tmp_path / "Official_K.pth"
    torch.save(_official_state_dict(fixture, dim), weights)
    r, d = cfg["restorer"], cfg["descriptor"]
    args = [
        "test",
        "--config", str(Path(__file__).parents[1] / "configs" / "demo.yaml"),
        "--data.init_args.num_train=8", "--data.init_args.num_val=8", "--data.init_args.num_test=8",
        f"--data.init_args.image_size={cfg['image_size']}",
        f"--data.init_args.batch_size={cfg['mini_group']}", f"--data.init_args.mini_group={cfg['mini_group']}",
        f"--model.init_args.num_parts={cfg['num_parts'] - 1}",
        f"--model.init_args.feature_dim={cfg['feature_dim']}",
        "--model.init_args.backbone=vit_small_patch14_reg4_dinov2",
        f"--model.init_args.backbone_kwargs={{embed_dim: {dim}, depth: 1, num_heads: 2, patch_size: {patch}}}",
        f"--model.init_args.descriptor_width={d['width']}", f"--model.init_args.descriptor_depth={d['depth']}",
        f"--model.init_args.descriptor_heads={d['heads']}",
        f"--model.init_args.encoder_width={r['encoder_width']}", f"--model.init_args.encoder_depth={r['encoder_depth']}",
        f"--model.init_args.encoder_heads={r['encoder_heads']}", f"--model.init_args.decoder_depth={r['decoder_depth']}",
        f"--model.init_args.decoder_heads={r['decoder_heads']}", f"--model.init_args.restore_patch={r['restore_patch']}",
        f"--model.init_args.weights={weights}",
        f"--trainer.default_root_dir={tmp_path}", f"--trainer.logger.init_args.save_dir={tmp_path}",
        "--trainer.enable_progress_bar=false",
    ]
    cli = MPAECLI(args=args)
    model = cli.model.model
    assert torch.equal(model.descriptor_vit.part_queries, fixture["state_dict"]["Transformer.class_embedding"])
    assert torch.equal(model.restorer.decoder_pred.weight, fixture["state_dict"]["Decoder.decoder_pred.weight"])
    assert "test/keypoint_nmi" in cli.trainer.callback_metrics


def test_offline_download_prints_one_clear_error(tmp_path):
    """Asking for pretrained weights with no network: one line naming the local-file option, exit 2."""
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise OSError('network disabled for this test')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "from mpae_lightning.cli import main\n"
        "main(['fit', '--config', 'configs/demo.yaml', '--model.init_args.backbone_weights=timm',"
        " '--trainer.max_epochs=1'])\n"
    )
    env = {"HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), "PATH": "/usr/bin:/bin",
           "HF_HUB_DISABLE_TELEMETRY": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "backbone_weights" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


# ------------------------------------------------------------- settings against a checkpoint, messages
@pytest.fixture(scope="module")
def trained_ckpt(tmp_path_factory) -> tuple[str, Path]:
    from conftest import DEMO_CONFIG, TINY_DEMO_ARGS

    root = tmp_path_factory.mktemp("trained")
    main(["fit", "--config", str(DEMO_CONFIG), *TINY_DEMO_ARGS, f"--trainer.default_root_dir={root}",
          f"--trainer.logger.init_args.save_dir={root}", "--trainer.limit_train_batches=1", "--trainer.limit_val_batches=1"])
    return _last_ckpt(root), root


def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mpae: error:")]
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_a_config_file_contradicting_the_checkpoint_is_refused(trained_ckpt, tmp_path, capsys, tiny_demo_args):
    ckpt, _ = trained_ckpt
    config = tmp_path / "eight_parts.yaml"
    config.write_text("model:\n  init_args:\n    num_parts: 8\n")
    args = [a for a in tiny_demo_args if "num_parts" not in a]
    line = _error(capsys, ["test", *args, "--config", str(config), f"--ckpt_path={ckpt}"])
    assert "num_parts=8" in line and "num_parts=4" in line and str(config) in line and ckpt in line, line
    # the same value typed on the command line names the argument
    line = _error(capsys, ["test", *args, "--model.init_args.num_parts=8", f"--ckpt_path={ckpt}"])
    assert "--model.init_args.num_parts" in line and "num_parts=8" in line and "num_parts=4" in line, line


def test_settings_not_given_come_from_the_checkpoint(trained_ckpt, tmp_path):
    from conftest import DEMO_CONFIG

    ckpt, _ = trained_ckpt
    # no K, image size, widths or data section: all from the checkpoint (K=4, 64 px, the tiny backbone)
    cli = MPAECLI(args=["test", f"--ckpt_path={ckpt}", "--data=mpae_lightning.data.SyntheticPartsDataModule",
                        "--data.init_args.num_test=4", "--data.init_args.eval_batch_size=4",
                        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])
    assert cli.model.hparams.num_parts == 4 and cli.model.model.image_size == 64
    assert cli.datamodule.image_size == 64
    assert DEMO_CONFIG.is_file()


def test_yaml_syntax_error_names_file_line_and_column(tmp_path, capsys, tiny_demo_args):
    config = tmp_path / "broken.yaml"
    config.write_text("model:\n  init_args:\n    milestones: [1, 2\n    lr: 0.1\n")
    line = _error(capsys, ["fit", *tiny_demo_args, "--config", str(config)])
    assert f"{config}:4:" in line and "YAML" in line, line


@pytest.mark.parametrize(
    "argument, words",
    [("--model.init_args.num_prts=3", ["unknown", "model.init_args.num_prts", "did you mean num_parts"]),
     ("--data.init_args.bath_size=3", ["unknown", "data.init_args.bath_size", "did you mean batch_size"]),
     ("--trainer.max_epoch=1", ["unknown", "trainer.max_epoch", "did you mean max_epochs"])],
    ids=["model", "data", "abbreviated-trainer"],
)
def test_unknown_settings_say_unknown_and_suggest(tmp_path, capsys, tiny_demo_args, argument, words):
    line = _error(capsys, ["fit", *tiny_demo_args, argument])
    for word in words:
        assert word in line, (word, line)


def test_unknown_setting_in_a_config_file_names_the_file(tmp_path, capsys, tiny_demo_args):
    config = tmp_path / "typo.yaml"
    config.write_text("model:\n  init_args:\n    mask_ratoi: 0.5\n")
    line = _error(capsys, ["fit", *tiny_demo_args, "--config", str(config)])
    assert str(config) in line and "unknown setting model.init_args.mask_ratoi" in line and "mask_ratio" in line, line


def test_free_settings_given_next_to_a_checkpoint_are_used_not_replaced(trained_ckpt, tmp_path):
    """Settings a checkpoint does not fix (evaluation map size, learning rate) keep the user's value."""
    ckpt, _ = trained_ckpt
    cli = MPAECLI(args=["test", f"--ckpt_path={ckpt}", "--data=mpae_lightning.data.SyntheticPartsDataModule",
                        "--data.init_args.num_test=4", "--data.init_args.eval_batch_size=4",
                        "--model.init_args.eval_map_size=64", "--model.init_args.lr=0.25",
                        f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false"])
    assert cli.model.hparams.eval_map_size == 64 and cli.model.hparams.lr == 0.25
    assert cli.model.model.eval_scale_factor == 64 / cli.model.model.grid_size[0]


def test_load_from_checkpoint_refuses_a_fixed_setting_given_differently(trained_ckpt):
    from mpae_lightning import MPAEModule

    ckpt, _ = trained_ckpt
    with pytest.raises(ValueError, match=r"num_parts=6 was given, but the checkpoint .* num_parts=4"):
        MPAEModule.load_from_checkpoint(ckpt, num_parts=6)
    assert MPAEModule.load_from_checkpoint(ckpt, eval_map_size=32).model.eval_scale_factor == 32 / 8


def test_predict_without_trained_weights_is_refused_unless_asked(tmp_path, capsys, tiny_demo_args):
    out = tmp_path / "preds"
    line = _error(capsys, ["predict", *tiny_demo_args, f"--prediction_writer.output_dir={out}"])
    assert "--ckpt_path" in line and "--untrained" in line, line
    assert not out.exists()  # nothing written from random weights
    main(["predict", *tiny_demo_args, f"--prediction_writer.output_dir={out}", "--untrained=true"])
    assert len(list(out.glob("*_parts.png"))) == 16


def test_predict_and_parts_from_a_checkpoint_alone_on_mixed_images(trained_ckpt, tmp_path, capsys, monkeypatch):
    """No --config, no --model: every setting from the checkpoint; one part map per image of any size and
    mode; into --out or the run folder, nothing in the current folder; the last line says what went where.
    `mpae parts` on the folder writes the same files."""
    from inference_utils import make_mixed_images

    ckpt, _ = trained_ckpt
    images = make_mixed_images(tmp_path / "images")
    n = len(images)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    quiet = ["--trainer.enable_progress_bar=false", "--data.num_workers=0", "--data.eval_batch_size=4"]
    out = tmp_path / "out"
    main(["predict", f"--ckpt_path={ckpt}", "--data", "ImageFolderDataModule", "--data.root", str(tmp_path / "images"),
          *quiet, "--out", str(out)])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"mpae: wrote {3 * n} files (part map .png and .npy, overlay .png) for {n} images to {out}"
    maps = sorted(out.glob("*_parts.npy"))
    assert [p.name for p in maps] == [f"{i:06d}_{p.stem}_parts.npy" for i, p in enumerate(images)]
    assert all(np.load(p).shape == (128, 128) for p in maps)  # the checkpoint's evaluation map

    # without --out: the checkpoint's run folder
    main(["predict", f"--ckpt_path={ckpt}", "--data", "ImageFolderDataModule", "--data.init_args.root",
          str(tmp_path / "images"), *quiet])
    run_predictions = Path(ckpt).parents[1] / "predictions"
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"for {n} images to {run_predictions}")
    assert len(list(run_predictions.glob("*_parts.png"))) >= n
    assert list(cwd.iterdir()) == []  # no ./predictions, no ./lightning_logs

    with pytest.raises(SystemExit) as stop:
        main(["parts", str(tmp_path / "images"), f"--ckpt_path={ckpt}", "--out", str(tmp_path / "parts"), "--batch_size=4"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == (
        f"mpae parts: wrote {3 * n} files for {n} images to {tmp_path / 'parts'}")
    for path in maps:
        assert np.array_equal(np.load(path), np.load(tmp_path / "parts" / path.name)), path.name


def test_out_is_refused_where_it_means_nothing(trained_ckpt, tmp_path, capsys):
    ckpt, _ = trained_ckpt
    line = _error(capsys, ["test", f"--ckpt_path={ckpt}", "--data=mpae_lightning.data.SyntheticPartsDataModule",
                           "--out", str(tmp_path / "x")])
    assert "--out" in line and "mpae predict" in line, line


def test_predict_reads_a_folder_as_the_checkpoints_training_data(tmp_path):
    """A checkpoint trained without antialiasing (CelebA's ``input_antialias: false``) makes an image folder
    read that way when the command line does not say otherwise; saying so wins."""
    from inference_utils import make_mixed_images, save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "plain.ckpt", input_antialias=False)
    make_mixed_images(tmp_path / "images")
    common = [f"--ckpt_path={ckpt}", "--data=ImageFolderDataModule", f"--data.init_args.root={tmp_path / 'images'}",
              "--data.init_args.num_workers=0", "--trainer.enable_progress_bar=false", f"--out={tmp_path / 'out'}"]
    cli = MPAECLI(args=["predict", *common])
    assert cli.datamodule.input_antialias is False and cli.model.input_antialias is False
    assert cli.datamodule.predict_dataset.squash
    cli = MPAECLI(args=["predict", *common, "--data.init_args.input_antialias=true"])
    assert cli.datamodule.input_antialias is True and cli.model.input_antialias is True
