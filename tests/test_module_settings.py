"""One source of truth: MPAE's settings reach MPAEModule and the CLI unrepeated; losses come from one table."""
from __future__ import annotations

import inspect

import lightning
import pytest
import torch
from torch import nn

from mpae_lightning import MPAE, MPAEModule
from mpae_lightning.cli import MPAECLI, main
from mpae_lightning.lightning_module import MODEL_SETTINGS
from mpae_lightning.models import LOSS_TERMS, LossTerm
from test_models import TINY

#: MPAE arguments that take built objects: Python only.
PYTHON_ONLY = {"vgg_features", "backbone_module"}


def test_every_mpae_setting_is_a_documented_cli_argument(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "MPAEModule"])
    help_text = capsys.readouterr().out
    settings = set(inspect.signature(MPAE).parameters) - PYTHON_ONLY
    assert settings == set(MODEL_SETTINGS)
    for name in settings:
        assert f"--model.{name} " in help_text, name
    for name in PYTHON_ONLY:
        assert f"--model.{name}" not in help_text
    # documented from MPAE's own docstring (written once)
    assert "weight of the pixel L1 inside L_r" in help_text and "LayerNorm epsilon" in help_text
    # the module's own settings only are in MPAEModule's signature
    own = set(inspect.signature(MPAEModule).parameters) - {"model_kwargs"}
    assert not own & settings


def test_settings_missing_from_the_old_module_are_set_from_the_cli(tiny_demo_args):
    cli = MPAECLI(args=[*tiny_demo_args, "--model.init_args.l1_weight=0.2", "--model.init_args.norm_eps=1e-6",
                        "--model.init_args.eval_scale_factor=4"], run=False)
    model = cli.model.model
    assert model.restoration_loss.l1_weight == 0.2
    assert model.eval_scale_factor == 4.0
    assert all(m.eps == 1e-6 for m in model.restorer.modules() if isinstance(m, nn.LayerNorm))
    assert cli.model.hparams.l1_weight == 0.2


def test_hyperparameters_hold_every_setting_and_unknown_ones_are_refused():
    module = MPAEModule(**TINY, lr=1e-3)
    assert set(MODEL_SETTINGS) <= set(module.hparams)
    assert module.hparams.num_parts == TINY["num_parts"] and module.hparams.l1_weight == 0.1
    assert module.hparams.lr == 1e-3
    with pytest.raises(TypeError, match="num_partz"):
        MPAEModule(**TINY, num_partz=3)


def test_checkpoint_of_the_previous_version_loads(tmp_path):
    """Flat hyper-parameters (24 of MPAE's, num_visualize, no newer settings) and the same state-dict keys."""
    old_keys = ("num_parts", "image_size", "feature_dim", "backbone", "backbone_weights", "backbone_kwargs",
                "descriptor_width", "descriptor_depth", "descriptor_heads", "encoder_width", "encoder_depth",
                "encoder_heads", "decoder_depth", "decoder_heads", "restore_patch", "mask_ratio", "mini_group",
                "arcface_s", "arcface_m", "presence_weight", "distribution_weight", "semantic_weight",
                "vgg_weights", "eval_map_size")
    trained = MPAEModule(**TINY)
    hparams = {k: TINY.get(k, MODEL_SETTINGS[k]) for k in old_keys}
    hparams.update(lr=5e-4, weight_decay=0.0, milestones=None, gamma=0.2, weights=None, num_visualize=8)
    state = trained.state_dict()
    # the top-level parameter groups of the previous version (the loss modules then held no state but VGG)
    assert {k.split(".")[1] for k in state} == {"backbone", "feature_proj", "descriptor_vit", "restorer",
                                                "restoration_loss"}
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": state, "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__}, path)
    loaded = MPAEModule.load_from_checkpoint(path)
    assert "num_visualize" not in loaded.hparams
    assert torch.equal(loaded.model.descriptor_vit.part_queries, trained.model.descriptor_vit.part_queries)
    assert torch.equal(loaded.model.backbone.vit.blocks[0].attn.qkv.weight,
                       trained.model.backbone.vit.blocks[0].attn.qkv.weight)


class _ConstantLoss(nn.Module):
    def forward(self, similarity: torch.Tensor) -> dict[str, torch.Tensor]:
        value = similarity.new_tensor(2.0)
        return {"constant": value, "constant_half": value / 2}


def test_a_loss_term_is_one_row_of_the_table(monkeypatch):
    torch.manual_seed(0)
    base = MPAE(**TINY)
    images = torch.randn(2, 3, TINY["image_size"], TINY["image_size"], generator=torch.Generator().manual_seed(1))
    noise = torch.rand(2, base.num_patches, generator=torch.Generator().manual_seed(2))
    before = base.compute_losses(images, noise=noise).losses
    assert set(LOSS_TERMS) <= set(before)
    # weights come from the table's setting names
    assert base.loss_weights == {"restoration": 1.0, "distribution": TINY["distribution_weight"],
                                 "presence": TINY["presence_weight"], "semantic": TINY["semantic_weight"]}

    monkeypatch.setitem(LOSS_TERMS, "constant", LossTerm(lambda a: _ConstantLoss(), ("similarity",), "semantic_weight"))
    extended = MPAE(**TINY)
    extended.load_state_dict(base.state_dict())
    assert isinstance(extended.constant_loss, _ConstantLoss)
    assert extended.loss_weights["constant"] == TINY["semantic_weight"]
    after = extended.compute_losses(images, noise=noise).losses
    assert after["constant"] == 2.0 and after["constant_half"] == 1.0
    # the total gains weight * term, the other terms are unchanged
    assert all(torch.equal(after[k], before[k]) for k in before if k != "total")
    expected = before["total"] + TINY["semantic_weight"] * 2.0
    assert torch.allclose(after["total"], expected, rtol=1e-6)


@pytest.mark.parametrize(("precision", "fused"), [("32-true", True), ("64-true", True), ("bf16-mixed", False)])
def test_adam_is_fused_where_lightning_allows_clipping_it(precision, fused):
    """Full precision: Adam's fused kernel (one pass instead of ~8 kernels per tensor). Mixed precision:
    the default, since Lightning refuses gradient clipping (the paper's 2.0) with fused optimizers there."""
    module = MPAEModule(**TINY)
    trainer = lightning.Trainer(precision=precision, accelerator="cpu", logger=False, enable_checkpointing=False,
                                gradient_clip_val=2.0)
    module.trainer = trainer
    optimizer = module.configure_optimizers()["optimizer"]
    assert bool(optimizer.defaults["fused"]) is fused
    if fused:  # and it does step (clipping included) like the default Adam
        for p in module.model.trainable_parameters():
            p.grad = torch.ones_like(p)
        trainer.precision_plugin.clip_gradients(optimizer, 2.0)
        reference = torch.optim.Adam([p.detach().clone().requires_grad_() for p in module.model.trainable_parameters()],
                                     lr=module.hparams.lr)
        for p, q in zip(module.model.trainable_parameters(), reference.param_groups[0]["params"]):
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()
        for p, q in zip(module.model.trainable_parameters(), reference.param_groups[0]["params"]):
            assert torch.allclose(p, q, rtol=1e-6, atol=1e-7)
    assert MPAEModule(**TINY).configure_optimizers()["optimizer"].defaults["fused"] is None  # no Trainer: the default
