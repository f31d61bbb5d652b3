"""MPAE model pieces on hand-made inputs, a tiny end-to-end model, and one full-size smoke run."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from mpae_lightning import MPAE
from mpae_lightning.models.pos_embed import sincos_pos_embed_2d
from mpae_lightning.models.restorer import random_masking_ids, unpatchify

TINY = dict(
    num_parts=3,
    image_size=56,  # 4x4 patch grid
    feature_dim=64,
    backbone="vit_small_patch14_reg4_dinov2",
    backbone_weights="random",
    backbone_kwargs=dict(embed_dim=32, depth=1, num_heads=2),
    descriptor_width=32,
    descriptor_depth=1,
    descriptor_heads=2,
    encoder_width=32,
    encoder_depth=1,
    encoder_heads=2,
    decoder_depth=1,
    restore_patch=4,
    mask_ratio=0.75,
    mini_group=2,
    vgg_weights="random",
    # distinct, non-default lambdas so a swapped weight shows in the total
    presence_weight=2.0,
    distribution_weight=3.0,
    semantic_weight=5.0,
)
LOSS_KEYS = {
    "restoration",
    "restoration_l1",
    "perceptual",
    "perceptual_terms",
    "total_variation",
    "entropy",
    "distribution",
    "presence_background",
    "presence_foreground",
    "presence",
    "semantic",
    "total",
}


@pytest.fixture(scope="module")
def tiny() -> MPAE:
    torch.manual_seed(0)
    return MPAE(**TINY)


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.randn(3, 3, 56, 56, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- random masking


def test_random_masking_keeps_lowest_noise_patches():
    noise = torch.tensor(
        [
            [0.50, 0.10, 0.90, 0.30, 0.70, 0.20, 0.80, 0.40, 0.60, 0.05],
            [0.00, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.01],
        ]
    )
    ids_keep, masked = random_masking_ids(noise, mask_ratio=0.7)  # int(10 * 0.3) = 3 kept
    assert ids_keep.tolist() == [[9, 1, 5], [0, 9, 8]]  # ascending noise order
    expected_masked = torch.ones(2, 10, dtype=torch.bool)
    expected_masked[0, [9, 1, 5]] = False
    expected_masked[1, [0, 9, 8]] = False
    assert torch.equal(masked, expected_masked)


@pytest.mark.parametrize("num_patches, ratio", [(256, 0.9), (64, 0.9), (16, 0.75), (1024, 0.9), (49, 0.5)])
def test_random_masking_keeps_int_of_l_times_one_minus_ratio(num_patches, ratio):
    noise = torch.rand(3, num_patches, generator=torch.Generator().manual_seed(num_patches))
    ids_keep, masked = random_masking_ids(noise, ratio)
    n_keep = int(num_patches * (1 - ratio))  # 256, 0.9 -> 25 (docs/method.md §2.6)
    assert ids_keep.shape == (3, n_keep)
    assert (~masked).sum(dim=1).tolist() == [n_keep] * 3
    # kept = exactly the n_keep smallest noise values of each row
    for row in range(3):
        assert set(ids_keep[row].tolist()) == set(noise[row].argsort()[:n_keep].tolist())
        assert noise[row, ~masked[row]].max() < noise[row, masked[row]].min()


def test_random_masking_same_noise_same_mask():
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(7))
    a = random_masking_ids(noise, 0.9)
    b = random_masking_ids(noise.clone(), 0.9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = random_masking_ids(torch.rand(4, 64, generator=torch.Generator().manual_seed(8)), 0.9)
    assert not torch.equal(a[1], c[1])


# --------------------------------------------------------------------------- unpatchify and position embeddings


def test_unpatchify_row_column_channel_layout():
    # grid h=2, w=3 (non-square), patch 2: token t's entry (r, c, ch) is at index (r*2 + c)*3 + ch.
    h, w, p = 2, 3, 2
    tokens = torch.zeros(2, h * w, p * p * 3)
    for n in range(2):
        for t in range(h * w):
            for r in range(p):
                for c in range(p):
                    for ch in range(3):
                        tokens[n, t, (r * p + c) * 3 + ch] = 10000 * n + 1000 * t + 100 * r + 10 * c + ch
    image = unpatchify(tokens, (h, w), p)
    assert image.shape == (2, 3, h * p, w * p)
    for n in range(2):
        for ch in range(3):
            for y in range(h * p):
                for x in range(w * p):
                    t = (y // p) * w + (x // p)  # row-major token order
                    expected = 10000 * n + 1000 * t + 100 * (y % p) + 10 * (x % p) + ch
                    assert image[n, ch, y, x].item() == expected, (n, ch, y, x)


def test_sincos_pos_embed_values():
    emb = sincos_pos_embed_2d(8, 2, 3)  # grid 2 rows x 3 columns, width 8
    assert emb.shape == (6, 8) and emb.dtype == torch.float32
    # Each half: [sin(pos * omega), cos(pos * omega)], omega = (1, 1/100); first half = column, second = row.
    assert emb[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]  # position 0: sin = 0, cos = 1
    s1, s2, c1, c2 = math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)
    assert emb[1].tolist() == pytest.approx([s1, s2, c1, c2, 0, 0, 1, 1], abs=1e-7)  # row 0, column 1
    assert emb[3].tolist() == pytest.approx([0, 0, 1, 1, s1, s2, c1, c2], abs=1e-7)  # row 1, column 0
    assert emb[5, :4].tolist() == pytest.approx([math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)], abs=1e-7)
    big = sincos_pos_embed_2d(256, 16, 16)
    assert big.shape == (256, 256)
    assert torch.equal(big[0, :64], torch.zeros(64)) and torch.equal(big[0, 64:128], torch.ones(64))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 2, 2)


def test_model_position_embeddings_are_sincos(tiny):
    grid = tiny.grid_size
    restorer = tiny.restorer
    assert torch.equal(restorer.pos_embed[0], sincos_pos_embed_2d(TINY["encoder_width"], *grid))
    assert torch.equal(restorer.decoder_pos_embed[0], sincos_pos_embed_2d(TINY["feature_dim"], *grid))
    k1 = TINY["num_parts"] + 1
    desc_pos = tiny.descriptor_vit.pos_embed[0].detach()
    assert torch.equal(desc_pos[:k1], torch.zeros(k1, TINY["descriptor_width"]))  # queries first, zeros
    assert torch.equal(desc_pos[k1:], sincos_pos_embed_2d(TINY["descriptor_width"], *grid))


# --------------------------------------------------------------------------- argument checks


def test_rejects_image_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match=r"image_size=225.*patch size 14"):
        MPAE(image_size=225, backbone=None, backbone_dim=16, patch_size=14)
    # with a backbone, the patch size is the backbone's
    with pytest.raises(ValueError, match=r"image_size=60.*14"):
        MPAE(**{**TINY, "image_size": 60})


def test_rejects_missing_backbone_settings():
    with pytest.raises(ValueError, match="backbone_dim and patch_size"):
        MPAE(backbone=None)


def test_rejects_wrong_image_size_at_forward(tiny):
    with pytest.raises(ValueError, match=r"56x56.*42, 42"):
        tiny.train().compute_losses(torch.randn(1, 3, 42, 42))
    with pytest.raises(ValueError, match=r"56x56.*70, 56"):
        tiny.eval().predict_parts(torch.randn(1, 3, 70, 56))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.predict_parts(torch.randn(1, 1, 56, 56))


def test_rejects_wrong_number_of_backbone_tokens(tiny, images):
    with pytest.raises(ValueError, match="16 backbone tokens"):
        tiny.encode_parts(images, backbone_tokens=torch.randn(3, 9, 32))


# --------------------------------------------------------------------------- the tiny end-to-end model


def test_frozen_parts_stay_in_eval_mode(tiny):
    tiny.train()
    assert tiny.training and tiny.descriptor_vit.training and tiny.restorer.training
    for frozen in (tiny.backbone, tiny.restoration_loss.features):
        assert all(not m.training for m in frozen.modules())
        assert all(not p.requires_grad for p in frozen.parameters())
    trainable = {id(p) for p in tiny.trainable_parameters()}
    assert not trainable & {id(p) for p in tiny.backbone.parameters()}
    assert not trainable & {id(p) for p in tiny.restoration_loss.parameters()}


def test_tiny_training_forward_and_backward(tiny, images):
    tiny.train().zero_grad(set_to_none=True)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(2))
    out = tiny(images, noise=noise)
    assert set(out.losses) == LOSS_KEYS
    for name, value in out.losses.items():
        assert torch.isfinite(value).all(), name
    losses = {k: v.detach() for k, v in out.losses.items()}
    assert losses["perceptual_terms"].shape == (5,)
    assert float(losses["distribution"]) == pytest.approx(float(losses["total_variation"] + losses["entropy"]), rel=1e-6)
    assert float(losses["presence"]) == pytest.approx(
        float(losses["presence_background"] + losses["presence_foreground"]), rel=1e-6
    )
    expected_total = losses["restoration"] + 3.0 * losses["distribution"] + 2.0 * losses["presence"] + 5.0 * losses["semantic"]
    assert out.total.item() == pytest.approx(expected_total.item(), rel=1e-6)

    # shapes of what the forward exposes
    assert out.descriptors.shape == (3, 4, 64)
    assert out.local_features.shape == (3, 64, 4, 4)
    assert out.similarity.shape == (3, 4, 4, 4)
    assert torch.allclose(out.similarity.sum(dim=1), torch.ones(3, 4, 4), atol=1e-5)
    assert out.filled_features.shape == (3, 64, 4, 4)
    assert out.restored.shape == out.target.shape == (3, 3, 16, 16)
    # masking follows the noise: int(16 * 0.25) = 4 kept, the lowest noise values
    assert torch.equal(out.masked, random_masking_ids(noise, 0.75)[1])
    assert (~out.masked).sum(dim=1).tolist() == [4, 4, 4]

    out.total.backward()
    for name, p in tiny.named_parameters():
        if name.startswith(("backbone.", "restoration_loss.")):
            assert p.grad is None, name
        else:
            assert p.grad is not None, f"no gradient for {name}"
            assert torch.isfinite(p.grad).all(), name
    assert tiny.feature_proj.weight.grad.abs().sum() > 0
    assert tiny.descriptor_vit.part_queries.grad.abs().sum() > 0
    tiny.zero_grad(set_to_none=True)


def test_tiny_forward_is_reproducible_with_explicit_noise(tiny, images):
    tiny.train()
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = tiny.compute_losses(images, noise=noise)
        b = tiny.compute_losses(images, noise=noise.clone())
    assert torch.equal(a.masked, b.masked) and torch.equal(a.restored, b.restored)
    assert float(a.total) == float(b.total)
    assert torch.equal(a.masked, random_masking_ids(noise, 0.75)[1])


def test_precomputed_backbone_tokens_match_running_the_backbone(tiny, images):
    tiny.eval()
    with torch.no_grad():
        tokens = tiny.backbone(images)
        assert tokens.shape == (3, 16, 32)  # class and register tokens dropped
        direct = tiny.encode_parts(images).logits
        given = tiny.encode_parts(images, backbone_tokens=tokens).logits
        assert torch.equal(direct, given)
        # ... and different tokens give different logits (the tokens are really used)
        other = tiny.encode_parts(images, backbone_tokens=tokens + 1).logits
    assert not torch.allclose(direct, other)


def test_tiny_inference_forward(tiny, images):
    tiny.eval()
    with torch.no_grad():
        probs = tiny(images)
        assert probs.shape == (3, 4, 128, 128)  # 4x4 grid upsampled to the 128 evaluation map
        assert torch.allclose(probs.sum(dim=1), torch.ones(3, 128, 128), atol=1e-5)
        assert (probs >= 0).all()
        small = tiny.predict_parts(images, scale_factor=2)
        assert small.shape == (3, 4, 8, 8)
        # at scale 1 the map is the training similarity map
        logits = tiny.encode_parts(images).logits
        grid = tiny.predict_parts(images, scale_factor=1)
        assert torch.allclose(grid, logits.softmax(dim=1), atol=1e-6)
        # otherwise: bilinear upsampling of the logits (align_corners=False), then the softmax
        upsampled = torch.nn.functional.interpolate(logits, size=(128, 128), mode="bilinear", align_corners=False)
        assert torch.allclose(probs, upsampled.softmax(dim=1), atol=1e-6)


# --------------------------------------------------------------------------- the one full-size run


def test_full_size_default_model_train_and_inference_forward():
    """The issue's smoke check: default MPAE (ViT-B/14 DINOv2 with registers, K=16, 224) on the CPU."""
    torch.manual_seed(0)
    model = MPAE(backbone_weights="random", vgg_weights="random")
    assert model.num_parts == 16 and model.grid_size == (16, 16) and model.patch_size == 14
    assert model.backbone.embed_dim == 768
    images = torch.randn(2, 3, 224, 224)
    model.train()
    assert not model.backbone.training and not model.restoration_loss.features.training
    with torch.no_grad():
        out = model(images)
    assert set(out.losses) == LOSS_KEYS
    assert torch.isfinite(out.total)
    l = out.losses
    expected = l["restoration"] + 0.5 * l["distribution"] + 1.0 * l["presence"] + 0.25 * l["semantic"]
    assert float(out.total) == pytest.approx(float(expected), rel=1e-6)
    assert out.restored.shape == (2, 3, 128, 128)
    assert out.similarity.shape == (2, 17, 16, 16)
    assert (~out.masked).sum(dim=1).tolist() == [25, 25]  # int(256 * 0.1)
    model.eval()
    with torch.no_grad():
        probs = model(images)
    assert probs.shape == (2, 17, 128, 128)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2, 128, 128), atol=1e-5)


