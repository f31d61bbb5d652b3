"""models/descriptor_vit.py: the CLIP-style descriptor ViT, its attention and its float32 LayerNorm."""
from __future__ import annotations

import pytest
import torch

from mpae_lightning.models.descriptor_vit import DescriptorAttention, DescriptorBlock, DescriptorViT, Float32LayerNorm


def test_float32_layernorm_keeps_float64_and_upcasts_half():
    """CLIP's float32 LayerNorm must not break (or downcast) a float64 model, and must still protect bf16."""
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


def test_descriptor_attention_is_multihead_attention_with_a_fused_kernel():
    """Same keys as nn.MultiheadAttention (the authors' checkpoints) and the same function (float64: ~1e-16)."""
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


def test_descriptor_last_block_computes_only_the_query_rows():
    """The last block attends from the K+1 queries only; in float64 the descriptors and every gradient
    equal those of computing all rows and keeping the queries."""
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


def test_descriptor_vit_refuses_images_of_another_grid():
    vit = DescriptorViT(5, 24, (3, 3), 8, width=32, depth=1, num_heads=4)
    assert vit(torch.randn(1, 3, 24, 24)).shape == (1, 5, 24)  # (B, K+1, C)
    with pytest.raises(ValueError, match=r"3x3 patch grid.*\(32, 32\)"):
        vit(torch.randn(1, 3, 32, 32))
