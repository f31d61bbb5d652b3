"""Frozen VGG-19 feature taps for MPAE's structural difference penalty, with weights resolved on first use."""
from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

from ..models.frozen import autocast_weight_copies
from ..models.weights import WeightsUnavailableError, is_local_file, is_random, load_state_dict_file
from .winograd import winograd_conv3x3, winograd_weight

#: Slices of ``vgg19().features`` ending after relu1_1, relu2_1, relu3_1, relu4_1, relu5_1.
VGG19_TAPS = ((0, 2), (2, 7), (7, 12), (12, 21), (21, 30))


def _placeholder_features() -> nn.Sequential:
    """``vgg19().features`` filled with zeros: built in ~0.1 s, no download, no random numbers drawn."""
    from torchvision.models.vgg import cfgs, make_layers

    with torch.device("meta"):
        features = make_layers(cfgs["E"])
    features = features.to_empty(device="cpu")
    with torch.no_grad():
        for p in features.parameters():
            p.zero_()
    return features


def _features_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A full ``vgg19`` state dict or that of its ``features``, as ``features`` keys."""
    if any(k.startswith("features.") for k in state):
        state = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
    return state


def _pretrained_state(weights: str, setting: str) -> dict[str, torch.Tensor]:
    """The ``features`` state dict from a local file or torchvision's ImageNet download."""
    if is_local_file(weights):
        return _features_state(load_state_dict_file(weights, setting))
    try:
        return _features_state(torchvision.models.VGG19_Weights.IMAGENET1K_V1.get_state_dict(progress=False))
    except Exception as err:  # noqa: BLE001 - network errors come in many types
        raise WeightsUnavailableError(
            f"Could not download the ImageNet VGG-19 weights for the structural penalty ({type(err).__name__}: {err}). "
            f"Without network access, download torchvision's vgg19-dcbb9e9d.pth on another machine and pass it with "
            f"`{setting}=/path/to/vgg19.pth` (CLI: --model.init_args.{setting} /path/to/vgg19.pth)."
        ) from None


#: Winograd layers (``VGGFeatures.winograd_cpu``): at least this many channels in and out (VGG-19's
#: conv3_2 to conv5_1) ...
WINOGRAD_MIN_CHANNELS = 256
#: ... and at least this many 2x2 output blocks (batch x H x W / 4): on fewer, the transforms cost
#: more than the products they save (e.g. a single 32-px image's conv5_1 at 2x2).
WINOGRAD_MIN_TILES = 32


class _WinogradConvReLU(torch.autograd.Function):
    """``relu(conv3x3(x))`` of a frozen convolution as a Winograd convolution, and its input gradient.

    ``forward_u`` and ``backward_u`` are ``winograd_weight`` of the kernel and of the flipped,
    in/out-transposed kernel: the input gradient of a stride-1 "same" convolution is the convolution
    of the output gradient with the latter, so it runs as a Winograd convolution too. Gradients reach
    ``x`` only (the weights are frozen; :func:`_takes_winograd` checks it)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, bias: torch.Tensor | None, forward_u: torch.Tensor,
                backward_u: torch.Tensor) -> torch.Tensor:
        out = winograd_conv3x3(x, forward_u, bias, relu=True)
        ctx.backward_u = backward_u
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (out,) = ctx.saved_tensors
        grad = grad.masked_fill(out <= 0, 0)  # through the ReLU
        return winograd_conv3x3(grad, ctx.backward_u), None, None, None


def _takes_winograd(conv: nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether a convolution (followed by its ReLU) pays as a Winograd convolution on ``x``.

    A frozen float32 3x3 stride-1 "same" convolution with at least :data:`WINOGRAD_MIN_CHANNELS`
    channels in and out, on an even-sized input of at least :data:`WINOGRAD_MIN_TILES` 2x2 output
    blocks; fewer channels or blocks make the transforms' passes cost more than the products saved."""
    b, _, h, w = x.shape
    return (
        conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
        and conv.dilation == (1, 1) and conv.groups == 1
        and not conv.weight.requires_grad and conv.weight.dtype == torch.float32
        and (conv.bias is None or not conv.bias.requires_grad)
        and min(conv.in_channels, conv.out_channels) >= WINOGRAD_MIN_CHANNELS
        and h % 2 == 0 and w % 2 == 0 and b * h * w // 4 >= WINOGRAD_MIN_TILES
    )


