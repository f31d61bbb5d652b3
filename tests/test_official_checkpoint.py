"""Loading the authors' released checkpoints (docs/method.md §5) into MPAE."""
from __future__ import annotations

import dataclasses
import socket

import pytest
import torch

from mpae_lightning import load_official_checkpoint
from mpae_lightning.models import MPAE, MPAEOutput, WeightsUnavailableError, load_official_state_dict, official_config
from mpae_lightning.models.backbone import dinov2_model_kwargs
from reference_utils import mpae_from_reference, reference_dir

# Sizes that official_config cannot read from the weights (head counts) for the reference fixture.
FIXTURE_KWARGS = dict(
    backbone=None, backbone_dim=768, patch_size=14, descriptor_heads=2, encoder_heads=2, decoder_heads=1
)


@pytest.fixture(scope="module")
def fixture() -> dict:
    return torch.load(reference_dir() / "mpae_reference_A.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def dinov2_fixture() -> dict:
    return torch.load(reference_dir() / "dinov2_reference_A.pt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def reference_model(fixture) -> MPAE:
    return mpae_from_reference(fixture)


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _prefixed(state_dict: dict) -> dict:
    return {f"module.{k}": v for k, v in state_dict.items()}


def _assert_same_model(ours: MPAE, expected: MPAE) -> None:
    a, b = ours.state_dict(), expected.state_dict()
    assert a.keys() == b.keys()
    for key in b:
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def _assert_same_outputs(ours: MPAE, expected: MPAE, fixture: dict) -> None:
    inputs = fixture["inputs"]
    args = dict(target=inputs["target"], noise=inputs["noise"], backbone_tokens=inputs["backbone_tokens"])
    with torch.no_grad():
        x = ours.train()(inputs["image"], **args)
        y = expected.train()(inputs["image"], **args)
    for field in dataclasses.fields(MPAEOutput):
        assert torch.equal(getattr(x, field.name), getattr(y, field.name)), field.name


# --------------------------------------------------------------------------- loading


def test_module_prefixed_state_dict_gives_the_reference_model(fixture, reference_model):
    state = _prefixed(fixture["state_dict"])
    assert all(k.startswith("module.") for k in state)
    model = load_official_checkpoint(state, **FIXTURE_KWARGS)
    assert isinstance(model, MPAE)
    assert model.num_parts == 4 and model.image_size == 112
    _assert_same_model(model, reference_model)
    _assert_same_outputs(model, reference_model, fixture)
    # values really come from the checkpoint
    assert torch.equal(model.feature_proj.weight, fixture["state_dict"]["compress_layer.weight"])
    qkv = fixture["state_dict"]["Transformer.transformer.resblocks.1.attn.in_proj_weight"]
    assert torch.equal(model.descriptor_vit.blocks[1].attn.in_proj_weight, qkv)


# Where docs/method.md §5 puts each official key, written independently of the loader's own tables.
_UNUSED_KEYS = {"Decoder.cls_token", "Decoder.mask_token", "ArcMarginProduct.weight"}


def _documented_location(model: MPAE, key: str) -> torch.Tensor:
    parts = key.split(".")
    d, r = model.descriptor_vit, model.restorer
    leaf = parts[-1]
    if key == "compress_layer.weight":
        return model.feature_proj.weight
    if parts[0] == "Transformer":
        top = {
            "conv1": d.patch_embed, "ln_pre": d.norm_pre, "ln_post": d.norm_post, "proj": d.head,
        }
        if key == "Transformer.class_embedding":
            return d.part_queries
        if key == "Transformer.pos_embed":
            return d.pos_embed
        if parts[1] in top:
            return getattr(top[parts[1]], leaf)
        assert parts[1:3] == ["transformer", "resblocks"], key
        block = d.blocks[int(parts[3])]
        sub = ".".join(parts[4:-1])
        if sub == "attn":  # in_proj_weight / in_proj_bias: fused q, k, v
            return getattr(block.attn, leaf)
        module = {
            "ln_1": block.norm1, "ln_2": block.norm2, "attn.out_proj": block.attn.out_proj,
            "mlp.c_fc": block.mlp.fc1, "mlp.c_proj": block.mlp.fc2,
        }[sub]
        return getattr(module, leaf)
    assert parts[0] == "Decoder", key
    if key == "Decoder.pos_embed":
        return r.pos_embed
    if key == "Decoder.decoder_pos_embed":
        return r.decoder_pos_embed
    if parts[1] in ("blocks", "decoder_blocks"):
        blocks = r.encoder_blocks if parts[1] == "blocks" else r.decoder_blocks
        module = blocks[int(parts[2])]
        for name in parts[3:-1]:
            module = getattr(module, name)  # timm naming on both sides: norm1, attn.qkv, attn.proj, mlp.fc1 ...
        return getattr(module, leaf)
    module = {
        "patch_embed": r.patch_embed, "norm": r.encoder_norm, "decoder_embed": r.encoder_proj,
        "decoder_norm": r.decoder_norm, "decoder_pred": r.decoder_pred,
    }[parts[1]]
    return getattr(module, leaf)


def test_every_official_key_lands_where_the_docs_say(fixture):
    """With every tensor replaced by distinct random values, each one must arrive at its documented location."""
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=generator) for k, v in fixture["state_dict"].items()}
    model = load_official_checkpoint(_prefixed(state), **FIXTURE_KWARGS)
    covered = set()
    for key, value in state.items():
        if key in _UNUSED_KEYS:
            continue
        target = _documented_location(model, key)
        assert torch.equal(target.detach().reshape(value.shape), value), key
        covered.add(id(target))
    own = list(model.parameters()) + [b for n, b in model.named_buffers() if n.startswith("restorer.")]
    assert {id(t) for t in own} == covered  # nothing left at its initial value