# --------------------------------------------------------------------------- pretrained weights: offline and local files

SMALL_VIT = dict(embed_dim=32, depth=1, num_heads=2)


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No network and empty caches: every download attempt fails as it would on an offline machine."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("HF_HOME", "TORCH_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    try:  # huggingface_hub reads its cache folder at import time
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub_cache"))
        monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    except ImportError:
        pass
    try:  # huggingface_hub retries failed connections with 1+2+4+8+8 s of back-off; skip the waiting
        import time
        import types

        from huggingface_hub.utils import _http

        fast_time = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if not n.startswith("_")})
        fast_time.sleep = lambda seconds: None
        monkeypatch.setattr(_http, "time", fast_time)
    except (ImportError, AttributeError):
        pass
    return tmp_path


def test_backbone_download_offline_names_the_local_file_option(offline):
    from mpae_lightning.models import DEFAULT_BACKBONE, FrozenBackbone, WeightsUnavailableError

    # default name, small kwargs so the (doomed) model is cheap to build before the download
    with pytest.raises(WeightsUnavailableError) as info:
        FrozenBackbone(DEFAULT_BACKBONE, weights="timm", model_kwargs=SMALL_VIT)
    message = str(info.value)
    assert "backbone_weights" in message
    assert "backbone_weights=/path/to/weights.pth" in message  # the local-file form of the setting
    assert DEFAULT_BACKBONE in message


