"""MPAE refuses input it would mis-read, with a message saying how to convert, and warns once on NaN/inf."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from model_utils import TINY_MODEL
from mpae_lightning import MPAE


@pytest.fixture(scope="module")
def model() -> MPAE:
    torch.manual_seed(0)
    return MPAE(**TINY_MODEL).eval()


def _images(model: MPAE, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(2, 3, model.image_size, model.image_size).to(dtype)


@pytest.mark.parametrize(
    "make, words",
    [
        (lambda m: _images(m).numpy(), ["torch.Tensor", "ndarray", "from_numpy"]),
        (lambda m: (_images(m).clamp(0, 1) * 255).to(torch.uint8), ["torch.uint8", "normalize", "/ 255"]),
        (lambda m: _images(m, torch.float64), ["torch.float64", "torch.float32", "images.to(torch.float32)"]),
        (lambda m: _images(m, torch.float16), ["torch.float16", "autocast"]),
    ],
    ids=["numpy", "uint8", "float64", "float16"],
)
def test_wrong_input_type_is_refused_with_a_conversion(model, make, words):
    with pytest.raises(TypeError) as err:
        model.predict_parts(make(model))
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_non_finite_input_warns_once(model):
    images = _images(model)
    images[0, 0, 3, 3] = float("nan")
    images[1, 2, 0, 0] = float("inf")
    with pytest.warns(UserWarning, match="2 NaN/inf values"):
        model.predict_parts(images)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.predict_parts(images)  # once per model


def test_float64_model_takes_float64_images():
    torch.manual_seed(0)
    model = MPAE(**TINY_MODEL).double().eval()
    probs = model.predict_parts(torch.randn(1, 3, model.image_size, model.image_size, dtype=torch.float64))
    assert probs.shape[:2] == (1, TINY_MODEL["num_parts"] + 1) and torch.isfinite(probs).all()
