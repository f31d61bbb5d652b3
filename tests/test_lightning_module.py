"""lightning_module.py: MPAEModule owns MPAE (model) and MPAELoss (loss); its settings, checkpoints,
optimiser, logging and offline behaviour."""
from __future__ import annotations

import inspect

import lightning
import pytest
import torch
from lightning.pytorch import Trainer
from torch import nn

from model_utils import TINY_LOSS, TINY_MODEL, TINY_MODULE, no_vgg_download, offline  # noqa: F401 - fixtures
from mpae_lightning import MPAE, MPAEModule
from mpae_lightning.data import SyntheticPartsDataModule
from mpae_lightning.lightning_module import FROZEN_PARTS, FROZEN_RECORD, LINKED_FROM_DATA
from mpae_lightning.losses import LOSS_TERMS, MPAELoss
from mpae_lightning.models import WeightsUnavailableError

#: Arguments that take built objects: Python only, not settings of the module or the CLI.
PYTHON_ONLY = {"vgg_features", "backbone_module"}
#: The module's own settings (optimiser, initial weights, checkpoints, compilation).
OWN_SETTINGS = {"lr", "weight_decay", "milestones", "gamma", "gradient_clip_val", "weights", "frozen_weights_in_checkpoint",
                "compile", "predict_precision", "input_antialias"}
#: A torchvision VGG source is only read on first use: modules that never compute the loss build fast and offline.
LAZY_VGG = {**TINY_MODULE, "vgg_weights": "torchvision"}
VGG_PREFIX = FROZEN_PARTS["vgg"][0]


def _settings(cls: type) -> dict[str, object]:
    return {n: p.default for n, p in inspect.signature(cls).parameters.items() if n not in PYTHON_ONLY}


def _trainer(tmp_path, **kwargs) -> Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, max_epochs=1)
    return Trainer(**{**options, **kwargs})


def _data(**kwargs) -> SyntheticPartsDataModule:
    options = dict(num_train=4, num_val=4, num_test=4, image_size=56, batch_size=2, mini_group=2, eval_batch_size=4,
                   num_workers=0)
    return SyntheticPartsDataModule(**{**options, **kwargs})