def test_mpae_offline_error_names_backbone_weights(offline):
    from mpae_lightning.models import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match=r"backbone_weights=/path"):
        MPAE(backbone_kwargs=SMALL_VIT, vgg_weights="random")


def test_vgg_download_offline_names_the_local_file_option(offline):
    from mpae_lightning.models import VGGFeatures, WeightsUnavailableError

    vgg = VGGFeatures(weights="torchvision")  # construction never downloads
    assert not vgg.is_ready and not bool(vgg.ready)
    with pytest.raises(WeightsUnavailableError) as info:
        vgg.resolve()
    message = str(info.value)
    assert "vgg_weights" in message
    assert "vgg_weights=/path/to/vgg19.pth" in message
    assert not list((offline / "torch_home").rglob("*.pth"))  # nothing was downloaded
    with pytest.raises(WeightsUnavailableError, match="vgg_weights=/path"):
        vgg(torch.zeros(1, 3, 16, 16))  # the first forward resolves too


def test_missing_local_files_are_named(tmp_path):
    from mpae_lightning.models import FrozenBackbone, VGGFeatures, WeightsUnavailableError

    missing = tmp_path / "nowhere" / "dinov2_vitb14_reg4_pretrain.pth"
    with pytest.raises(WeightsUnavailableError) as info:
        FrozenBackbone("vit_small_patch14_reg4_dinov2", weights=str(missing), model_kwargs=SMALL_VIT)
    assert str(missing) in str(info.value) and "backbone_weights" in str(info.value)
    missing_vgg = tmp_path / "vgg19-dcbb9e9d.pth"
    with pytest.raises(WeightsUnavailableError) as info:
        VGGFeatures(weights=str(missing_vgg)).resolve()
    assert str(missing_vgg) in str(info.value) and "vgg_weights" in str(info.value)


def test_backbone_from_local_timm_file(tmp_path):
    import timm

    from mpae_lightning.models import FrozenBackbone

    torch.manual_seed(0)
    source = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, **SMALL_VIT)
    path = tmp_path / "small_vit.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(1)  # a different random init, so equality proves the file was loaded
    backbone = FrozenBackbone("vit_small_patch14_reg4_dinov2", weights=str(path), model_kwargs=SMALL_VIT)
    loaded = backbone.vit.state_dict()
    assert loaded.keys() == source.state_dict().keys()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    assert all(not p.requires_grad for p in backbone.parameters())


def test_backbone_from_local_meta_dinov2_file(tmp_path):
    from mpae_lightning.models import FrozenBackbone
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


