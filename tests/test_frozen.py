"""The frozen backbone on public PyTorch and timm only: timm's own modules, timm's own numbers."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

from mpae_lightning.models.backbone import FrozenBackbone

SRC = Path(__file__).resolve().parents[1] / "src"

#: Private PyTorch entry points the package must not use (they change between releases without notice),
#: and class swaps of live modules.
PRIVATE = re.compile(r"torch\._C\b|torch\.ops\.(mkl|mkldnn|aten)\b|torch\.utils\._|_foreach_utils|__class__ *=[^=]")

TINY_VIT = dict(embed_dim=32, depth=2, num_heads=2)


@pytest.fixture(scope="module")
def backbone() -> FrozenBackbone:
    torch.manual_seed(0)
    return FrozenBackbone("vit_small_patch14_reg4_dinov2", weights="random", model_kwargs=TINY_VIT)


def test_package_source_uses_public_pytorch_only():
    """No private operators or modules and no ``__class__`` swaps anywhere in the package."""
    hits = [
        f"{path.relative_to(SRC)}:{number}: {line.strip()}"
        for path in sorted(SRC.rglob("*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if PRIVATE.search(line)
    ]
    assert not hits, "private PyTorch use:\n" + "\n".join(hits)


def test_the_pattern_catches_what_it_forbids():
    for line in ("torch.ops.mkl._mkl_linear(x)", "torch._C.has_mkl", "torch.ops.aten.gelu_(x)",
                 "from torch.utils._foreach_utils import f", "layer.__class__ = Packed"):
        assert PRIVATE.search(line), line
    for line in ("if type(a).__class__ == b:", "torch.compile(model)", "torch.utils.data.DataLoader"):
        assert not PRIVATE.search(line), line


def test_frozen_vit_is_made_of_timm_and_torch_modules_only(backbone):
    """No module of the frozen ViT is a class of this package (nothing swapped or wrapped)."""
    classes = {type(m) for m in backbone.vit.modules()}
    foreign = {c for c in classes if not c.__module__.startswith(("torch.", "timm."))}
    assert not foreign, foreign
    assert sum(isinstance(m, nn.Linear) for m in backbone.vit.modules()) == 8  # 4 per block
    assert not any(p.requires_grad for p in backbone.parameters())


def test_frozen_backbone_tokens_are_timms_forward_features_bit_for_bit(backbone):
    """The same tokens as an untouched timm ViT with the same weights, in float32 and float64, and
    with gradients recorded on the input; the state dict keeps timm's keys."""
    reference = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0,
                                  dynamic_img_size=True, **TINY_VIT).eval()
    reference.load_state_dict(backbone.vit.state_dict())
    assert list(reference.state_dict()) == list(backbone.vit.state_dict())
    images = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(1))
    prefix = backbone.num_prefix_tokens
    with torch.no_grad():
        expected = reference.forward_features(images)[:, prefix:]
    tokens = backbone(images)
    assert tokens.shape == (2, 16, 32) and torch.equal(tokens, expected)
    x = images.clone().requires_grad_(True)
    assert torch.equal(backbone.vit.forward_features(x), reference.forward_features(x))
    double = FrozenBackbone("vit_small_patch14_reg4_dinov2", weights="random", model_kwargs=TINY_VIT).double()
    double.vit.load_state_dict(backbone.vit.state_dict())
    with torch.no_grad():
        assert torch.equal(double(images.double()), reference.double().forward_features(images.double())[:, prefix:])