def _save(path, state: dict, hparams: dict, **extra) -> None:
    torch.save({"state_dict": state, "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__, **extra}, path)


# --------------------------------------------------------------------------- settings


def test_the_module_is_the_model_plus_its_objective():
    module = MPAEModule(**LAZY_VGG)
    assert type(module.model) is MPAE and type(module.loss) is MPAELoss
    assert {k.split(".")[0] for k in module.state_dict()} == {"model", "loss"}
    assert all(k.startswith(VGG_PREFIX) for k in module.state_dict() if k.startswith("loss."))
    assert any(k.startswith(VGG_PREFIX) for k in module.state_dict())
    assert not any("vgg" in n or "restoration" in n for n, _ in module.model.named_modules())


def test_every_model_and_loss_setting_is_a_module_setting_with_the_same_default():
    """The explicit constructor repeats MPAE's and MPAELoss's settings: every one, with the same default."""
    model, loss, module = _settings(MPAE), _settings(MPAELoss), _settings(MPAEModule)
    assert not set(model) & set(loss)
    assert set(module) == set(model) | set(loss) | OWN_SETTINGS
    for name, default in {**model, **loss}.items():
        assert module[name] == default, name
    assert set(LINKED_FROM_DATA) <= set(module)


def test_every_setting_reaches_the_model_and_the_loss():
    changed_model = dict(decoder_heads=2, eval_scale_factor=2.0, norm_eps=1e-6, descriptor_heads=4, encoder_heads=4)
    changed_loss = dict(l1_weight=0.3, arcface_s=11.0, arcface_m=0.25)
    module = MPAEModule(**{**LAZY_VGG, **changed_model, **changed_loss})
    m, loss = module.model, module.loss
    model_probes = {
        "num_parts": m.num_parts, "image_size": m.image_size, "feature_dim": m.feature_proj.out_channels,
        "backbone": m.backbone.name,
        "backbone_kwargs": {"embed_dim": m.backbone.embed_dim, "depth": len(m.backbone.vit.blocks),
                            "num_heads": m.backbone.vit.blocks[0].attn.num_heads},
        "descriptor_width": m.descriptor_vit.patch_embed.out_channels, "descriptor_depth": len(m.descriptor_vit.blocks),
        "descriptor_heads": m.descriptor_vit.blocks[0].attn.num_heads,
        "encoder_width": m.restorer.patch_embed.out_channels, "encoder_depth": len(m.restorer.encoder_blocks),
        "encoder_heads": m.restorer.encoder_blocks[0].attn.num_heads, "decoder_depth": len(m.restorer.decoder_blocks),
        "decoder_heads": m.restorer.decoder_blocks[0].attn.num_heads, "restore_patch": m.restorer.restore_patch,
        "mask_ratio": m.mask_ratio, "eval_scale_factor": m.eval_scale_factor, "norm_eps": m.restorer.encoder_norm.eps,
    }
    for name, value in model_probes.items():
        assert value == {**TINY_MODEL, **changed_model}[name], name
    assert all(n.eps == 1e-6 for n in m.restorer.modules() if isinstance(n, nn.LayerNorm))
    loss_probes = {
        "mini_group": loss.mini_group, "presence_weight": loss.presence_weight,
        "distribution_weight": loss.distribution_weight, "semantic_weight": loss.semantic_weight,
        "l1_weight": loss.restoration.l1_weight, "arcface_s": loss.semantic.s, "arcface_m": loss.semantic.m,
        "vgg_weights": loss.vgg.source,
    }
    for name, value in loss_probes.items():
        assert value == {**LAZY_VGG, **changed_loss}[name], name
    assert MPAEModule(**{**LAZY_VGG, "eval_map_size": 32}).model.eval_scale_factor == 8.0  # 4x4 grid -> 32


def test_every_setting_is_a_documented_cli_argument(capsys):
    from mpae_lightning.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--model.help", "MPAEModule"])
    help_text = capsys.readouterr().out
    settings = set(_settings(MPAE)) | set(_settings(MPAELoss)) | OWN_SETTINGS
    for name in settings:
        assert f"--model.{name} " in help_text, name
    for name in PYTHON_ONLY:
        assert f"--model.{name}" not in help_text
    # documented from the module's docstring
    assert "weight of the pixel L1 inside the restoration loss" in help_text and "LayerNorm epsilon" in help_text


def test_settings_are_set_from_the_cli(tiny_demo_args):
    from mpae_lightning.cli import MPAECLI

    cli = MPAECLI(args=[*tiny_demo_args, "--model.init_args.l1_weight=0.2", "--model.init_args.norm_eps=1e-6",
                        "--model.init_args.eval_scale_factor=4", "--model.init_args.semantic_weight=0.5"], run=False)
    module = cli.model
    assert module.loss.restoration.l1_weight == 0.2 and module.loss.semantic_weight == 0.5
    assert module.model.eval_scale_factor == 4.0
    assert all(m.eps == 1e-6 for m in module.model.restorer.modules() if isinstance(m, nn.LayerNorm))
    assert module.hparams.l1_weight == 0.2 and module.hparams.semantic_weight == 0.5
    # image_size and mini_group come from the data section
    assert module.hparams.image_size == cli.datamodule.image_size == 64
    assert module.loss.mini_group == cli.datamodule.mini_group


def test_hyperparameters_hold_every_setting_and_unknown_ones_are_refused():
    module = MPAEModule(**LAZY_VGG, lr=1e-3)
    assert set(_settings(MPAEModule)) == set(module.hparams)  # defaults included
    assert module.hparams.num_parts == TINY_MODULE["num_parts"] and module.hparams.l1_weight == 0.1
    assert module.hparams.lr == 1e-3
    with pytest.raises(TypeError, match="num_partz"):
        MPAEModule(**LAZY_VGG, num_partz=3)


def test_setup_refuses_data_that_disagrees_on_linked_settings(tmp_path):
    module = MPAEModule(**TINY_MODULE)
    with pytest.raises(ValueError, match=r"model.mini_group=2 but data.mini_group=4"):
        _trainer(tmp_path).fit(module, datamodule=_data(mini_group=4))
    assert module.global_step == 0
    # how images are resized too: a model for CelebA's squashed inputs must not train on antialiased ones
    module = MPAEModule(**TINY_MODULE, input_antialias=False)
    with pytest.raises(ValueError, match=r"model.input_antialias=False but data.input_antialias=True"):
        _trainer(tmp_path).fit(module, datamodule=_data())


# --------------------------------------------------------------------------- training and logging


def test_a_training_step_logs_every_term_of_the_table(tmp_path):
    torch.manual_seed(0)
    module = MPAEModule(**TINY_MODULE)
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=1, num_sanity_val_steps=0)
    before = module.model.descriptor_vit.part_queries.detach().clone()
    backbone_before = module.model.backbone.vit.blocks[0].attn.qkv.weight.detach().clone()
    trainer.fit(module, datamodule=_data())
    metrics = trainer.callback_metrics
    for term in LOSS_TERMS:
        assert f"train/{term.logged}" in metrics, term.logged
        assert f"val/{term.logged}" in metrics, term.logged
    assert {"train/total", "val/total", "train/presence_foreground", "val/keypoint_nmi"} <= set(metrics)
    assert torch.isfinite(metrics["train/total"])
    assert set(module.last_train_losses) >= {t.name for t in LOSS_TERMS} | {"total"}
    assert not torch.equal(module.model.descriptor_vit.part_queries, before)  # trained
    assert torch.equal(module.model.backbone.vit.blocks[0].attn.qkv.weight, backbone_before)  # frozen


def test_cub_segmentations_log_the_foreground_iou_as_pdiscoformer(tmp_path):
    """CUBDataModule(segmentations=...): test and validation log fg_iou / bg_iou next to the keypoint
    scores, equal to PDiscoFormer's eval_fg_bg.py on the patch-grid maps test_step returns."""
    import numpy as np
    from PIL import Image

    from mpae_lightning.cli import score_table
    from mpae_lightning.data import CUBDataModule
    from test_data_cub import _IMAGES, make_fake_cub
    from test_metrics import _pdiscoformer_fg_bg_iou

    root = make_fake_cub(tmp_path / "CUB_200_2011")
    rng = np.random.default_rng(0)
    for _, rel, _, _, w, h in _IMAGES:  # textured images, so the random model's parts vary over the image
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "images" / rel, "JPEG")
    data = CUBDataModule(root=str(root), image_size=56, batch_size=2, mini_group=2, eval_batch_size=1, num_workers=0,
                         segmentations=str(root / "segmentations"))
    torch.manual_seed(0)
    module = MPAEModule(**TINY_MODULE)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Keep(lightning.pytorch.Callback):
        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            seen.append((outputs["grid_probs"].clone(), batch["fg_mask"].clone()))

    scores = _trainer(tmp_path, callbacks=[Keep()]).test(module, datamodule=data, verbose=False)[0]
    assert {"test/keypoint_nmi", "test/fg_iou", "test/bg_iou"} <= scores.keys()
    assert not any(k.startswith("test/mask_") for k in scores)  # no part masks on CUB
    grids, masks = zip(*seen)
    assert len(grids) == 2 and grids[0].shape == (1, 4, 4, 4) and masks[0].shape == (1, 56, 56)  # 4x4 patch grid
    fg, bg = _pdiscoformer_fg_bg_iou(grids, masks, module.model.num_parts)
    assert abs(scores["test/fg_iou"] / 100 - fg) < 1e-5 and abs(scores["test/bg_iou"] / 100 - bg) < 1e-5
    assert 0.05 < fg < 0.95 and 0.05 < bg < 0.95  # neither all foreground nor all background
    table = score_table(scores)
    assert f"foreground IoU (object masks)  {scores['test/fg_iou']:8.2f}" in table
    assert f"background IoU (object masks)  {scores['test/bg_iou']:8.2f}" in table
    validated = _trainer(tmp_path).validate(module, datamodule=data, verbose=False)[0]
    assert {"val_on_test/keypoint_nmi", "val_on_test/fg_iou", "val_on_test/bg_iou"} <= validated.keys()


