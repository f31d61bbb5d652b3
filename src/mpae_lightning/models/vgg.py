"""Frozen VGG-19 feature taps for MPAE's structural difference penalty, with weights resolved on first use."""
from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import nn

from .frozen import autocast_weight_copies, disable_packing
from .weights import WeightsUnavailableError, is_local_file, is_random, load_state_dict_file
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


def packed_conv_relu_applies(x: torch.Tensor, slices: nn.Module) -> bool:
    """Whether :class:`FrozenConvReLU` can run ``slices`` on ``x``: CPU float32 without autocast or
    ``torch.compile`` tracing, oneDNN present, and every convolution a frozen stride-1 "same"
    convolution followed by a ReLU (as in VGG-19)."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    if torch.compiler.is_compiling():  # opaque packed weights cannot be traced; compile fuses on its own
        return False
    if not (torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled):
        return False
    for block in slices:
        layers = list(block)
        for i, layer in enumerate(layers):
            if isinstance(layer, nn.Conv2d):
                same = layer.padding == tuple((k - 1) // 2 for k in layer.kernel_size)
                plain = layer.stride == (1, 1) and layer.dilation == (1, 1) and layer.groups == 1 and same
                frozen = not layer.weight.requires_grad and layer.weight.dtype == torch.float32
                if not (plain and frozen and i + 1 < len(layers) and isinstance(layers[i + 1], nn.ReLU)):
                    return False
    return True


class PackedConv:
    """A frozen convolution's weight prepared once for the CPU, for the forward and for the input gradient.

    Wide layers (``winograd``) keep Winograd-transformed weights (:mod:`.winograd`), the others
    weights packed for oneDNN's direct kernel."""

    def __init__(self, conv: nn.Conv2d, shape: tuple[int, ...], winograd: bool = False) -> None:
        weight = conv.weight.detach()
        # The input gradient of a stride-1 "same" convolution is the convolution of the output gradient
        # with the flipped, in/out-transposed kernel (what oneDNN's backward-data kernel computes too).
        flipped = weight.flip(2, 3).transpose(0, 1)
        self.winograd = winograd
        if winograd:
            self.forward, self.backward = winograd_weight(weight), winograd_weight(flipped)
            return
        pack = torch._C._nn.mkldnn_reorder_conv2d_weight
        args = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        out_shape = [shape[0], weight.shape[0], *shape[2:]]
        self.forward = pack(weight.contiguous(memory_format=torch.channels_last).to_mkldnn(), *args, list(shape))
        self.backward = pack(flipped.contiguous(memory_format=torch.channels_last).to_mkldnn(), *args, out_shape)
        self.args = args

    def conv_relu(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self.winograd:
            return winograd_conv3x3(x, self.forward, bias, relu=True)
        return torch.ops.mkldnn._convolution_pointwise(x, self.forward, bias, *self.args, "relu", [], "")

    def input_grad(self, grad: torch.Tensor) -> torch.Tensor:
        if self.winograd:
            return winograd_conv3x3(grad, self.backward)
        return torch.ops.mkldnn._convolution_pointwise(grad, self.backward, None, *self.args, "none", [], "")


class FrozenConvReLU(torch.autograd.Function):
    """``relu(conv(x))`` for a frozen convolution, on weights prepared once.

    Why: ATen re-packs a convolution's weight into oneDNN's blocked layout at every call
    (forward and backward: 39 reorders of VGG-19 weights per training step) and runs the ReLU
    as a separate pass. Here both weight layouts are packed once and the ReLU is fused: the
    restoration loss's forward and backward take 1-2 % less time on the CPU (its forward alone
    3-4 %; benchmarks/RESULTS.md), and the taps and the input gradient are the same bit for bit
    as those of the plain layers (tested). Layers with 256 or more channels in and out run as
    Winograd convolutions instead (:class:`VGGFeatures` ``winograd_cpu``), which changes the
    float32 rounding, not the function.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, conv: nn.Conv2d, packed: PackedConv) -> torch.Tensor:
        out = packed.conv_relu(x, conv.bias)
        ctx.packed = packed
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        (out,) = ctx.saved_tensors
        grad = torch.ops.aten.threshold_backward(grad.contiguous(memory_format=torch.channels_last), out, 0)
        return ctx.packed.input_grad(grad), None, None


class VGGFeatures(nn.Module):
    """Frozen VGG-19 returning the relu{1..5}_1 activations, always in eval mode.

    Pretrained weights (a download or a local file) are *resolved lazily*: construction
    never touches the network or the file, and :meth:`resolve` (called by the first
    forward, or early by whoever wants a fast failure) loads them into the already
    built layers. Evaluation never needs VGG, so evaluating a released checkpoint
    works offline. The boolean buffer ``ready`` is saved with the weights: loading a
    state dict whose VGG is ready (every checkpoint written after training) marks this
    module ready too, so loading a checkpoint never downloads.

    Args:
        weights: ``"torchvision"`` (ImageNet download), a local ``.pth`` (full ``vgg19`` or
            its ``features``), or ``"random"``.
        features: an already built ``vgg19().features`` to use instead (e.g. formula-initialised).
        setting: name of the user-facing argument, quoted in error messages.
    """

    #: CPU float32: run each convolution and its ReLU as one call on weights prepared once
    #: (:class:`FrozenConvReLU`; ~0.2 GB of prepared copies). False: the plain layers.
    pack_cpu_weights: bool = True
    #: With ``pack_cpu_weights``: 3x3 layers with at least ``winograd_min_channels`` channels in and
    #: out (VGG-19's conv3_2 to conv5_1, on even sizes) run as Winograd F(2x2, 3x3) convolutions
    #: (:func:`~mpae_lightning.models.winograd.winograd_conv3x3`): 2.25x fewer multiplications and a
    #: different float32 rounding, as close to float64 as the direct kernel's or closer (float64
    #: never takes this path). False: oneDNN's direct kernel, the taps bit for bit the plain layers'.
    winograd_cpu: bool = True
    winograd_min_channels: int = 256
    #: ... and at least this many 2x2 output blocks (batch x H x W / 4): on fewer, the transforms
    #: cost more than the products they save (e.g. a single 32-px image's conv5_1 at 2x2).
    winograd_min_tiles: int = 32

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
        self.register_buffer("ready", torch.tensor(self.source is None))
        self.requires_grad_(False)
        self.eval()
        self._loaded_prefix: str | None = None
        self.register_load_state_dict_post_hook(VGGFeatures._allow_state_without_vgg)

    @property
    def is_ready(self) -> bool:
        """True when the layers hold the final weights (nothing left to download or read)."""
        return self.source is None

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
        self.ready.fill_(True)

    def _load_features_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a ``vgg19().features`` state dict into the tapped slices (strict on the layers used)."""
        mapped = {}
        for i, block in enumerate(self.slices):
            for key in block.state_dict():  # slices keep vgg19().features' layer numbers: "2.weight" ...
                if key not in state:
                    raise RuntimeError(f"missing key {key}")
                mapped[f"{i}.{key}"] = state[key]
        self.slices.load_state_dict(mapped, strict=True)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list[str], unexpected_keys: list[str], error_msgs: list[str]) -> None:
        # Why: a checkpoint carries the VGG weights it trained with. If they were ready there
        # (or the checkpoint predates the flag), they are the weights: nothing to resolve.
        has_weights = any(k.startswith(prefix + "slices.") for k in state_dict)
        flag = state_dict.get(prefix + "ready")
        self._loaded_prefix = None if (has_weights or flag is not None) else prefix
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if flag is None and has_weights:  # written before the flag existed: VGG was always loaded then
            if prefix + "ready" in missing_keys:
                missing_keys.remove(prefix + "ready")
            flag = True
        if flag is not None and bool(flag):
            self.source = None
        self.ready.fill_(self.source is None)

    @staticmethod
    def _allow_state_without_vgg(module: "VGGFeatures", incompatible: Any) -> None:
        # A state dict with no VGG keys at all (saved without the frozen VGG to save space) loads
        # even strictly: this VGG keeps what it was built with and resolves on first use as usual.
        prefix, module._loaded_prefix = module._loaded_prefix, None
        if prefix is not None:
            incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not k.startswith(prefix)]

    def train(self, mode: bool = True) -> "VGGFeatures":
        return super().train(False)

    def __getstate__(self) -> dict:
        # Packed oneDNN weights are opaque tensors (not copyable or picklable); they are remade on demand.
        state = dict(super().__getstate__())
        state.pop("_packed_cpu_convs", None)
        return state

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalised images -> the five relu{1..5}_1 activations (channels-last strides)."""
        self.resolve()
        x = x.contiguous(memory_format=torch.channels_last)
        if self.pack_cpu_weights and packed_conv_relu_applies(x, self.slices):
            try:
                return self._packed_cpu_forward(x)
            except (RuntimeError, TypeError, AttributeError) as err:  # a torch whose private ops changed
                disable_packing(VGGFeatures, "oneDNN packed convolution", err)
        taps = []
        for block in self.slices:
            # Under bf16/fp16 autocast: half-precision weight copies made once, not cast per call.
            copies = autocast_weight_copies(block, x.device.type)
            x = block(x) if copies is None else torch.func.functional_call(block, copies, (x,), strict=False)
            taps.append(x)
        return taps

    def _packed_cpu_forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The same taps, each convolution and its ReLU as one oneDNN call on weights packed once."""
        taps = []
        for block in self.slices:
            layers = list(block)
            i = 0
            while i < len(layers):
                layer = layers[i]
                if isinstance(layer, nn.Conv2d):  # always followed by its ReLU in VGG-19
                    x = FrozenConvReLU.apply(x, layer, self._packed_conv(layer, tuple(x.shape)))
                    i += 2
                else:
                    x = layer(x)
                    i += 1
            taps.append(x)
        return taps

    def _packed_conv(self, conv: nn.Conv2d, shape: tuple[int, ...]) -> "PackedConv":
        winograd = (self.winograd_cpu and conv.kernel_size == (3, 3) and shape[2] % 2 == 0 and shape[3] % 2 == 0
                    and min(conv.in_channels, conv.out_channels) >= self.winograd_min_channels
                    and shape[0] * shape[2] * shape[3] // 4 >= self.winograd_min_tiles)
        cache = self.__dict__.setdefault("_packed_cpu_convs", {})  # per layer: (key, packing), one shape at a time
        key = (conv.weight.data_ptr(), conv.weight._version, shape, winograd)
        hit = cache.get(id(conv))
        if hit is None or hit[0] != key:
            hit = cache[id(conv)] = (key, PackedConv(conv, shape, winograd))
        return hit[1]