def test_unprefixed_state_dict_and_saved_pth_file(fixture, reference_model, tmp_path):
    plain = load_official_checkpoint(dict(fixture["state_dict"]), **FIXTURE_KWARGS)
    _assert_same_model(plain, reference_model)
    path = tmp_path / "CelebA_K16.pth"
    torch.save(_prefixed(fixture["state_dict"]), path)
    from_file = load_official_checkpoint(path, **FIXTURE_KWARGS)
    _assert_same_model(from_file, reference_model)
    from_str = load_official_checkpoint(str(path), **FIXTURE_KWARGS)
    _assert_same_model(from_str, reference_model)


def test_clip_style_layouts_are_accepted(fixture, reference_model):
    """CLIP keeps proj as a (W, C) matrix and the queries as (K+1, W); MAE tables may carry a class slot."""
    state = dict(fixture["state_dict"])
    state["Transformer.proj"] = state.pop("Transformer.proj.weight").t().contiguous()
    state["Transformer.class_embedding"] = state["Transformer.class_embedding"][0]
    for key in ("Decoder.pos_embed", "Decoder.decoder_pos_embed"):
        table = state[key]
        state[key] = torch.cat([torch.zeros_like(table[:, :1]), table], dim=1)
    model = load_official_checkpoint(state, **FIXTURE_KWARGS)
    _assert_same_model(model, reference_model)


