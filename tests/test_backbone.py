"""models/backbone.py: the frozen timm ViT, its weight sources (download, local timm or Meta file) and autocast copies."""
from __future__ import annotations

import pytest
import torch

from model_utils import SMALL_VIT, offline  # noqa: F401 - fixture
from mpae_lightning.models import DEFAULT_BACKBONE, FrozenBackbone, WeightsUnavailableError

SMALL = "vit_small_patch14_reg4_dinov2"


@pytest.fixture(scope="module")
def backbone() -> FrozenBackbone:
    torch.manual_seed(0)
    return FrozenBackbone(SMALL, weights="random", model_kwargs=SMALL_VIT)


def test_backbone_is_frozen_and_returns_patch_tokens_only(backbone):
    backbone.train()  # stays in eval mode whatever its parent does
    assert all(not m.training for m in backbone.modules())
    assert all(not p.requires_grad for p in backbone.parameters())
    assert backbone.patch_size == 14 and backbone.embed_dim == 32 and backbone.num_prefix_tokens == 5  # class + 4 reg
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    tokens = backbone(images)
    assert tokens.shape == (2, 16, 32) and not tokens.requires_grad  # class and register tokens dropped
    assert torch.equal(tokens, backbone.vit.forward_features(images)[:, 5:])
    assert backbone(torch.randn(1, 3, 70, 42)).shape == (1, 15, 32)  # any grid: position embeddings resampled


def test_backbone_download_offline_names_the_local_file_option(offline):  # noqa: F811
    # default name, small kwargs so the (doomed) model is cheap to build before the download
    with pytest.raises(WeightsUnavailableError) as info:
        FrozenBackbone(DEFAULT_BACKBONE, weights="timm", model_kwargs=SMALL_VIT)
    message = str(info.value)
    assert "backbone_weights" in message
    assert "backbone_weights=/path/to/weights.pth" in message  # the local-file form of the setting
    assert DEFAULT_BACKBONE in message


def test_missing_local_backbone_file_is_named(tmp_path):
    missing = tmp_path / "nowhere" / "dinov2_vitb14_reg4_pretrain.pth"
    with pytest.raises(WeightsUnavailableError) as info:
        FrozenBackbone(SMALL, weights=str(missing), model_kwargs=SMALL_VIT)
    assert str(missing) in str(info.value) and "backbone_weights" in str(info.value)


def test_backbone_from_local_timm_file(tmp_path):
    import timm

    torch.manual_seed(0)
    source = timm.create_model(SMALL, pretrained=False, num_classes=0, **SMALL_VIT)
    path = tmp_path / "small_vit.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)  # a different random init, so equality proves the file was loaded
    backbone = FrozenBackbone(SMALL, weights=str(path), model_kwargs=SMALL_VIT)
    loaded = backbone.vit.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert all(not p.requires_grad for p in backbone.parameters())


def test_backbone_from_local_meta_dinov2_file(tmp_path):
    from mpae_lightning.models.backbone import dinov2_model_kwargs
    from reference_utils import reference_dir

    fixture = torch.load(reference_dir() / "dinov2_reference_A.pt", map_location="cpu", weights_only=True)
    assert "register_tokens" in fixture["state_dict"]  # Meta's key names, not timm's
    path = tmp_path / "dinov2_meta.pth"
    torch.save(fixture["state_dict"], path)
    backbone = FrozenBackbone(
        "vit_base_patch14_reg4_dinov2", weights=str(path), model_kwargs=dinov2_model_kwargs(fixture["config"])
    )
    images = fixture["inputs"]["224"] if "224" in fixture["inputs"] else fixture["inputs"][224]
    outputs = fixture["outputs"]["x_norm_patchtokens"]
    expected = outputs["224"] if "224" in outputs else outputs[224]
    tokens = backbone(images)
    assert tokens.shape == expected.shape
    assert float((tokens - expected).norm() / expected.norm()) < 1e-4


def test_backbone_under_autocast_uses_cached_half_weights_with_identical_tokens(backbone):
    """Autocast re-casts frozen (requires_grad=False) weights at every call; the cached copies give the
    same tokens bit for bit, are made once, and are remade when the weights change."""
    from mpae_lightning.models.frozen import autocast_weight_copies

    images = torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_weight_copies(backbone.vit, "cpu") is not None
        tokens = backbone(images)
        plain = backbone.vit.forward_features(images)[:, backbone.num_prefix_tokens :]
        first = autocast_weight_copies(backbone.vit, "cpu", prefix="vit.")
        assert autocast_weight_copies(backbone.vit, "cpu", prefix="vit.") is first  # cached
    assert torch.equal(tokens, plain)
    assert all(v.dtype == torch.bfloat16 for v in first.values()) and "vit.blocks.0.attn.qkv.weight" in first
    assert autocast_weight_copies(backbone.vit, "cpu") is None  # no autocast: the float32 weights as they are
    weight = backbone.vit.blocks[0].attn.qkv.weight
    saved = weight.detach().clone()
    try:
        with torch.no_grad():
            weight.mul_(2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            again = autocast_weight_copies(backbone.vit, "cpu", prefix="vit.")
            assert again is not first
            assert torch.equal(again["vit.blocks.0.attn.qkv.weight"], (saved * 2).bfloat16())
    finally:
        with torch.no_grad():
            weight.copy_(saved)
    assert not any("autocast" in k for k in backbone.state_dict())  # the copies stay out of the state dict