def test_flowers_segmentations_log_the_foreground_iou_as_pdiscoformer(tmp_path):
    """Flowers102DataModule(segmentations=...), foreground masks its only annotation: test and validation
    log fg_iou / bg_iou, equal to PDiscoFormer's eval_fg_bg.py on the patch-grid maps against its
    Flowers102Seg masks (re-typed in test_data_flowers)."""
    from mpae_lightning.data import Flowers102DataModule
    from test_data_flowers import _SPLITS, make_fake_flowers, pdiscoformer_fg_mask
    from test_metrics import _pdiscoformer_fg_bg_iou

    root = make_fake_flowers(tmp_path / "flowers102")
    data = Flowers102DataModule(root=str(root), image_size=56, batch_size=2, mini_group=2, eval_batch_size=2,
                                num_workers=0, segmentations=str(root))
    torch.manual_seed(0)
    module = MPAEModule(**TINY_MODULE)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Keep(lightning.pytorch.Callback):
        def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            seen.append((outputs["grid_probs"].clone(), batch["index"].clone()))

    scores = _trainer(tmp_path, callbacks=[Keep()]).test(module, datamodule=data, verbose=False)[0]
    assert set(scores) == {"test/fg_iou", "test/bg_iou"}  # no keypoints, no part masks
    grids, indices = zip(*seen)
    assert [g.shape[0] for g in grids] == [2, 2, 1] and grids[0].shape[1:] == (4, 4, 4)  # 5 test images, 4x4 grid
    masks = [torch.stack([pdiscoformer_fg_mask(root / "flowers-102" / "segmim" / f"segmim_{_SPLITS['tstid'][i]:05d}.jpg",
                                               56) for i in batch.tolist()]) for batch in indices]
    fg, bg = _pdiscoformer_fg_bg_iou(grids, masks, module.model.num_parts)
    assert abs(scores["test/fg_iou"] / 100 - fg) < 1e-5 and abs(scores["test/bg_iou"] / 100 - bg) < 1e-5
    assert 0.05 < fg < 0.95 and 0.05 < bg < 0.95  # neither all foreground nor all background
    validated = _trainer(tmp_path).validate(module, datamodule=data, verbose=False)[0]
    assert {"val_on_test/fg_iou", "val_on_test/bg_iou"} <= validated.keys()
    assert validated["val_on_test/fg_iou"] == pytest.approx(scores["test/fg_iou"])  # the same images, eval mode