def test_backbone_filled_from_backbone1_keys(fixture, dinov2_fixture, no_network):
    """A checkpoint carrying its DINOv2 in Meta's key names fills the backbone; nothing is downloaded."""
    dino_state = dinov2_fixture["state_dict"]
    embed_dim = dinov2_fixture["config"]["embed_dim"]
    state = dict(fixture["state_dict"])
    torch.manual_seed(0)
    compress = torch.randn(state["compress_layer.weight"].shape[0], embed_dim, 1, 1) * 0.1
    state["compress_layer.weight"] = compress  # F's input width must match this backbone
    state.update({f"backbone1.{k}": v for k, v in dino_state.items()})
    model = load_official_checkpoint(
        _prefixed(state),
        backbone_kwargs=dinov2_model_kwargs(dinov2_fixture["config"]),
        descriptor_heads=2,
        encoder_heads=2,
        decoder_heads=1,
    )
    assert model.backbone is not None and model.backbone.embed_dim == embed_dim
    assert torch.equal(model.feature_proj.weight, compress)
    # The backbone reproduces Meta's DINOv2 tokens from the fixture.
    inputs, outputs = dinov2_fixture["inputs"], dinov2_fixture["outputs"]["x_norm_patchtokens"]
    for size, images in inputs.items():
        tokens = model.backbone(images)
        expected = outputs[size]
        assert tokens.shape == expected.shape
        assert float((tokens - expected).norm() / expected.norm()) < 1e-4, size
    # The whole model runs on its own backbone.
    images = fixture["inputs"]["image"][:2]
    with torch.no_grad():
        probs = model.eval().predict_parts(images)
        direct = model.encode_parts(images).logits
        given = model.encode_parts(images, backbone_tokens=model.backbone(images)).logits
    assert probs.shape == (2, 5, 128, 128)  # default 128x128 evaluation map
    assert torch.equal(direct, given)


def test_backbone1_keys_that_do_not_fit_are_rejected(fixture, dinov2_fixture, no_network):
    state = dict(fixture["state_dict"])
    state["compress_layer.weight"] = torch.zeros(state["compress_layer.weight"].shape[0], 64, 1, 1)
    dino_state = dict(dinov2_fixture["state_dict"])
    del dino_state["norm.weight"]
    state.update({f"backbone1.{k}": v for k, v in dino_state.items()})
    with pytest.raises(ValueError, match="norm.weight"):
        load_official_checkpoint(
            state,
            backbone_kwargs=dinov2_model_kwargs(dinov2_fixture["config"]),
            descriptor_heads=2,
            encoder_heads=2,
            decoder_heads=1,
            )


def test_without_backbone1_keys_the_backbone_keeps_its_weights(fixture):
    torch.manual_seed(0)
    model = MPAE(
        **{**official_config(fixture["state_dict"]), "feature_dim": 64},
        backbone="vit_small_patch14_reg4_dinov2",
        backbone_weights="random",
        backbone_kwargs=dict(embed_dim=768, depth=1, num_heads=2),
        descriptor_heads=2,
        encoder_heads=2,
        decoder_heads=1,
    )
    before = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    load_official_state_dict(model, _prefixed(fixture["state_dict"]))
    after = model.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(model.feature_proj.weight, fixture["state_dict"]["compress_layer.weight"])


# --------------------------------------------------------------------------- official_config


def test_official_config_reads_the_fixture(fixture):
    expected = dict(
        num_parts=4,
        image_size=112,
        feature_dim=64,
        descriptor_width=64,
        descriptor_depth=2,
        encoder_width=64,
        encoder_depth=2,
        decoder_depth=2,
        restore_patch=8,
    )
    assert official_config(fixture["state_dict"]) == expected
    assert official_config(_prefixed(fixture["state_dict"])) == expected
    cfg = fixture["config"]  # and agrees with the fixture's own description
    assert expected["num_parts"] + 1 == cfg["num_parts"] and expected["image_size"] == cfg["image_size"]


