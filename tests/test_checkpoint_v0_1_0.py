"""Checkpoints written by version 0.1.0 (VGG inside the model, ``model.restoration_loss.*`` keys) still load.

The fixture was made by ``tests/fixtures/make_checkpoint_v0_1_0.py`` run on the 0.1.0 sources: a tiny
model trained for two steps, saved without its (public) VGG, plus the part probabilities 0.1.0
computed for fixed images.
"""
from __future__ import annotations

from pathlib import Path

import torch

from mpae_lightning import MPAEModule
from mpae_lightning.cli import main
from mpae_lightning.lightning_module import upgrade_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
CHECKPOINT = FIXTURES / "checkpoint_v0_1_0.ckpt"
EXPECTED = FIXTURES / "checkpoint_v0_1_0_expected.pt"


def test_v0_1_0_checkpoint_loads_and_predicts_the_same_maps():
    expected = torch.load(EXPECTED, weights_only=True)
    module = MPAEModule.load_from_checkpoint(CHECKPOINT, map_location="cpu").eval()
    assert module.hparams.num_parts == 3 and module.model.num_parts == 3
    with torch.no_grad():
        probs = module.model.predict_parts(expected["images"], scale_factor=1.0)
    torch.testing.assert_close(probs, expected["part_probabilities"], rtol=0, atol=1e-6)
    # The public VGG was left out by 0.1.0 too: it stays unresolved (needed only to train again).
    assert not module.loss.vgg.is_ready and module.loss.vgg.source.endswith("v010_vgg19.pth")
    assert not any("restoration_loss" in k for k in module.state_dict())


def test_v0_1_0_checkpoint_runs_through_mpae_test(tmp_path, capsys):
    args = ["test", f"--ckpt_path={CHECKPOINT}", "--data=mpae_lightning.data.SyntheticPartsDataModule",
            "--data.init_args.num_train=4", "--data.init_args.num_val=2", "--data.init_args.num_test=4",
            "--data.init_args.batch_size=2", "--data.init_args.eval_batch_size=2",
            f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=false", "--trainer.accelerator=cpu"]
    try:
        main(args)
    except SystemExit as stop:
        assert stop.code in (0, None), capsys.readouterr().err[-2000:]


def test_upgrade_state_dict_renames_the_vgg_keys_and_drops_the_ready_flag():
    weight = torch.randn(2)
    state = {
        "model.restoration_loss.features.slices.0.0.weight": weight,
        "model.restoration_loss.features.ready": torch.tensor(True),
        "model.feature_proj.weight": torch.zeros(1),
    }
    upgraded = upgrade_state_dict(state)
    assert set(upgraded) == {"loss.restoration.features.slices.0.0.weight", "model.feature_proj.weight"}
    assert upgraded["loss.restoration.features.slices.0.0.weight"] is weight