def test_validation_masking_noise_is_fixed_by_the_sample_index():
    module = MPAEModule(**LAZY_VGG)
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = module.validation_outputs(images, torch.tensor([3, 7]))
        b = module.validation_outputs(images.flip(0), torch.tensor([7, 3]))
        c = module.validation_outputs(images, torch.tensor([4, 7]))
    assert torch.equal(a.masked, b.masked.flip(0))
    assert not torch.equal(a.masked[0], c.masked[0]) and torch.equal(a.masked[1], c.masked[1])


@pytest.mark.parametrize(("precision", "fused"), [("32-true", True), ("64-true", True), ("bf16-mixed", False)])
def test_adam_is_fused_where_lightning_allows_clipping_it(precision, fused):
    """Full precision: Adam's fused kernel (one pass instead of ~8 kernels per tensor). Mixed precision:
    the default, since Lightning refuses gradient clipping (the paper's 2.0) with fused optimizers there."""
    module = MPAEModule(**LAZY_VGG)
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
    assert MPAEModule(**LAZY_VGG).configure_optimizers()["optimizer"].defaults["fused"] is None  # no Trainer: the default


def test_optimiser_trains_the_model_only():
    module = MPAEModule(**LAZY_VGG)
    optimised = {id(p) for group in module.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.model.trainable_parameters()}
    assert not optimised & {id(p) for p in module.loss.parameters()}