class VGGFeatures(nn.Module):
    """Frozen VGG-19 returning the relu{1..5}_1 activations, always in eval mode.

    Pretrained weights (a download or a local file) are *resolved lazily*: construction
    never touches the network or the file, and :meth:`resolve` (called by the first
    forward, or early by whoever wants a fast failure) loads them into the already
    built layers. Evaluation never needs VGG, so evaluating a released checkpoint
    works offline. Checkpoints leave public VGG weights out (``MPAELoss`` is rebuilt from
    its recorded source); one that carries them (random weights, or an older checkpoint)
    calls :meth:`mark_loaded` after filling the layers, so loading it never downloads.

    Args:
        weights: ``"torchvision"`` (ImageNet download), a local ``.pth`` (full ``vgg19`` or
            its ``features``), or ``"random"``.
        features: an already built ``vgg19().features`` to use instead (e.g. formula-initialised).
        setting: name of the user-facing argument, quoted in error messages.
    """

    #: The one switch of a CPU float32 fast path, off by default: True runs the 3x3 layers with 256
    #: or more channels in and out (VGG-19's conv3_2 to conv5_1, on even sizes) as Winograd
    #: F(2x2, 3x3) convolutions (:func:`~mpae_lightning.losses.winograd.winograd_conv3x3`), forward
    #: and input gradient: 2.25x fewer multiplications, the restoration loss ~1.2x faster on the
    #: CPU (benchmarks/RESULTS.md), the same function but a different float32 rounding (as close to
    #: float64 as the direct kernel's). Set it on the class or on one instance. Off (and always on
    #: GPUs, in float64, under autocast or ``torch.compile``): the plain layers.
    winograd_cpu: bool = False

    def __init__(
        self, weights: str | None = "torchvision", features: nn.Sequential | None = None, setting: str = "vgg_weights"
    ) -> None:
        super().__init__()
        self.setting = setting
        self.source: str | None = None  # what resolve() still has to load; None once ready
        if features is None and is_random(weights):
            features = torchvision.models.vgg19(weights=None).features
        elif features is None:
            features = _placeholder_features()
            self.source = str(weights)
        self.slices = nn.ModuleList(features[a:b] for a, b in VGG19_TAPS)
        # Channels-last weights and activations: oneDNN (CPU) and cuDNN (GPU) run these convolutions
        # and max-pools natively in NHWC, while NCHW costs a layout conversion around every layer.
        # Loading a state dict copies into these tensors and keeps their layout.
        self.slices.to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    @property
    def is_ready(self) -> bool:
        """True when the layers hold the final weights (nothing left to download or read)."""
        return self.source is None

    def mark_loaded(self) -> None:
        """The layers were filled from a state dict (a checkpoint that carries VGG): nothing left to resolve."""
        self.source = None

    def resolve(self) -> None:
        """Load the pretrained weights now (no-op when ready); raises :class:`WeightsUnavailableError`."""
        if self.source is None:
            return
        state = _pretrained_state(self.source, self.setting)
        try:
            self._load_features_state(state)
        except RuntimeError as err:
            raise WeightsUnavailableError(f"{self.setting}: {self.source} is not a VGG-19 state dict: {err}") from None
        self.source = None

    def _load_features_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a ``vgg19().features`` state dict into the tapped slices (strict on the layers used)."""
        mapped = {}
        for i, block in enumerate(self.slices):
            for key in block.state_dict():  # slices keep vgg19().features' layer numbers: "2.weight" ...
                if key not in state:
                    raise RuntimeError(f"missing key {key}")
                mapped[f"{i}.{key}"] = state[key]
        self.slices.load_state_dict(mapped, strict=True)

    def train(self, mode: bool = True) -> "VGGFeatures":
        return super().train(False)

    def _winograd_applies(self, x: torch.Tensor) -> bool:
        return (self.winograd_cpu and x.device.type == "cpu" and x.dtype == torch.float32
                and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised images -> the five relu{1..5}_1 activations (channels-last strides)."""
        self.resolve()
        x = x.contiguous(memory_format=torch.channels_last)
        winograd = self._winograd_applies(x)
        taps = []
        for block in self.slices:
            if winograd:
                x = self._winograd_block(block, x)
            else:
                # Under bf16/fp16 autocast: half-precision weight copies made once, not cast per call.
                copies = autocast_weight_copies(block, x.device.type)
                x = block(x) if copies is None else torch.func.functional_call(block, copies, (x,), strict=False)
            taps.append(x)
        return taps

    def _winograd_block(self, block: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
        """One slice with its wide convolutions (and their ReLUs) as Winograd convolutions."""
        layers = list(block)
        i = 0
        while i < len(layers):
            layer = layers[i]
            if (isinstance(layer, nn.Conv2d) and i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)
                    and _takes_winograd(layer, x)):
                x = _WinogradConvReLU.apply(x, layer.bias, *self._winograd_weights(layer))
                i += 2
            else:
                x = layer(x)
                i += 1
        return x

    def _winograd_weights(self, conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
        """``conv``'s Winograd-transformed weights for the forward and for the input gradient, made once.

        Kept outside the state dict (and out of copies and pickles), and remade when the weight
        changes device, storage or value (its version counter rises at every in-place change, e.g.
        ``load_state_dict``)."""
        w = conv.weight
        key = (w.device, w.dtype, w.data_ptr(), w._version)
        cache = self.__dict__.setdefault("_winograd_cache", {})
        hit = cache.get(id(conv))
        if hit is None or hit[0] != key:
            weight = w.detach()
            hit = cache[id(conv)] = (key, (winograd_weight(weight), winograd_weight(weight.flip(2, 3).transpose(0, 1))))
        return hit[1]

    def __getstate__(self) -> dict:
        # The transformed weights (~0.2 GB) are remade on demand, not copied or pickled.
        state = dict(super().__getstate__())
        state.pop("_winograd_cache", None)
        return state
