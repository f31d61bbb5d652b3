"""The `mpae` command as a Lightning user expects it: help, version, one way to set each thing, clear logs."""
from __future__ import annotations

import glob
import warnings
from pathlib import Path

import pytest
import torch

import mpae_lightning
from mpae_lightning.cli import MPAECLI, main
from mpae_lightning.lightning_module import FROZEN_RECORD, MPAEModule


def _scalars(root: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[str, list[float]] = {}
    for path in glob.glob(str(root / "**" / "events.out.tfevents*"), recursive=True):
        log = EventAccumulator(path)
        log.Reload()
        for tag in log.Tags()["scalars"]:
            values.setdefault(tag, []).extend(e.value for e in log.Scalars(tag))
    return values


def test_help_has_a_description_and_version_comes_from_the_package(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "Masked Part AutoEncoder" in out and "Lightning Trainer command line tool" not in out
    assert "--version" in out
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.split()[-1] == mpae_lightning.__version__


def test_abstract_datamodule_is_not_offered(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    out = capsys.readouterr().out
    assert "mpae_lightning.CUBDataModule" in out
    assert "mpae_lightning.data.PartDataModule" not in out


@pytest.mark.parametrize("flag", ["--optimizer=Adam", "--lr_scheduler=StepLR"])
def test_optimizer_flags_are_not_offered(tiny_demo_args, flag, capsys):
    """lr, weight_decay, milestones and gamma are the only way: no second, silently winning one."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *tiny_demo_args, flag])
    assert exit_.value.code == 2
    assert flag.split("=")[0] in capsys.readouterr().err


def test_linked_setting_given_for_the_model_is_refused(tiny_demo_args, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *tiny_demo_args, "--model.init_args.image_size=256"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "model.init_args.image_size=256" in err and "--data.init_args.image_size" in err
    with pytest.raises(SystemExit):
        main(["fit", *tiny_demo_args, "--model.init_args.mini_group=4"])
    assert "--data.init_args.mini_group" in capsys.readouterr().err
    # The data value, also written for the model (as a saved config.yaml does), is fine.
    cli = MPAECLI(args=[*tiny_demo_args, "--model.init_args.image_size=64"], run=False)
    assert cli.model.hparams.image_size == 64


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    """One tiny `mpae fit` shared by the logging and checkpoint tests below."""
    from conftest import DEMO_CONFIG, TINY_DEMO_ARGS

    root = tmp_path_factory.mktemp("fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["fit", "--config", str(DEMO_CONFIG), *TINY_DEMO_ARGS, "--trainer.log_every_n_steps=1",
              f"--trainer.default_root_dir={root}", f"--trainer.logger.init_args.save_dir={root}"])
    (root / "warnings.txt").write_text("\n".join(str(w.message) for w in caught))
    return root


def test_fit_logs_each_quantity_once_under_a_clear_name(fitted):
    scalars = _scalars(fitted)
    assert "train/loss" not in scalars and "train/total" in scalars
    assert not any(tag.startswith("val/") and tag.endswith(("/nmi", "/ari")) for tag in scalars)
    assert {"val/keypoint_nmi", "val/keypoint_fg_ari", "val/mask_nmi", "val/mask_ari"} <= set(scalars)
    assert scalars["train/lr"] == [pytest.approx(5e-4)]  # the demo config's lr (the default), once per epoch
    # hp_metric follows the main validation score instead of staying at -1
    assert scalars["hp_metric"][-1] == pytest.approx(scalars["val/keypoint_nmi"][-1])
    assert scalars["hp_metric"][-1] != -1


def test_frozen_modules_in_eval_mode_do_not_warn(fitted):
    assert "in eval mode" not in (fitted / "warnings.txt").read_text()


def test_one_checkpoint_file_per_run(fitted):
    files = sorted(Path(p).name for p in glob.glob(str(fitted / "**" / "*.ckpt"), recursive=True))
    assert files == ["last.ckpt"]


def _tiny_backbone_file(tmp_path: Path) -> str:
    import timm

    vit = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0, embed_dim=48, depth=1, num_heads=2)
    path = tmp_path / "tiny_vit.pth"
    torch.save(vit.state_dict(), path)
    return str(path)


def test_checkpoint_without_frozen_weights_and_opt_in_best(tmp_path, tiny_demo_args):
    """Left-out frozen weights are recorded, rebuilt from their source on load, and demanded clearly;
    a best-by-metric file is one callback away."""
    backbone_file = _tiny_backbone_file(tmp_path)
    args = [*tiny_demo_args, f"--model.init_args.backbone_weights={backbone_file}"]
    main(["fit", *args, "--model.init_args.frozen_weights_in_checkpoint=false",
          "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
          "--trainer.callbacks.monitor=val/keypoint_nmi", "--trainer.callbacks.mode=max",
          "--trainer.callbacks.filename=best"])
    files = {Path(p).name: p for p in glob.glob(str(tmp_path / "**" / "*.ckpt"), recursive=True)}
    assert sorted(files) == ["best.ckpt", "last.ckpt"]
    ckpt = files["last.ckpt"]
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert not any(k.startswith("model.backbone.") for k in saved["state_dict"])
    # The VGG here is random, so it cannot be rebuilt: it stays in the file (under the loss, not the model).
    assert any(k.startswith("loss.restoration.features.") for k in saved["state_dict"])
    assert not any(k.startswith("model.restoration_loss.") for k in saved["state_dict"])
    assert saved[FROZEN_RECORD] == {"backbone": {"backbone_weights": backbone_file, "backbone": "vit_small_patch8_224",
                                                 "backbone_kwargs": {"embed_dim": 48, "depth": 1, "num_heads": 2}}}

    expected = torch.load(backbone_file, weights_only=True)["blocks.0.attn.qkv.weight"]
    module = MPAEModule.load_from_checkpoint(ckpt)
    assert torch.equal(module.model.backbone.vit.blocks[0].attn.qkv.weight, expected)
    assert torch.equal(module.model.feature_proj.weight, saved["state_dict"]["model.feature_proj.weight"])
    # `mpae test --ckpt_path` rebuilds it from the recorded source too (it does not force random weights)
    cli = MPAECLI(args=["test", *args, f"--ckpt_path={ckpt}", "--trainer.logger=false"])
    assert torch.equal(cli.model.model.backbone.vit.blocks[0].attn.qkv.weight, expected)
    assert "test/keypoint_nmi" in cli.trainer.callback_metrics

    with pytest.raises(ValueError, match="backbone_weights="):
        MPAEModule.load_from_checkpoint(ckpt, backbone_weights="random")
    Path(backbone_file).unlink()
    with pytest.raises(Exception, match="saved without the frozen backbone weights.*backbone_weights"):
        MPAEModule.load_from_checkpoint(ckpt)


def test_validation_scores_say_which_images_they_come_from(tmp_path):
    from types import SimpleNamespace

    from mpae_lightning.data import CUBDataModule, ImageFolderDataModule

    module = MPAEModule(num_parts=2, image_size=16, backbone="vit_small_patch8_224", backbone_weights="random",
                        backbone_kwargs={"embed_dim": 16, "depth": 1, "num_heads": 1}, vgg_weights="random",
                        descriptor_depth=1, feature_dim=16, descriptor_width=16, encoder_width=16, decoder_heads=1)
    expected = {
        CUBDataModule(root=str(tmp_path)): "val_on_test",  # the authors' protocol: the test split
        CUBDataModule(root=str(tmp_path), val_fraction=0.1): "val",
        ImageFolderDataModule(root=str(tmp_path)): "val_on_train",
    }
    for datamodule, prefix in expected.items():
        module.trainer = SimpleNamespace(datamodule=datamodule)
        assert module.log_prefix("val") == prefix
        assert module.log_prefix("test") == "test"