def test_compile_regions_when_a_stage_starts():
    module = MPAEModule(**LAZY_VGG, compile=True)
    # compiled when a stage starts, not at construction
    assert module.model._compiled_fill is None and module.loss._compiled_map_terms is None
    module.configure_model()
    assert module.model._compiled_fill is not None and module.loss._compiled_map_terms is not None
    fill = module.model._compiled_fill
    module.configure_model()  # Lightning calls it for every stage: once is enough
    assert module.model._compiled_fill is fill
    assert not MPAEModule(**LAZY_VGG).hparams.compile


# --------------------------------------------------------------------------- checkpoints


def test_public_vgg_weights_are_never_saved_random_ones_are():
    public = MPAEModule(**LAZY_VGG)
    checkpoint = {"state_dict": public.state_dict()}
    public.on_save_checkpoint(checkpoint)
    assert not any(k.startswith(VGG_PREFIX) for k in checkpoint["state_dict"])
    assert checkpoint[FROZEN_RECORD] == {"vgg": {"vgg_weights": "torchvision"}}
    assert any(k.startswith("model.backbone.") for k in checkpoint["state_dict"])  # random backbone: kept

    random = MPAEModule(**TINY_MODULE)
    checkpoint = {"state_dict": random.state_dict()}
    random.on_save_checkpoint(checkpoint)
    assert any(k.startswith(VGG_PREFIX) for k in checkpoint["state_dict"])  # cannot be rebuilt: kept
    assert checkpoint[FROZEN_RECORD] == {}


def test_checkpoint_with_vgg_weights_makes_the_lazy_vgg_ready_without_download(no_vgg_download, tmp_path):  # noqa: F811
    """A checkpoint that carries VGG (random weights, as after training with them) loads offline, its VGG
    ready and identical; one without VGG waits for the first loss; a damaged VGG is an error."""
    torch.manual_seed(0)
    trained = MPAEModule(**TINY_MODULE)
    state = trained.state_dict()
    hparams = {**dict(trained.hparams), "vgg_weights": "torchvision"}
    _save(tmp_path / "with_vgg.ckpt", state, hparams)
    loaded = MPAEModule.load_from_checkpoint(tmp_path / "with_vgg.ckpt")
    assert loaded.hparams.vgg_weights == "torchvision" and loaded.loss.vgg.is_ready
    for key, value in state.items():
        assert torch.equal(loaded.state_dict()[key], value), key
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = loaded.loss(loaded.model.train()(images, noise=noise))["total"]
        expected = trained.loss(trained.model.train()(images, noise=noise))["total"]
    assert torch.equal(ours, expected)
    assert no_vgg_download == []

    # One saved without the frozen VGG loads as well; its VGG waits for the first loss.
    slim = {k: v for k, v in state.items() if not k.startswith(VGG_PREFIX)}
    _save(tmp_path / "slim.ckpt", slim, hparams, **{FROZEN_RECORD: {"vgg": {"vgg_weights": "torchvision"}}})
    bare = MPAEModule.load_from_checkpoint(tmp_path / "slim.ckpt")
    assert not bare.loss.vgg.is_ready
    assert torch.equal(bare.model.descriptor_vit.part_queries, trained.model.descriptor_vit.part_queries)
    assert no_vgg_download == []  # loading did not try to download
    with pytest.raises(WeightsUnavailableError, match="vgg_weights"):
        bare.loss.resolve()

    # A damaged VGG (a layer missing) is still an error that names the key.
    partial = {k: v for k, v in state.items() if k != f"{VGG_PREFIX}slices.0.0.weight"}
    _save(tmp_path / "partial.ckpt", partial, hparams)
    with pytest.raises(RuntimeError, match=r"loss\.restoration\.features\.slices\.0\.0\.weight"):
        MPAEModule.load_from_checkpoint(tmp_path / "partial.ckpt")


