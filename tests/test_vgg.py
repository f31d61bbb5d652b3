"""VGG-19 feature taps: the plain layers by default, and the opt-in Winograd CPU path (one switch)."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpae_lightning.losses import vgg as vgg_module
from mpae_lightning.losses.vgg import VGG19_TAPS, VGGFeatures


def _taps_and_grad(vgg: VGGFeatures, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The taps and the gradient of a fixed random projection of them with respect to ``x``."""
    x = x.detach().requires_grad_(True)
    taps = vgg(x)
    probes = [torch.randn(t.shape, generator=torch.Generator().manual_seed(i), dtype=t.dtype)
              for i, t in enumerate(taps)]
    (grad,) = torch.autograd.grad(sum((t * p).sum() for t, p in zip(taps, probes)), x)
    return taps, grad


def _convs(vgg: VGGFeatures) -> list[nn.Conv2d]:
    return [layer for block in vgg.slices for layer in block if isinstance(layer, nn.Conv2d)]


def _grad_fns(taps: list[torch.Tensor]) -> set[str]:
    """Names of every autograd node behind the taps."""
    seen, stack = set(), [t.grad_fn for t in taps]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@pytest.fixture(scope="module")
def vgg() -> VGGFeatures:
    torch.manual_seed(0)
    return VGGFeatures(weights="random")


def test_default_is_the_plain_layers_bit_for_bit(vgg):
    """Off by default: the taps and the input gradient are those of the torchvision layers run one after
    the other, bit for bit, in float32 on the CPU."""
    assert VGGFeatures.winograd_cpu is False and vgg.winograd_cpu is False
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    taps, grad = _taps_and_grad(vgg, x)
    plain = [copy.deepcopy(block) for block in vgg.slices]

    class Plain(nn.Module):
        def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
            out, x = [], x.contiguous(memory_format=torch.channels_last)
            for block in plain:
                x = block(x)
                out.append(x)
            return out

    expected, expected_grad = _taps_and_grad(Plain(), x)
    assert all(torch.equal(a, b) for a, b in zip(taps, expected))
    assert torch.equal(grad, expected_grad)
    assert "_WinogradConvReLUBackward" not in _grad_fns(taps)
    assert "_winograd_cache" not in vgg.__dict__
    assert len(VGG19_TAPS) == len(taps) == 5


def test_winograd_layer_is_the_convolution_in_float64():
    """The Winograd autograd function, forward and input gradient, equals conv2d + ReLU to 1e-12 in float64
    (odd channel counts, a non-square even size, a bias)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 7, 3, padding=1).double().requires_grad_(False)
    vgg = VGGFeatures(weights="random")
    forward_u, backward_u = vgg._winograd_weights(conv)
    x = torch.randn(2, 5, 6, 10, dtype=torch.float64, requires_grad=True)
    out = vgg_module._WinogradConvReLU.apply(x, conv.bias, forward_u, backward_u)
    ref = F.relu(F.conv2d(x, conv.weight, conv.bias, padding=1))
    probe = torch.randn_like(ref)
    (grad,) = torch.autograd.grad((out * probe).sum(), x)
    (ref_grad,) = torch.autograd.grad((ref * probe).sum(), x)
    assert torch.allclose(out, ref, rtol=0, atol=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-12)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_winograd_switch_runs_the_wide_layers_with_the_same_function(vgg):
    """On: exactly the 3x3 layers with >= 256 channels in and out run as Winograd convolutions, and the
    taps and input gradient stay as close to float64 arithmetic as the plain float32 layers' do."""
    fast = copy.deepcopy(vgg)
    fast.winograd_cpu = True
    x = torch.randn(2, 3, 128, 128, generator=torch.Generator().manual_seed(2))  # conv5_1 at 8x8: 32 blocks
    taps, grad = _taps_and_grad(fast, x)
    plain_taps, plain_grad = _taps_and_grad(vgg, x)
    exact, exact_grad = _taps_and_grad(copy.deepcopy(vgg).double(), x.double())
    wide = {id(c) for c in _convs(vgg) if min(c.in_channels, c.out_channels) >= vgg_module.WINOGRAD_MIN_CHANNELS}
    assert len(wide) == 8 and set(fast.__dict__["_winograd_cache"]) == {id(c) for c in _convs(fast)
                                                                         if min(c.in_channels, c.out_channels) >= 256}
    assert "_WinogradConvReLUBackward" in _grad_fns(taps)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a.double() - b).norm() / b.norm()).item()

    assert all(torch.equal(a, b) for a, b in zip(taps[:3], plain_taps[:3]))  # up to relu3_1: no wide layer
    for tap, plain, ref in zip(taps[3:], plain_taps[3:], exact[3:]):
        assert not torch.equal(tap, plain)  # the Winograd layers ran
        assert rel(tap, ref) < max(2 * rel(plain, ref), 1e-6)
    assert rel(grad, exact_grad) < max(2 * rel(plain_grad, exact_grad), 1e-5)
    assert all(t.is_contiguous(memory_format=torch.channels_last) for t in taps)