def _vgg19_features_state() -> dict[str, torch.Tensor]:
    """A random ``vgg19().features`` state dict, built without the (slow, 100M-parameter) classifier."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    return make_layers(cfgs["E"]).state_dict()


def test_vgg_from_local_files(tmp_path):
    from mpae_lightning.models import VGGFeatures

    features = _vgg19_features_state()
    # A full torchvision vgg19 state dict: features.* plus the classifier (stored as stride-0 tensors,
    # same keys and shapes as torchvision's file at a fraction of the size).
    full = {f"features.{k}": v for k, v in features.items()}
    for key, shape in {
        "classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,),
        "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
        "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,),
    }.items():
        full[key] = torch.zeros(1).expand(*shape)
    early = VGGFeatures(weights=str(tmp_path / "vgg19_full.pth"))  # the file is read on first use, not now
    torch.save(full, tmp_path / "vgg19_full.pth")
    torch.save(features, tmp_path / "vgg19_features.pth")
    for name in ("vgg19_full.pth", "vgg19_features.pth"):
        vgg = early if name == "vgg19_full.pth" else VGGFeatures(weights=str(tmp_path / name))
        vgg.resolve()
        assert vgg.is_ready and bool(vgg.ready)
        convs = [m for block in vgg.slices for m in block if isinstance(m, torch.nn.Conv2d)]
        assert len(convs) == 13  # conv1_1 .. conv5_1
        own = {}
        index = 0
        for block in vgg.slices:
            for layer in block:
                for pname, p in layer.named_parameters():
                    own[f"{index}.{pname}"] = p
                index += 1
        assert index == 30
        for key, value in own.items():
            assert torch.equal(value, features[key]), (name, key)
            if value.ndim == 4:  # loading copies into the channels-last weights and keeps their layout
                assert value.is_contiguous(memory_format=torch.channels_last), (name, key)
        assert not vgg.training and all(not p.requires_grad for p in vgg.parameters())


# --------------------------------------------------------------------------- dtypes


def test_float32_layernorm_keeps_float64_and_upcasts_half():
    """CLIP's float32 LayerNorm must not break (or downcast) a float64 model, and must still protect bf16."""
    from mpae_lightning.models.descriptor_vit import Float32LayerNorm

    torch.manual_seed(0)
    norm = Float32LayerNorm(16)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 5, 16, dtype=torch.float64) * 100 + 1000
    norm64 = Float32LayerNorm(16).double()
    norm64.load_state_dict(norm.state_dict())
    out = norm64(x)
    assert out.dtype == torch.float64
    expected = torch.nn.functional.layer_norm(x, (16,), norm.weight.double(), norm.bias.double(), 1e-5)
    assert torch.allclose(out, expected, rtol=1e-14, atol=1e-13)
    xb = x.to(torch.bfloat16)
    out_b = norm(xb)
    assert out_b.dtype == torch.bfloat16
    expected_b = torch.nn.functional.layer_norm(xb.float(), (16,), norm.weight, norm.bias, 1e-5).to(torch.bfloat16)
    assert torch.equal(out_b, expected_b)
    # A module cast to bf16 entirely still normalises in float32 (its weights are upcast, not the reverse).
    norm_b = Float32LayerNorm(16).bfloat16()
    norm_b.load_state_dict(norm.state_dict())
    expected_bb = torch.nn.functional.layer_norm(
        xb.float(), (16,), norm_b.weight.float(), norm_b.bias.float(), 1e-5
    ).to(torch.bfloat16)
    assert torch.equal(norm_b(xb), expected_bb)


def test_tiny_model_runs_in_float64(images):
    """The whole model (losses, gradients, eval map) runs in float64 when cast with .double()."""
    torch.manual_seed(0)
    model = MPAE(**TINY).double().train()
    out = model.compute_losses(images.double())
    for name, value in out.losses.items():
        assert value.dtype == torch.float64, name
    out.total.backward()
    assert all(p.grad is None or p.grad.dtype == torch.float64 for p in model.parameters())
    assert model.feature_proj.weight.grad is not None
    with torch.no_grad():
        assert model.eval().predict_parts(images.double()).dtype == torch.float64


def test_descriptor_attention_is_multihead_attention_with_a_fused_kernel():
    """Same keys as nn.MultiheadAttention (the authors' checkpoints) and the same function (float64: ~1e-16)."""
    from mpae_lightning.models.descriptor_vit import DescriptorAttention, DescriptorBlock

    torch.manual_seed(0)
    reference = torch.nn.MultiheadAttention(32, 4, batch_first=True).double()
    with torch.no_grad():
        reference.in_proj_bias.normal_()
        reference.out_proj.bias.normal_()
    ours = DescriptorAttention(32, 4).double()
    ours.load_state_dict(reference.state_dict())  # strict: identical key names and shapes
    x = torch.randn(3, 7, 32, dtype=torch.float64)
    expected, expected_weights = reference(x, x, x, need_weights=True)
    out, weights = ours(x, return_weights=True)
    assert torch.allclose(out, expected, rtol=0, atol=1e-13)
    assert torch.allclose(weights, expected_weights, rtol=0, atol=1e-13)
    assert ours(x)[1] is None  # no maps unless asked
    block = DescriptorBlock(32, 4).double()
    block.keep_attention = True
    block(x)
    assert block.attention_maps.shape == (3, 7, 7)
    with pytest.raises(ValueError, match="descriptor_width=30 is not divisible by descriptor_heads=4"):
        DescriptorAttention(30, 4)



# --------------------------------------------------------------------------- VGG resolved lazily (offline evaluation)


@pytest.fixture()
def no_vgg_download(offline, monkeypatch):
    """torchvision's weight download raises (and counts the attempts), on top of a machine without network."""
    import torchvision.models._api as tv_api

    attempts = []

    def refuse(url, *args, **kwargs):
        attempts.append(url)
        raise ConnectionError(f"download of {url} refused by the test")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    return attempts


def test_mpae_with_torchvision_vgg_builds_and_predicts_offline(no_vgg_download, images):
    from mpae_lightning.models import WeightsUnavailableError

    model = MPAE(**{**TINY, "vgg_weights": "torchvision"})
    with torch.no_grad():
        probs = model.eval().predict_parts(images)
    assert probs.shape[1] == TINY["num_parts"] + 1
    assert no_vgg_download == []  # neither construction nor evaluation tried to download
    with pytest.raises(WeightsUnavailableError, match=r"vgg_weights=/path/to/vgg19.pth"):
        model.train().compute_losses(images)
    assert len(no_vgg_download) == 1  # the loss asked once, and said what to do