def test_checkpoint_of_the_previous_layout_loads(tmp_path):
    """Version 0.1.0's layout: flat hyper-parameters (24 of them, plus one no longer a setting) and the VGG
    inside the model (``model.restoration_loss.features.*``, with its ``ready`` flag)."""
    old_keys = ("num_parts", "image_size", "feature_dim", "backbone", "backbone_weights", "backbone_kwargs",
                "descriptor_width", "descriptor_depth", "descriptor_heads", "encoder_width", "encoder_depth",
                "encoder_heads", "decoder_depth", "decoder_heads", "restore_patch", "mask_ratio", "mini_group",
                "arcface_s", "arcface_m", "presence_weight", "distribution_weight", "semantic_weight",
                "vgg_weights", "eval_map_size")
    torch.manual_seed(0)
    trained = MPAEModule(**TINY_MODULE)
    defaults = _settings(MPAEModule)
    hparams = {k: TINY_MODULE.get(k, defaults[k]) for k in old_keys}
    hparams.update(lr=5e-4, weight_decay=0.0, milestones=None, gamma=0.2, weights=None, num_visualize=8)
    old_state = {}
    for key, value in trained.state_dict().items():
        if key.startswith(VGG_PREFIX):
            key = "model.restoration_loss.features." + key[len(VGG_PREFIX):]
        old_state[key] = value
    old_state["model.restoration_loss.features.ready"] = torch.tensor(True)
    # the top-level parameter groups of the previous version (the loss modules then held no state but VGG)
    assert {k.split(".")[1] for k in old_state} == {"backbone", "feature_proj", "descriptor_vit", "restorer",
                                                    "restoration_loss"}
    path = tmp_path / "old.ckpt"
    _save(path, old_state, hparams)
    loaded = MPAEModule.load_from_checkpoint(path)
    assert "num_visualize" not in loaded.hparams
    assert loaded.hparams.semantic_weight == TINY_MODULE["semantic_weight"] and loaded.loss.semantic_weight == 5.0
    assert torch.equal(loaded.model.descriptor_vit.part_queries, trained.model.descriptor_vit.part_queries)
    assert torch.equal(loaded.model.backbone.vit.blocks[0].attn.qkv.weight,
                       trained.model.backbone.vit.blocks[0].attn.qkv.weight)
    assert loaded.loss.vgg.is_ready
    assert torch.equal(loaded.loss.vgg.slices[0][0].weight, trained.loss.vgg.slices[0][0].weight)
    # ... and as initial weights of a new run
    fresh = MPAEModule(**LAZY_VGG, weights=str(path))
    assert torch.equal(fresh.model.descriptor_vit.part_queries, trained.model.descriptor_vit.part_queries)
    assert fresh.loss.vgg.is_ready and torch.equal(fresh.loss.vgg.slices[4][0].weight, trained.loss.vgg.slices[4][0].weight)


def _as_official_state_dict(model: MPAE) -> dict[str, torch.Tensor]:
    """``model``'s trainable weights under the authors' key names (inverse of the official loader)."""
    from mpae_lightning.models.official_checkpoint import official_to_mpae_key
    from reference_utils import reference_files

    fixture = torch.load(reference_files("mpae_reference_*.pt")[0], map_location="cpu", weights_only=True)
    own = model.state_dict()
    official = {}
    # The fixture supplies the authors' key vocabulary; block indices above its depth are made up the same way.
    names = set(fixture["state_dict"])
    for key in list(names):
        for depth_key in ("Transformer.transformer.resblocks.", "Decoder.blocks.", "Decoder.decoder_blocks."):
            if key.startswith(depth_key):
                names.discard(key)
                rest = key[len(depth_key):].split(".", 1)[1]
                names.add(f"{depth_key}0.{rest}")
    for key in names:
        ours = official_to_mpae_key(key)
        if ours in own:
            official[key] = own[ours].clone()
    return official


