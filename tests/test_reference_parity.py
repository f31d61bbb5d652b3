"""Parity with the authors' implementation and Meta's DINOv2 on every fixture in MPAE_REFERENCE_DIR."""
from __future__ import annotations

import pytest
import torch

from mpae_lightning.models import FrozenBackbone
from mpae_lightning.models.official_checkpoint import official_to_mpae_key
from mpae_lightning.models.backbone import dinov2_model_kwargs
from reference_utils import mpae_from_reference, reference_dir, reference_files, relative_error

TENSOR_TOL = 1e-4
SCALAR_TOL = 1e-4


def _fixtures(pattern: str) -> list:
    # A missing folder must fail, not skip: collect a param that raises at run time.
    try:
        files = reference_files(pattern)
    except FileNotFoundError as err:
        return [pytest.param(err, id="missing-fixtures")]
    return [pytest.param(path, id=path.stem) for path in files]


def _load(path):
    if isinstance(path, Exception):
        raise path
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_scalar(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    ours, ref = float(ours.detach()), float(ref)
    assert abs(ours - ref) <= SCALAR_TOL * max(1.0, abs(ref)), f"{name}: ours {ours} vs reference {ref}"


def test_reference_dir_exists():
    assert reference_dir().is_dir(), f"MPAE_REFERENCE_DIR={reference_dir()} missing"


@pytest.mark.parametrize("path", _fixtures("mpae_reference_*.pt"))
def test_mpae_matches_reference(path):
    fixture = _load(path)
    inputs, expected = fixture["inputs"], fixture["outputs"]
    model = mpae_from_reference(fixture).train()
    out = model.compute_losses(
        inputs["image"], target=inputs["target"], noise=inputs["noise"], backbone_tokens=inputs["backbone_tokens"]
    )
    for name in ("descriptors", "local_features", "similarity", "filled_features", "restored"):
        ours = getattr(out, name)
        assert ours.shape == expected[name].shape, name
        assert relative_error(ours, expected[name]) <= TENSOR_TOL, f"{name}: {relative_error(ours, expected[name])}"
    for name, ref in expected["losses"].items():
        if ref.ndim == 0:
            _assert_scalar(name, out.losses[name], ref)
        else:
            assert relative_error(out.losses[name], ref) <= TENSOR_TOL, name

    out.total.backward()
    params = dict(model.named_parameters())
    for official_name, ref_grad in expected["grads"].items():
        ours_name = official_to_mpae_key(official_name)
        grad = params[ours_name].grad
        assert grad is not None, f"no gradient for {official_name} ({ours_name})"
        err = relative_error(grad.reshape(ref_grad.shape), ref_grad)
        assert err <= TENSOR_TOL, f"grad {official_name}: {err}"

    model.eval()
    with torch.no_grad():
        eval_map = model.predict_parts(inputs["image"], backbone_tokens=inputs["backbone_tokens"])
    assert eval_map.shape == expected["eval_similarity"].shape
    assert relative_error(eval_map, expected["eval_similarity"]) <= TENSOR_TOL


@pytest.mark.parametrize("path", _fixtures("mpae_reference_*.pt"))
def test_default_target_and_inference_forward(path):
    """Without an explicit target the model builds the same one; eval-mode forward gives the eval map."""
    fixture = _load(path)
    inputs = fixture["inputs"]
    model = mpae_from_reference(fixture)
    out = model.train().compute_losses(inputs["image"], noise=inputs["noise"], backbone_tokens=inputs["backbone_tokens"])
    assert relative_error(out.target, inputs["target"]) <= TENSOR_TOL
    _assert_scalar("total", out.total, fixture["outputs"]["losses"]["total"])
    with torch.no_grad():
        probs = model.eval()(inputs["image"], backbone_tokens=inputs["backbone_tokens"])
    assert relative_error(probs, fixture["outputs"]["eval_similarity"]) <= TENSOR_TOL


@pytest.mark.parametrize("path", _fixtures("dinov2_reference_*.pt"))
def test_dinov2_backbone_matches_reference(path):
    fixture = _load(path)
    backbone = FrozenBackbone(
        "vit_base_patch14_reg4_dinov2", weights="random", model_kwargs=dinov2_model_kwargs(fixture["config"])
    )
    backbone.load_meta_dinov2_state_dict(fixture["state_dict"])
    assert fixture["inputs"], "fixture has no inputs"
    for size, images in fixture["inputs"].items():
        tokens = backbone(images)
        ref = fixture["outputs"]["x_norm_patchtokens"][size]
        assert tokens.shape == ref.shape, size
        assert relative_error(tokens, ref) <= TENSOR_TOL, f"size {size}: {relative_error(tokens, ref)}"
