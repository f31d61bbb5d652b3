"""models/mpae.py: the MPAE model on a tiny configuration, and one full-size smoke run."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F

from model_utils import LOSS_KEYS, SMALL_VIT, TINY_MODEL, offline, random_vgg19_features, tiny_images, tiny_loss  # noqa: F401
from mpae_lightning import MPAE
from mpae_lightning.models import MPAEOutput, WeightsUnavailableError
from mpae_lightning.models.restorer import random_masking_ids


@pytest.fixture(scope="module")
def tiny() -> MPAE:
    torch.manual_seed(0)
    return MPAE(**TINY_MODEL)


@pytest.fixture()
def images() -> torch.Tensor:
    return tiny_images()


# --------------------------------------------------------------------------- argument checks


def test_rejects_image_size_not_divisible_by_patch():
    with pytest.raises(ValueError, match=r"image_size=225.*patch size 14"):
        MPAE(image_size=225, backbone=None, backbone_dim=16, patch_size=14)
    # with a backbone, the patch size is the backbone's
    with pytest.raises(ValueError, match=r"image_size=60.*14"):
        MPAE(**{**TINY_MODEL, "image_size": 60})


def test_rejects_missing_backbone_settings():
    with pytest.raises(ValueError, match="backbone_dim and patch_size"):
        MPAE(backbone=None)


@pytest.mark.parametrize(
    "setting, value, words",
    [("num_parts", 0, "num_parts"), ("mask_ratio", 1.0, "mask_ratio"), ("feature_dim", 0, "feature_dim"),
     ("encoder_depth", -1, "encoder_depth")],
)
def test_rejects_out_of_range_settings(setting, value, words):
    with pytest.raises(ValueError, match=words):
        MPAE(**{**TINY_MODEL, setting: value})


def test_rejects_wrong_image_size_at_forward(tiny):
    with pytest.raises(ValueError, match=r"56x56.*42, 42"):
        tiny.train()(torch.randn(1, 3, 42, 42))
    with pytest.raises(ValueError, match=r"56x56.*70, 56"):
        tiny.eval().predict_parts(torch.randn(1, 3, 70, 56))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        tiny.predict_parts(torch.randn(1, 1, 56, 56))


def test_rejects_wrong_number_of_backbone_tokens(tiny, images):
    with pytest.raises(ValueError, match="16 backbone tokens"):
        tiny.encode_parts(images, backbone_tokens=torch.randn(3, 9, 32))


def test_mpae_offline_error_names_backbone_weights(offline):  # noqa: F811
    with pytest.raises(WeightsUnavailableError, match=r"backbone_weights=/path"):
        MPAE(backbone_kwargs=SMALL_VIT)


# --------------------------------------------------------------------------- the model and nothing else


def test_model_holds_no_training_objective(tiny):
    """The loss and its VGG-19 live in MPAELoss: the model has no VGG module, parameter or setting."""
    names = [n for n, _ in tiny.named_modules()] + [n for n, _ in tiny.named_parameters()]
    names += [n for n, _ in tiny.named_buffers()] + list(tiny.state_dict())
    banned = ("vgg", "restoration", "features.slices", "loss")
    assert not [n for n in names if any(b in n.lower() for b in banned)]
    assert {k.split(".")[0] for k in tiny.state_dict()} == {"backbone", "feature_proj", "descriptor_vit", "restorer"}
    from mpae_lightning.losses import VGGFeatures

    assert not any(isinstance(m, (VGGFeatures, torch.nn.MaxPool2d)) for m in tiny.modules())
    settings = set(inspect.signature(MPAE).parameters)
    for moved in ("mini_group", "arcface_s", "arcface_m", "presence_weight", "distribution_weight",
                  "semantic_weight", "l1_weight", "vgg_weights", "vgg_features"):
        assert moved not in settings, moved
    for gone in ("compute_losses", "resolve_vgg", "mini_group", "loss_weights", "restoration_loss"):
        assert not hasattr(tiny, gone), gone


def test_frozen_backbone_stays_in_eval_mode_and_out_of_training(tiny):
    tiny.train()
    assert tiny.training and tiny.descriptor_vit.training and tiny.restorer.training
    assert all(not m.training for m in tiny.backbone.modules())
    assert all(not p.requires_grad for p in tiny.backbone.parameters())
    trainable = {id(p) for p in tiny.trainable_parameters()}
    assert not trainable & {id(p) for p in tiny.backbone.parameters()}
    assert trainable == {id(p) for n, p in tiny.named_parameters() if not n.startswith("backbone.")}


def test_forward_returns_the_same_output_in_train_and_eval_mode(tiny, images):
    """One forward for training, validation and pictures: the mode changes neither the type nor the values."""
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trained = tiny.train()(images, noise=noise)
        evaluated = tiny.eval()(images, noise=noise)
    assert type(trained) is type(evaluated) is MPAEOutput
    for field in dataclasses.fields(MPAEOutput):
        a, b = getattr(trained, field.name), getattr(evaluated, field.name)
        assert isinstance(a, torch.Tensor), field.name
        assert torch.equal(a, b), field.name


def test_tiny_forward_shapes_masking_and_part_map(tiny, images):
    tiny.train()
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(2))
    out = tiny(images, noise=noise)
    assert out.logits.shape == (3, 4, 4, 4)
    assert out.descriptors.shape == (3, 4, 64)
    assert out.local_features.shape == (3, 64, 4, 4)
    assert out.similarity.shape == (3, 4, 4, 4)
    assert torch.allclose(out.similarity.sum(dim=1), torch.ones(3, 4, 4), atol=1e-5)
    assert out.filled_features.shape == (3, 64, 4, 4)
    assert out.restored.shape == out.target.shape == (3, 3, 16, 16)
    assert tiny.restored_size == (16, 16)
    # P = softmax_k <D_k, F>, R = sum_k P_k D_k
    logits = torch.einsum("bkc,bchw->bkhw", out.descriptors, out.local_features)
    assert torch.allclose(out.logits, logits, atol=1e-5)
    similarity, filled = MPAE.fill_parts(out.logits, out.descriptors)
    assert torch.equal(out.similarity, similarity) and torch.equal(out.filled_features, filled)
    assert torch.allclose(filled, torch.einsum("bkhw,bkc->bchw", out.logits.softmax(dim=1), out.descriptors), atol=1e-6)
    # the default target: the images resized to the restored size
    assert torch.equal(out.target, F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False))
    # masking follows the noise: int(16 * 0.25) = 4 kept, the lowest noise values
    assert torch.equal(out.masked, random_masking_ids(noise, 0.75)[1])
    assert (~out.masked).sum(dim=1).tolist() == [4, 4, 4]
    # an explicit target is passed through untouched
    target = torch.randn(3, 3, 16, 16)
    assert tiny(images, target=target, noise=noise).target is target


def test_tiny_forward_is_reproducible_with_explicit_noise(tiny, images):
    tiny.train()
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        a = tiny(images, noise=noise)
        b = tiny(images, noise=noise.clone())
        c = tiny(images, noise=torch.rand(3, 16, generator=torch.Generator().manual_seed(5)))
    assert torch.equal(a.masked, b.masked) and torch.equal(a.restored, b.restored)
    assert torch.equal(a.masked, random_masking_ids(noise, 0.75)[1])
    assert not torch.equal(a.masked, c.masked) and not torch.equal(a.restored, c.restored)
    assert torch.equal(a.similarity, c.similarity)  # the part map does not depend on the masking


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


def test_tiny_inference_map(tiny, images):
    tiny.eval()
    with torch.no_grad():
        probs = tiny.predict_parts(images)
        assert probs.shape == (3, 4, 128, 128)  # 4x4 grid upsampled to the 128 evaluation map
        assert torch.allclose(probs.sum(dim=1), torch.ones(3, 128, 128), atol=1e-5)
        assert (probs >= 0).all()
        small = tiny.predict_parts(images, scale_factor=2)
        assert small.shape == (3, 4, 8, 8)
        # at scale 1 the map is the training similarity map
        logits = tiny.encode_parts(images).logits
        grid = tiny.predict_parts(images, scale_factor=1)
        assert torch.allclose(grid, logits.softmax(dim=1), atol=1e-6)
        assert torch.allclose(grid, tiny(images).similarity, atol=1e-6)
        # otherwise: bilinear upsampling of the logits (align_corners=False), then the softmax
        upsampled = F.interpolate(logits, size=(128, 128), mode="bilinear", align_corners=False)
        assert torch.allclose(probs, upsampled.softmax(dim=1), atol=1e-6)
        assert torch.equal(tiny.part_probabilities(logits), probs)


# --------------------------------------------------------------------------- dtypes


def test_tiny_model_runs_in_float64(images):
    """The whole model (forward, losses, gradients, eval map) runs in float64 when cast with .double()."""
    torch.manual_seed(0)
    model = MPAE(**TINY_MODEL).double().train()
    out = model(images.double())
    for field in dataclasses.fields(MPAEOutput):
        value = getattr(out, field.name)
        if value.is_floating_point():
            assert value.dtype == torch.float64, field.name
    losses = tiny_loss().double()(out)
    for name, value in losses.items():
        assert value.dtype == torch.float64, name
    losses["total"].backward()
    assert all(p.grad is None or p.grad.dtype == torch.float64 for p in model.parameters())
    assert model.feature_proj.weight.grad is not None
    with torch.no_grad():
        assert model.eval().predict_parts(images.double()).dtype == torch.float64


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


def _float32_map_as_before(model: MPAE, images: torch.Tensor) -> torch.Tensor:
    """The evaluation map exactly as predict_parts computed it before the dtype option existed."""
    tokens = model.backbone(images)
    descriptors = model.descriptor_vit(images)
    local = (tokens @ model.feature_proj.weight.flatten(1).t()).transpose(1, 2).unflatten(2, model.grid_size)
    return model.part_probabilities(torch.einsum("bkc,bchw->bkhw", descriptors, local))


def test_predict_parts_dtype_option_is_opt_in_and_runs_in_bf16(tiny, images):
    """float32 stays the default bit for bit; dtype=bf16 runs the ViTs, F and the logits in bf16."""
    model = tiny.eval()
    seen: dict[str, torch.dtype] = {}
    # The first matrix product of each ViT (their final LayerNorms return float32 under CPU autocast).
    hooks = [model.descriptor_vit.blocks[0].mlp.fc1.register_forward_hook(
                 lambda m, a, out: seen.__setitem__("descriptors", out.dtype)),
             model.backbone.vit.blocks[0].mlp.fc1.register_forward_hook(
                 lambda m, a, out: seen.__setitem__("backbone", out.dtype))]
    try:
        with torch.no_grad():
            before = _float32_map_as_before(model, images)
            default = model.predict_parts(images)
            assert seen == {"descriptors": torch.float32, "backbone": torch.float32}
            assert torch.equal(default, before)
            assert torch.equal(model.predict_parts(images, dtype=torch.float32), before)
            fast = model.predict_parts(images, dtype=torch.bfloat16)
            assert seen == {"descriptors": torch.bfloat16, "backbone": torch.bfloat16}
            logits = model.encode_parts(images, dtype=torch.bfloat16).logits
    finally:
        for hook in hooks:
            hook.remove()
    assert logits.dtype == torch.bfloat16
    assert fast.dtype == torch.float32 and fast.shape == default.shape == (3, 4, 128, 128)
    assert torch.allclose(fast.sum(dim=1), torch.ones(3, 128, 128), atol=1e-5)
    assert not torch.equal(fast, default)  # really another computation ...
    # ... that labels almost every pixel alike (deterministic on the CPU: fixed weights and inputs)
    assert (fast.argmax(dim=1) == default.argmax(dim=1)).float().mean() >= 0.9
    with pytest.raises(ValueError, match="dtype must be"):
        model.predict_parts(images, dtype=torch.int8)


def test_training_logits_are_float32_under_bf16_autocast(tiny, images):
    model = tiny.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
        probs = model.part_probabilities(out.logits)
        total = tiny_loss()(out)["total"]
    assert out.logits.dtype == out.local_features.dtype == out.similarity.dtype == torch.float32
    assert probs.dtype == torch.float32
    assert out.descriptors.dtype == torch.bfloat16  # the descriptor ViT itself follows autocast in training
    assert torch.isfinite(total)


# --------------------------------------------------------------------------- compiled regions


def test_compiled_regions_have_no_graph_breaks():
    """What compile_regions compiles traces as one graph each (a break would split it and cost speed)."""
    torch.manual_seed(0)
    model = MPAE(**TINY_MODEL).double().train()
    enc = model.encode_parts(tiny_images(dtype=torch.float64))
    regions = {
        "part map": (MPAE.fill_parts, (enc.logits, enc.descriptors)),
        "descriptor block": (model.descriptor_vit.blocks[0], (torch.randn(3, 20, 32, dtype=torch.float64),)),
        "encoder block": (model.restorer.encoder_blocks[0], (torch.randn(3, 4, 32, dtype=torch.float64),)),
        "decoder block": (model.restorer.decoder_blocks[0], (torch.randn(3, 16, 64, dtype=torch.float64),)),
        "backbone block": (model.backbone.vit.blocks[0], (torch.randn(3, 21, 32, dtype=torch.float64),)),
    }
    for name, (fn, args) in regions.items():
        torch.compiler.reset()
        # fullgraph=True raises at the first graph break; "eager" only captures (no code generation).
        out = torch.compile(fn, backend="eager", fullgraph=True)(*args)
        expected = fn(*args)
        for a, b in zip(out if isinstance(out, tuple) else (out,), expected if isinstance(expected, tuple) else (expected,)):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-12), name
    # The frozen backbone in float32 (its inference dtype) traces as one graph too.
    block = model.float().backbone.vit.blocks[0]
    with torch.no_grad():
        torch.compile(block, backend="eager", fullgraph=True)(torch.randn(3, 21, 32))


def test_compile_regions_keeps_the_function_and_the_state_dict():
    torch.manual_seed(0)
    model = MPAE(**TINY_MODEL).double().train()
    loss = tiny_loss().double()
    images = tiny_images(dtype=torch.float64)
    noise = torch.rand(3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    reference = model(images, noise=noise)
    reference_losses = loss(reference)
    reference_losses["total"].backward()
    grads = [p.grad.clone() for p in model.trainable_parameters()]
    keys = list(model.state_dict())
    model.zero_grad()
    model.compile_regions(backend="eager")  # dynamo capture only: the traced graphs run as they are
    compiled_blocks = [b for b in model.modules() if getattr(b, "_compiled_call_impl", None) is not None]
    assert len(compiled_blocks) == 4  # backbone, descriptor, encoder and decoder blocks (depth 1 each)
    first = model._compiled_fill
    assert first is not None
    model.compile_regions(backend="eager")
    assert model._compiled_fill is first  # idempotent
    out = model(images, noise=noise)
    losses = loss(out)
    losses["total"].backward()
    assert list(model.state_dict()) == keys
    for field in dataclasses.fields(MPAEOutput):
        assert torch.allclose(getattr(out, field.name).double(), getattr(reference, field.name).double(),
                              rtol=1e-12, atol=0), field.name
    for name in LOSS_KEYS:
        assert torch.allclose(losses[name], reference_losses[name], rtol=1e-12, atol=0), name
    for p, g in zip(model.trainable_parameters(), grads):
        assert torch.allclose(p.grad, g, rtol=1e-10, atol=1e-14)


# --------------------------------------------------------------------------- the one full-size run


def test_full_size_default_model_train_and_inference_forward():
    """The issue's smoke check: default MPAE (ViT-B/14 DINOv2 with registers, K=16, 224) on the CPU,
    with the paper's objective L = L_r + 0.5 L_d + 1 L_p + 0.25 L_s."""
    from mpae_lightning.losses import MPAELoss

    torch.manual_seed(0)
    model = MPAE(backbone_weights="random")
    assert model.num_parts == 16 and model.grid_size == (16, 16) and model.patch_size == 14
    assert model.backbone.embed_dim == 768
    images = torch.randn(2, 3, 224, 224)
    model.train()
    assert not model.backbone.training
    with torch.no_grad():
        out = model(images)
        losses = MPAELoss(vgg_features=random_vgg19_features())(out)  # default weights
    assert set(losses) == LOSS_KEYS
    assert torch.isfinite(losses["total"])
    expected = losses["restoration"] + 0.5 * losses["distribution"] + 1.0 * losses["presence"] + 0.25 * losses["semantic"]
    assert float(losses["total"]) == pytest.approx(float(expected), rel=1e-6)
    assert out.restored.shape == (2, 3, 128, 128)
    assert out.similarity.shape == (2, 17, 16, 16)
    assert (~out.masked).sum(dim=1).tolist() == [25, 25]  # int(256 * 0.1)
    model.eval()
    with torch.no_grad():
        probs = model.predict_parts(images)
    assert probs.shape == (2, 17, 128, 128)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2, 128, 128), atol=1e-5)