def test_module_tests_and_predicts_offline_but_fit_fails_fast(no_vgg_download, tmp_path):  # noqa: F811
    """MPAEModule(weights=<authors' .pth>) + test/predict offline; fit fails in setup with the one-line error."""
    torch.manual_seed(0)
    source = MPAE(**TINY_MODEL)
    official = _as_official_state_dict(source)
    path = tmp_path / "Official_K3.pth"
    torch.save(official, path)

    module = MPAEModule(**LAZY_VGG, weights=str(path))
    assert torch.equal(module.model.descriptor_vit.part_queries, source.descriptor_vit.part_queries)
    data = _data()
    trainer = _trainer(tmp_path)
    results = trainer.test(module, datamodule=data, verbose=False)
    assert "test/keypoint_nmi" in results[0]
    predictions = trainer.predict(module, datamodule=data)
    assert predictions[0]["labels"].shape == (4, 128, 128)
    assert no_vgg_download == []

    with pytest.raises(WeightsUnavailableError, match=r"vgg_weights=/path/to/vgg19.pth"):
        trainer.fit(module, datamodule=data)
    assert len(no_vgg_download) == 1
    assert module.global_step == 0  # failed in setup, before any batch


def test_predict_precision_applies_to_prediction_only(tmp_path):
    """predict_precision="bf16" runs predict_step's descriptor ViT in bf16; test and forward stay float32."""
    torch.manual_seed(0)
    module = MPAEModule(**LAZY_VGG, predict_precision="bf16")
    reference = MPAEModule(**LAZY_VGG)
    reference.load_state_dict(module.state_dict())
    seen: list[torch.dtype] = []
    trainer = _trainer(tmp_path)
    fc1 = module.model.descriptor_vit.blocks[0].mlp.fc1  # its first matrix product
    fc1.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    data = _data()
    scores = trainer.test(module, datamodule=data, verbose=False)[0]
    assert set(seen) == {torch.float32}, "test scores are always float32"
    assert scores == trainer.test(reference, datamodule=data, verbose=False)[0]
    seen.clear()
    fast = trainer.predict(module, datamodule=data)
    assert seen and set(seen) == {torch.bfloat16}
    exact = trainer.predict(reference, datamodule=data)
    assert fast[0]["labels"].shape == exact[0]["labels"].shape == (4, 128, 128)
    agreement = (fast[0]["labels"] == exact[0]["labels"]).float().mean()
    assert agreement >= 0.9  # deterministic on the CPU: fixed seed, weights and images
    seen.clear()
    module.eval()
    with torch.no_grad():
        module(torch.zeros(1, 3, 56, 56))
    assert seen == [torch.float32], "forward() is the float32 map"
    assert module.hparams.predict_precision == "bf16" and reference.predict_dtype is None
    with pytest.raises(ValueError, match="predict_precision must be one of '32', 'bf16', got 'fp8'"):
        MPAEModule(**LAZY_VGG, predict_precision="fp8")


# --------------------------------------------------------------------------- gradient clipping
def _grad_norm(module: nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))


class _GradNormAtStep(lightning.pytorch.Callback):
    """The gradient norm before clipping (``on_before_optimizer_step``) and as the step used it
    (the gradients stay until the next step's ``zero_grad``)."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.at_step: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(_grad_norm(pl_module))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.at_step.append(_grad_norm(pl_module))


@pytest.mark.parametrize("clip, trainer_clip", [(2.0, None), (None, None), (2.0, 0.5)],
                         ids=["module-default", "off", "trainer-wins"])
def test_a_plain_trainer_clips_the_gradient_norm_as_the_paper(tmp_path, clip, trainer_clip):
    """MPAEModule clips at 2.0 by default under a plain Trainer; Trainer(gradient_clip_val) takes precedence."""
    torch.manual_seed(0)
    module = MPAEModule(**{**TINY_MODULE, "semantic_weight": 500.0}, gradient_clip_val=clip, lr=1e-4)  # large gradients
    spy = _GradNormAtStep()
    _trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[spy], gradient_clip_val=trainer_clip).fit(
        module, _data())
    assert len(spy.before) == len(spy.at_step) == 2
    limit = trainer_clip or clip
    assert max(spy.before) > (limit or 2.0) * 1.5, "test needs gradients above the clipping threshold"
    for before, at_step in zip(spy.before, spy.at_step):
        if limit is None:
            assert at_step == pytest.approx(before, rel=1e-6)
        else:
            assert at_step == pytest.approx(min(before, limit), rel=1e-4)