def test_winograd_only_where_it_applies(vgg):
    """Odd sizes and too few 2x2 output blocks take the plain layer; float64, autocast and trainable
    weights never take the Winograd path."""
    fast = copy.deepcopy(vgg)
    fast.winograd_cpu = True
    convs = _convs(fast)
    fast(torch.randn(8, 3, 74, 74))  # conv3_x at 18x18, conv4_x at 9x9 (odd), conv5_1 at 4x4 (32 blocks)
    cache = fast.__dict__["_winograd_cache"]
    assert id(convs[5]) in cache and id(convs[9]) not in cache and id(convs[12]) in cache
    fast.__dict__.pop("_winograd_cache")
    fast(torch.randn(1, 3, 32, 32))  # one small image: too few blocks everywhere
    assert not fast.__dict__.get("_winograd_cache")
    x = torch.randn(2, 3, 64, 64)
    assert "_WinogradConvReLUBackward" not in _grad_fns(copy.deepcopy(fast).double()(x.double().requires_grad_()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert "_WinogradConvReLUBackward" not in _grad_fns(fast(x.requires_grad_()))
    trainable = copy.deepcopy(fast).requires_grad_(True)
    taps = trainable(x)
    assert "_WinogradConvReLUBackward" not in _grad_fns(taps)
    torch.autograd.grad(taps[-1].sum(), trainable.slices[-1][0].weight)  # weight gradients exist


def test_transformed_weights_follow_the_weights_and_stay_out_of_state_and_copies(vgg):
    fast = copy.deepcopy(vgg)
    fast.winograd_cpu = True
    x = torch.randn(2, 3, 64, 64)
    fast(x)
    assert "_winograd_cache" in fast.__dict__
    assert list(fast.state_dict()) == list(vgg.state_dict())
    assert "_winograd_cache" not in copy.deepcopy(fast).__dict__
    assert "_winograd_cache" not in pickle.loads(pickle.dumps(fast)).__dict__
    wide = _convs(fast)[6]
    with torch.no_grad():
        wide.weight.mul_(-2)  # e.g. load_state_dict copying new weights in: transformed again
        again = fast(x)
        fast.winograd_cpu = False
        plain = fast(x)
    fast.winograd_cpu = True
    for a, b in zip(again, plain):
        assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_a_failing_fast_path_raises_and_stays_on(vgg, monkeypatch):
    """A fast path that fails is an error, not a silent switch to the plain layers."""
    fast = copy.deepcopy(vgg)
    fast.winograd_cpu = True

    def broken(*args, **kwargs):
        raise RuntimeError("winograd broke")

    monkeypatch.setattr(vgg_module, "winograd_conv3x3", broken)
    with pytest.raises(RuntimeError, match="winograd broke"):
        fast(torch.randn(2, 3, 64, 64))
    assert fast.winograd_cpu is True and VGGFeatures.winograd_cpu is False