def test_state_dict_with_vgg_weights_makes_lazy_vgg_ready_without_download(no_vgg_download, images):
    torch.manual_seed(0)
    trained = MPAE(**TINY)  # random VGG: ready
    state = trained.state_dict()
    assert bool(state["restoration_loss.features.ready"])
    fresh = MPAE(**{**TINY, "vgg_weights": "torchvision"})
    fresh.load_state_dict(state)  # strict: same keys
    vgg = fresh.restoration_loss.features
    assert vgg.is_ready
    for key, value in state.items():
        assert torch.equal(fresh.state_dict()[key], value), key
    noise = torch.rand(images.shape[0], fresh.num_patches, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = fresh.train().compute_losses(images, noise=noise).total
        expected = trained.train().compute_losses(images, noise=noise).total
    assert torch.equal(ours, expected)
    assert no_vgg_download == []

    # A checkpoint written before the flag existed carried the real VGG weights: ready, no download.
    legacy = {k: v for k, v in state.items() if k != "restoration_loss.features.ready"}
    older = MPAE(**{**TINY, "vgg_weights": "torchvision"})
    older.load_state_dict(legacy)
    assert older.restoration_loss.features.is_ready

    # A state dict saved before VGG was resolved holds placeholders: still resolved on first use.
    pending_state = MPAE(**{**TINY, "vgg_weights": "torchvision"}).state_dict()
    assert not bool(pending_state["restoration_loss.features.ready"])
    target = MPAE(**{**TINY, "vgg_weights": "torchvision"})
    target.load_state_dict(pending_state)
    assert not target.restoration_loss.features.is_ready
    from mpae_lightning.models import WeightsUnavailableError

    with pytest.raises(WeightsUnavailableError, match="vgg_weights"):
        target.resolve_vgg()

    # A state dict without any VGG key (saved without the frozen VGG) loads strictly; VGG stays as built.
    without_vgg = {k: v for k, v in state.items() if not k.startswith("restoration_loss.features.")}
    bare = MPAE(**{**TINY, "vgg_weights": "torchvision"})
    bare.load_state_dict(without_vgg)
    assert not bare.restoration_loss.features.is_ready
    assert torch.equal(bare.descriptor_vit.part_queries, trained.descriptor_vit.part_queries)
    partial = {k: v for k, v in state.items() if k != "restoration_loss.features.slices.0.0.weight"}
    with pytest.raises(RuntimeError, match=r"restoration_loss\.features\.slices\.0\.0\.weight"):
        MPAE(**{**TINY, "vgg_weights": "torchvision"}).load_state_dict(partial)  # a damaged VGG is still an error


def _tiny_module_kwargs() -> dict:
    keys = ("num_parts", "feature_dim", "backbone", "backbone_weights", "backbone_kwargs", "descriptor_width",
            "descriptor_depth", "descriptor_heads", "encoder_width", "encoder_depth", "encoder_heads",
            "decoder_depth", "restore_patch", "mask_ratio")
    return {k: TINY[k] for k in keys}


def test_module_tests_and_predicts_offline_but_fit_fails_fast(no_vgg_download, tmp_path):
    """MPAEModule(weights=<authors' .pth>) + test/predict offline; fit fails in setup with the one-line error."""
    from lightning.pytorch import Trainer

    from mpae_lightning import MPAEModule
    from mpae_lightning.data import SyntheticPartsDataModule
    from mpae_lightning.models import WeightsUnavailableError

    torch.manual_seed(0)
    source = MPAE(**TINY)
    official = _as_official_state_dict(source)
    path = tmp_path / "Official_K3.pth"
    torch.save(official, path)

    module = MPAEModule(**_tiny_module_kwargs(), image_size=56, mini_group=2, vgg_weights="torchvision",
                        weights=str(path))
    assert torch.equal(module.model.descriptor_vit.part_queries, source.descriptor_vit.part_queries)
    data = SyntheticPartsDataModule(num_train=4, num_val=4, num_test=4, image_size=56, batch_size=2, mini_group=2,
                                    eval_batch_size=4, num_workers=0)
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path, max_epochs=1)
    results = trainer.test(module, datamodule=data, verbose=False)
    assert "test/keypoint_nmi" in results[0]
    predictions = trainer.predict(module, datamodule=data)
    assert predictions[0]["labels"].shape == (4, 128, 128)
    assert no_vgg_download == []

    with pytest.raises(WeightsUnavailableError, match=r"vgg_weights=/path/to/vgg19.pth"):
        trainer.fit(module, datamodule=data)
    assert len(no_vgg_download) == 1
    assert module.global_step == 0  # failed in setup, before any batch

    # A Lightning checkpoint whose VGG is ready (as after training) loads offline and is ready.
    import lightning

    trained = MPAEModule(**_tiny_module_kwargs(), image_size=56, mini_group=2, vgg_weights="random")
    ckpt = tmp_path / "trained.ckpt"
    hparams = {**dict(trained.hparams), "vgg_weights": "torchvision"}
    torch.save({"state_dict": trained.state_dict(), "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__}, ckpt)
    loaded = MPAEModule.load_from_checkpoint(ckpt)
    assert loaded.hparams.vgg_weights == "torchvision" and loaded.model.restoration_loss.features.is_ready
    # One saved without the frozen VGG loads as well; its VGG waits for the first loss.
    slim = {k: v for k, v in trained.state_dict().items() if ".restoration_loss." not in k}
    torch.save({"state_dict": slim, "hyper_parameters": hparams,
                "pytorch-lightning_version": lightning.__version__}, tmp_path / "slim.ckpt")
    assert not MPAEModule.load_from_checkpoint(tmp_path / "slim.ckpt").model.restoration_loss.features.is_ready
    assert len(no_vgg_download) == 1  # loading did not try to download


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


# --------------------------------------------------------------------------- evaluation maps in float32


def test_evaluation_map_is_float32_under_bf16_autocast(tiny, images):
    """bf16-mixed evaluation: only the frozen backbone runs in bf16; the head and the map are float32."""
    model = tiny.eval()
    with torch.no_grad():
        tokens = model.backbone(images)
        reference = model.predict_parts(images, backbone_tokens=tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            same_tokens = model.predict_parts(images, backbone_tokens=tokens)
            bf16_backbone = model.predict_parts(images)
    assert reference.dtype == same_tokens.dtype == bf16_backbone.dtype == torch.float32
    # From the same backbone tokens, autocast changes nothing at all.
    assert torch.allclose(same_tokens, reference, rtol=0, atol=1e-6)
    assert torch.equal(same_tokens.argmax(dim=1), reference.argmax(dim=1))
    # With the backbone in bf16 the labels still agree almost everywhere.
    assert (bf16_backbone.argmax(dim=1) == reference.argmax(dim=1)).float().mean() >= 0.98


def test_training_logits_are_float32_under_bf16_autocast(tiny, images):
    model = tiny.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.compute_losses(images)
        probs = model.part_probabilities(out.logits)
    assert out.logits.dtype == out.local_features.dtype == out.similarity.dtype == torch.float32
    assert probs.dtype == torch.float32
    assert out.descriptors.dtype == torch.bfloat16  # the descriptor ViT itself follows autocast in training
    assert torch.isfinite(out.total)


# --------------------------------------------------------------------------- speed: layouts and compiled regions


def test_vgg_runs_channels_last_and_computes_the_nchw_taps():
    """Channels-last VGG (weights and activations) gives the same five taps as plain NCHW layers."""
    from mpae_lightning.models import VGGFeatures
    from mpae_lightning.models.vgg import VGG19_TAPS
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    plain = make_layers(cfgs["E"]).double().eval()
    vgg = VGGFeatures(weights="random").double()
    vgg._load_features_state(plain.state_dict())
    convs = [m for block in vgg.slices for m in block if isinstance(m, torch.nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    taps = vgg(x)
    expected, y = [], x
    for a, b in VGG19_TAPS:
        y = plain[a:b](y)
        expected.append(y)
    for tap, ref in zip(taps, expected):
        assert tap.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(tap, ref, rtol=1e-12, atol=1e-12)


def _compile_regions_of(model: MPAE):
    x = torch.randn(3, 3, 56, 56, dtype=torch.float64)
    enc = model.encode_parts(x)
    return {
        "part map terms": (model._part_map_terms, (enc.logits, enc.local_features, enc.descriptors)),
        "descriptor block": (model.descriptor_vit.blocks[0], (torch.randn(3, 20, 32, dtype=torch.float64),)),
        "encoder block": (model.restorer.encoder_blocks[0], (torch.randn(3, 4, 32, dtype=torch.float64),)),
        "decoder block": (model.restorer.decoder_blocks[0], (torch.randn(3, 16, 64, dtype=torch.float64),)),
        "backbone block": (model.backbone.vit.blocks[0], (torch.randn(3, 21, 32, dtype=torch.float64),)),
    }


def test_compiled_regions_have_no_graph_breaks():
    """What compile_regions compiles traces as one graph each (a break would split it and cost speed)."""
    torch.manual_seed(0)
    model = MPAE(**TINY).double().train()
    for name, (fn, args) in _compile_regions_of(model).items():
        explanation = torch._dynamo.explain(fn)(*args)
        assert explanation.graph_count == 1 and explanation.graph_break_count == 0, (name, explanation.break_reasons)
    # The frozen backbone's CPU float32 fast path (packed weights) stays out of traced code.
    model.float()
    with torch.no_grad():
        explanation = torch._dynamo.explain(model.backbone.vit.blocks[0])(torch.randn(3, 21, 32))
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


def test_compile_regions_keeps_the_function_and_the_state_dict():
    from mpae_lightning import MPAEModule

    torch.manual_seed(0)
    model = MPAE(**TINY).double().train()
    images = torch.randn(3, 3, 56, 56, dtype=torch.float64)
    noise = torch.rand(3, 16, dtype=torch.float64)
    reference = model.compute_losses(images, noise=noise)
    reference.total.backward()
    grads = [p.grad.clone() for p in model.trainable_parameters()]
    keys = list(model.state_dict())
    model.zero_grad()
    model.compile_regions(backend="eager")  # dynamo capture only: the traced graphs run as they are
    compiled_blocks = [b for b in model.modules() if getattr(b, "_compiled_call_impl", None) is not None]
    assert len(compiled_blocks) == 4 and model._compiled_map_terms is not None
    first = model._compiled_map_terms
    model.compile_regions(backend="eager")
    assert model._compiled_map_terms is first  # idempotent
    out = model.compute_losses(images, noise=noise)
    out.total.backward()
    assert list(model.state_dict()) == keys
    for name in LOSS_KEYS:
        assert torch.allclose(out.losses[name], reference.losses[name], rtol=1e-12, atol=0), name
    for p, g in zip(model.trainable_parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-10, atol=1e-14)

    module = MPAEModule(**TINY, compile=True)
    assert module.model._compiled_map_terms is None  # compiled when a stage starts, not at construction
    module.configure_model()
    assert module.model._compiled_map_terms is not None
    assert not MPAEModule(**TINY).hparams.compile


def test_frozen_modules_under_autocast_use_cached_half_weights_with_identical_outputs(tiny, images):
    """Autocast re-casts frozen (requires_grad=False) weights at every call; the cached copies give the
    same tokens and taps bit for bit, are made once, and are remade when the weights change."""
    from mpae_lightning.models.frozen import autocast_weight_copies

    backbone, vgg = tiny.backbone, tiny.restoration_loss.features
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_weight_copies(backbone.vit, "cpu") is not None
        tokens = backbone(images)
        plain = backbone.vit.forward_features(images)[:, backbone.num_prefix_tokens :]
        taps = vgg(images[:, :, :32, :32])
        x = images[:, :, :32, :32].contiguous(memory_format=torch.channels_last)
        plain_taps = []
        for block in vgg.slices:
            x = block(x)
            plain_taps.append(x)
        first = autocast_weight_copies(backbone.vit, "cpu", prefix="vit.")
        assert autocast_weight_copies(backbone.vit, "cpu", prefix="vit.") is first  # cached
    assert torch.equal(tokens, plain)
    assert all(torch.equal(a, b) for a, b in zip(taps, plain_taps))
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
    assert "_autocast_weight_copies" not in str(list(tiny.state_dict()))


# --------------------------------------------------------------------------- CPU speed-ups that keep every bit


def _unoptimized_copy(vit: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of a ViT with the plain torch/timm classes back (what optimize_frozen_vit swapped)."""
    from timm.layers import LayerScale

    from mpae_lightning.models.frozen import InplaceGELU, InplaceLayerScale, PackedFrozenLinear

    plain = copy.deepcopy(vit)
    originals = {PackedFrozenLinear: torch.nn.Linear, InplaceGELU: torch.nn.GELU, InplaceLayerScale: LayerScale}
    for layer in plain.modules():
        if type(layer) in originals:
            layer.__class__ = originals[type(layer)]
            layer.__dict__.pop("_mkl_packed", None)
    return plain


def test_frozen_backbone_cpu_speedups_give_identical_tokens(tiny, images):
    """Packed MKL GEMMs and in-place GELU/LayerScale change nothing: tokens equal bit for bit in float32
    (where they engage), under bf16 autocast and with gradients recorded (where they must not), and
    the state dict keeps its keys."""
    from mpae_lightning.models.frozen import InplaceGELU, InplaceLayerScale, PackedFrozenLinear

    backbone = tiny.backbone
    layers = list(backbone.vit.modules())
    assert sum(isinstance(m, PackedFrozenLinear) for m in layers) == 4  # qkv, proj, fc1, fc2 of the one block
    assert sum(isinstance(m, InplaceGELU) for m in layers) == 1
    assert sum(isinstance(m, InplaceLayerScale) for m in layers) == 2
    plain = _unoptimized_copy(backbone.vit)
    assert list(plain.state_dict()) == list(backbone.vit.state_dict())

    with torch.no_grad():
        expected = plain.forward_features(images)
        assert torch.equal(backbone(images), expected[:, backbone.num_prefix_tokens :])
    if torch._C.has_mkl:  # the packed path really ran, and kept its packing outside the state dict
        assert "_mkl_packed" in backbone.vit.blocks[0].mlp.fc1.__dict__
        assert not any("mkl" in k for k in tiny.state_dict())
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(backbone.vit.forward_features(images), plain.forward_features(images))
    x = images.clone().requires_grad_(True)  # gradients recorded: plain kernels, nothing overwritten
    assert torch.equal(backbone.vit.forward_features(x), plain.forward_features(x))
    double = _unoptimized_copy(backbone.vit).double()
    optimized64 = copy.deepcopy(backbone.vit).double()
    with torch.no_grad():
        assert torch.equal(optimized64.forward_features(images.double()), double.forward_features(images.double()))


def test_packed_frozen_linear_repacks_when_the_weight_changes():
    from mpae_lightning.models.frozen import PackedFrozenLinear

    torch.manual_seed(0)
    layer = PackedFrozenLinear.convert(torch.nn.Sequential(torch.nn.Linear(24, 40))).requires_grad_(False)[0]
    x = torch.randn(2, 5, 24)
    with torch.no_grad():
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        layer.weight.mul_(-3)  # e.g. load_state_dict copying new weights in
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert torch.equal(layer(x[:, :3]), F.linear(x[:, :3], layer.weight, layer.bias))  # any row count
        assert torch.equal(layer(x.transpose(0, 1)), F.linear(x.transpose(0, 1), layer.weight, layer.bias))
    PackedFrozenLinear.pack_cpu_weights = False
    try:
        layer.__dict__.pop("_mkl_packed", None)
        with torch.no_grad():
            layer(x)
        assert "_mkl_packed" not in layer.__dict__  # opted out: no packed copy made
    finally:
        PackedFrozenLinear.pack_cpu_weights = True


def test_descriptor_last_block_computes_only_the_query_rows():
    """The last block attends from the K+1 queries only; in float64 the descriptors and every gradient
    equal those of computing all rows and keeping the queries."""
    from mpae_lightning.models.descriptor_vit import DescriptorViT

    torch.manual_seed(0)
    vit = DescriptorViT(5, 24, (3, 3), 8, width=32, depth=2, num_heads=4).double()
    images = torch.randn(2, 3, 24, 24, dtype=torch.float64)

    def all_rows(images: torch.Tensor) -> torch.Tensor:
        x = vit.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([vit.part_queries.expand(x.shape[0], -1, -1), x], dim=1)
        x = vit.norm_pre(x + vit.pos_embed)
        for block in vit.blocks:
            x = block(x)
        assert x.shape[1] == 5 + 9
        return vit.head(vit.norm_post(x[:, :5]))

    expected = all_rows(images)
    expected_grads = torch.autograd.grad(expected.square().sum(), list(vit.parameters()))
    out = vit(images)
    grads = torch.autograd.grad(out.square().sum(), list(vit.parameters()))
    assert torch.allclose(out, expected, rtol=0, atol=1e-13)
    for g, e in zip(grads, expected_grads):
        assert torch.allclose(g, e, rtol=0, atol=1e-12)
    rows = vit.blocks[-1](torch.randn(2, 14, 32, dtype=torch.float64), num_queries=5)
    assert rows.shape == (2, 5, 32)


def test_vgg_packed_cpu_path_gives_identical_taps_and_input_gradient(monkeypatch):
    """CPU float32 without the Winograd layers: each convolution and its ReLU run as one oneDNN call on
    weights packed once; the taps and the gradient reaching the restored image equal the plain layers' bit
    for bit. The packed copies stay out of the state dict, copies and pickles, and are remade when the
    weights change."""
    import pickle

    from mpae_lightning.models import VGGFeatures
    from mpae_lightning.models.vgg import FrozenConvReLU, packed_conv_relu_applies

    monkeypatch.setattr(VGGFeatures, "winograd_cpu", False)
    torch.manual_seed(0)
    vgg = VGGFeatures(weights="random")
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    probes = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i)) for i, t in enumerate(vgg(x.detach()))]

    def taps_and_grad(pack: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        vgg.pack_cpu_weights = pack
        taps = vgg(x)
        return taps, torch.autograd.grad(sum((t * p).sum() for t, p in zip(taps, probes)), x)[0]

    if not packed_conv_relu_applies(x, vgg.slices):
        pytest.skip("this torch has no oneDNN")
    try:
        packed_taps, packed_grad = taps_and_grad(True)
        assert type(packed_taps[0].grad_fn).__name__ == f"{FrozenConvReLU.__name__}Backward"  # the packed path ran
        plain_taps, plain_grad = taps_and_grad(False)
    finally:
        vgg.pack_cpu_weights = True
    assert all(torch.equal(a, b) for a, b in zip(packed_taps, plain_taps))
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in packed_taps)
    assert torch.equal(packed_grad, plain_grad)
    assert "_packed_cpu_convs" in vgg.__dict__ and not any("packed" in k for k in vgg.state_dict())
    pickle.loads(pickle.dumps(copy.deepcopy(vgg)))  # opaque packed tensors are dropped, not copied
    first = vgg.slices[0][0]
    with torch.no_grad():
        first.weight.mul_(2)  # new weights (e.g. load_state_dict): packed again
        repacked = vgg(x)[0]
        vgg.pack_cpu_weights = False
        assert torch.equal(repacked, vgg(x)[0])
        vgg.pack_cpu_weights = True
    # Not for float64 (parity), autocast or trainable weights: the plain layers run there.
    assert not packed_conv_relu_applies(x.double(), vgg.slices)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not packed_conv_relu_applies(x, vgg.slices)
    first.weight.requires_grad_(True)
    assert not packed_conv_relu_applies(x, vgg.slices)
    first.weight.requires_grad_(False)


def test_vgg_wide_layers_run_as_winograd_convolutions_with_the_same_function():
    """CPU float32: the layers with >= 256 channels in and out run as Winograd convolutions. In float64 the
    packed layer (forward and input gradient) is the plain convolution to 1e-12; in float32 the taps stay
    within the float32 parity tolerance (1e-5) of float64 arithmetic."""
    from mpae_lightning.models import VGGFeatures
    from mpae_lightning.models.vgg import FrozenConvReLU, PackedConv, packed_conv_relu_applies

    torch.manual_seed(0)
    vgg = VGGFeatures(weights="random")
    x = torch.randn(2, 3, 128, 128)  # conv5_1 at 8x8: 32 output blocks, enough for Winograd
    if not packed_conv_relu_applies(x, vgg.slices):
        pytest.skip("this torch has no oneDNN")
    fast = vgg(x)
    convs = [layer for block in vgg.slices for layer in block if isinstance(layer, torch.nn.Conv2d)]
    packed = {id(conv): entry[1] for conv in convs for entry in [vgg.__dict__["_packed_cpu_convs"][id(conv)]]}
    wide = [min(c.in_channels, c.out_channels) >= VGGFeatures.winograd_min_channels for c in convs]
    assert [packed[id(c)].winograd for c in convs] == wide and 0 < sum(wide) < len(convs)
    vgg64 = copy.deepcopy(vgg).double()
    vgg64.pack_cpu_weights = False  # float64 never takes the packed paths; here the plain layers for sure
    exact = vgg64(x.double())
    for tap, ref in zip(fast, exact):
        assert ((tap.double() - ref).norm() / ref.norm()).item() < 1e-5

    # One wide layer in float64 through the same autograd function: the function and its input gradient.
    conv = next(c for c, w in zip(convs, wide) if w)
    conv64 = copy.deepcopy(conv).double()
    with torch.no_grad():
        conv64.bias.normal_()
    h = torch.randn(2, conv.in_channels, 6, 10, dtype=torch.float64, requires_grad=True)
    out = FrozenConvReLU.apply(h, conv64, PackedConv(conv64, tuple(h.shape), winograd=True))
    ref = F.relu(F.conv2d(h, conv64.weight, conv64.bias, padding=1))
    probe = torch.randn_like(ref)
    (grad,) = torch.autograd.grad((out * probe).sum(), h)
    (ref_grad,) = torch.autograd.grad((ref * probe).sum(), h)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12) and torch.allclose(grad, ref_grad, rtol=0, atol=1e-12)

    # Odd sizes take the direct packed kernel for that layer: a 74-px image reaches conv4_x at 9x9.
    odd = torch.randn(8, 3, 74, 74)
    mixed = vgg(odd)
    cache = vgg.__dict__["_packed_cpu_convs"]
    assert [cache[id(convs[i])][1].winograd for i in (5, 9, 12)] == [True, False, True]  # 18x18, 9x9, 4x4
    vgg.winograd_cpu = False
    for tap, ref in zip(mixed, vgg(odd)):
        assert ((tap - ref).norm() / ref.norm()).item() < 1e-5
    vgg.winograd_cpu = True
    # Too few 2x2 output blocks (one 32-px image: conv5_1 at 2x2) take the direct kernel too.
    vgg(torch.randn(1, 3, 32, 32))
    assert not any(entry[1].winograd for entry in cache.values())


def test_packed_paths_fall_back_to_plain_layers_when_torch_changes_its_private_ops(monkeypatch, tiny, images):
    """The fast paths call private torch operators; if a torch release breaks them, training goes on with
    the plain layers (same results) after one warning, instead of failing."""
    from mpae_lightning.models import VGGFeatures, frozen
    from mpae_lightning.models.frozen import PackedFrozenLinear

    def broken(*args, **kwargs):
        raise RuntimeError("operator changed")

    monkeypatch.setattr(PackedFrozenLinear, "pack_cpu_weights", True)
    monkeypatch.setattr(VGGFeatures, "pack_cpu_weights", True)
    monkeypatch.setattr(frozen, "_mkl_packed_gemm_available", lambda: True)
    monkeypatch.setattr(PackedFrozenLinear, "_packed_weight", broken)
    layer = PackedFrozenLinear.convert(torch.nn.Sequential(torch.nn.Linear(8, 4))).requires_grad_(False)[0]
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match="MKL packed GEMM is not usable.*operator changed.*plain layers"):
        with torch.no_grad():
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert PackedFrozenLinear.pack_cpu_weights is False

    vgg = VGGFeatures(weights="random")
    monkeypatch.setattr(VGGFeatures, "_packed_cpu_forward", broken)
    monkeypatch.setattr("mpae_lightning.models.vgg.packed_conv_relu_applies", lambda x, slices: True)
    with pytest.warns(UserWarning, match="oneDNN packed convolution is not usable"):
        taps = vgg(images[:, :, :32, :32])
    assert VGGFeatures.pack_cpu_weights is False and len(taps) == 5