def _synthetic_official_shapes(queries_2d: bool = False) -> dict[str, torch.Tensor]:
    """Just the shape-bearing keys of an official checkpoint with all-different sizes.

    K = 6 (7 queries), patch 16, grid 3x3 (image 48), C = 96, W = 48, E = 40,
    descriptor depth 3, encoder depth 1, decoder depth 4, restore patch 4.
    """
    z = torch.zeros
    sd = {
        "compress_layer.weight": z(96, 384, 1, 1),
        "Transformer.class_embedding": z(7, 48) if queries_2d else z(1, 7, 48),
        "Transformer.conv1.weight": z(48, 3, 16, 16),
        "Transformer.pos_embed": z(1, 7 + 9, 48),
        "Decoder.patch_embed.proj.weight": z(40, 3, 16, 16),
        "Decoder.decoder_pred.weight": z(4 * 4 * 3, 96),
    }
    for i in range(3):
        sd[f"Transformer.transformer.resblocks.{i}.ln_1.weight"] = z(48)
        sd[f"Transformer.transformer.resblocks.{i}.attn.in_proj_weight"] = z(144, 48)
    sd["Decoder.blocks.0.norm1.weight"] = z(40)
    sd["Decoder.blocks.0.attn.qkv.weight"] = z(120, 40)
    for i in range(4):
        sd[f"Decoder.decoder_blocks.{i}.norm1.weight"] = z(96)
    return sd


@pytest.mark.parametrize("queries_2d", [False, True])
def test_official_config_reads_sizes_from_shapes(queries_2d):
    sd = _synthetic_official_shapes(queries_2d)
    expected = dict(
        num_parts=6,
        image_size=48,
        feature_dim=96,
        descriptor_width=48,
        descriptor_depth=3,
        encoder_width=40,
        encoder_depth=1,
        decoder_depth=4,
        restore_patch=4,
    )
    assert official_config(sd) == expected
    assert official_config(_prefixed(sd)) == expected


# --------------------------------------------------------------------------- wrong checkpoints


def test_random_dict_is_rejected(reference_model):
    junk = {"encoder.weight": torch.zeros(3, 3), "head.bias": torch.zeros(3)}
    with pytest.raises(ValueError, match="not an official MPAE checkpoint"):
        load_official_checkpoint(junk, **FIXTURE_KWARGS)
    with pytest.raises(ValueError, match="not an official MPAE checkpoint"):
        load_official_state_dict(reference_model, junk)


def test_random_file_is_rejected(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, path)
    with pytest.raises(ValueError, match=r"resnet\.pth.*not an official MPAE checkpoint"):
        load_official_checkpoint(path, **FIXTURE_KWARGS)
    missing = tmp_path / "CUB_K16.pth"
    with pytest.raises(WeightsUnavailableError, match="CUB_K16.pth"):
        load_official_checkpoint(missing, **FIXTURE_KWARGS)


def test_checkpoint_for_another_k_is_rejected(fixture):
    # The fixture is K=4; a model for K=7 must refuse it and say why.
    with pytest.raises(ValueError) as info:
        load_official_checkpoint(fixture["state_dict"], **FIXTURE_KWARGS, num_parts=7)
    message = str(info.value)
    assert "num_parts" in message
    assert "descriptor_vit.part_queries" in message and "(1, 5, 64)" in message and "(1, 8, 64)" in message
    model = MPAE(**{**official_config(fixture["state_dict"]), "num_parts": 7}, **FIXTURE_KWARGS)
    with pytest.raises(ValueError, match="part_queries"):
        load_official_state_dict(model, fixture["state_dict"])


def test_checkpoint_for_another_width_is_rejected(fixture):
    with pytest.raises(ValueError, match="shape mismatches"):
        load_official_checkpoint(fixture["state_dict"], **FIXTURE_KWARGS, feature_dim=128)


def test_missing_and_unknown_keys_are_rejected(fixture):
    truncated = dict(fixture["state_dict"])
    del truncated["Decoder.decoder_pred.bias"]
    with pytest.raises(ValueError, match=r"missing.*restorer\.decoder_pred\.bias"):
        load_official_checkpoint(truncated, **FIXTURE_KWARGS)
    extra = dict(fixture["state_dict"])
    extra["Transformer.mystery.weight"] = torch.zeros(3)
    with pytest.raises(ValueError, match=r"Transformer\.mystery\.weight"):
        load_official_checkpoint(extra, **FIXTURE_KWARGS)
