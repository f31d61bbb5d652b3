"""Winograd F(2x2, 3x3) convolution: the same function as ``conv2d(padding=1)``."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mpae_lightning.losses.winograd import winograd_conv3x3, winograd_weight


@pytest.mark.parametrize("shape, c_out", [((2, 5, 6, 8), 7), ((1, 16, 2, 2), 3), ((3, 4, 12, 4), 16)])
@pytest.mark.parametrize("bias, relu", [(False, False), (True, True)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_equals_the_direct_convolution_in_float64(shape, c_out, bias, relu, channels_last):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, shape[1], 3, 3, dtype=torch.float64)
    b = torch.randn(c_out, dtype=torch.float64) if bias else None
    out = winograd_conv3x3(x, winograd_weight(weight), b, relu=relu)
    ref = F.conv2d(x, weight, b, padding=1)
    ref = F.relu(ref) if relu else ref
    assert out.shape == ref.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)


def test_large_batches_run_in_chunks_with_the_same_function(monkeypatch):
    """The transformed input is 4x the input; past ``CHUNK_BYTES`` the batch is split, remainder included."""
    from mpae_lightning.losses import winograd

    torch.manual_seed(0)
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    weight = torch.randn(8, 4, 3, 3, dtype=torch.float64)
    bias = torch.randn(8, dtype=torch.float64)
    whole = winograd_conv3x3(x, winograd_weight(weight), bias, relu=True)
    calls = []
    chunk = winograd._winograd_chunk
    monkeypatch.setattr(winograd, "_winograd_chunk", lambda x, *a: calls.append(len(x)) or chunk(x, *a))
    monkeypatch.setattr(winograd, "CHUNK_BYTES", 2 * 4 * 6 * 6 * 8 * 8)  # two images' V at C = 8
    chunked = winograd_conv3x3(x, winograd_weight(weight), bias, relu=True)
    assert calls == [2, 2, 1]
    assert torch.allclose(chunked, whole, rtol=0, atol=1e-13)  # MKL may block other tile counts differently
    assert torch.allclose(chunked, F.relu(F.conv2d(x, weight, bias, padding=1)), rtol=0, atol=1e-12)


def test_float32_is_as_close_to_exact_arithmetic_as_the_parity_tolerance():
    """VGG-sized layer in float32: relative error against float64 well inside the parity tolerance 1e-5
    (measured 5e-7; a wrong transform gives errors of order 1)."""
    torch.manual_seed(0)
    x = torch.randn(2, 256, 16, 16)
    weight = torch.randn(256, 256, 3, 3) * (2 / 2304) ** 0.5
    out = winograd_conv3x3(x, winograd_weight(weight))
    ref = F.conv2d(x.double(), weight.double(), padding=1)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 2e-6


def test_weight_transform_is_made_in_float64_and_keeps_the_dtype():
    weight = torch.randn(4, 2, 3, 3)
    u = winograd_weight(weight)
    assert u.shape == (16, 2, 4) and u.dtype == torch.float32
    # Corner products of the transform are the corner taps themselves: U[0, 0] = g[0, 0].
    assert torch.equal(u[0], weight[:, :, 0, 0].t())


def test_refuses_what_it_cannot_compute():
    with pytest.raises(ValueError, match="3x3 kernels"):
        winograd_weight(torch.randn(4, 2, 5, 5))
    u = winograd_weight(torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match="even height and width, got 5x6"):
        winograd_conv3x3(torch.randn(1, 2, 5, 6), u)
    with pytest.raises(ValueError, match="does not take 3 input channels"):
        winograd_conv3x3(torch.randn(1, 3, 4, 4), u)
