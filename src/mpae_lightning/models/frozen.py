"""Frozen modules: their matmul weights cast once under mixed precision, and packed once for the CPU."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from torch import nn

from ..losses.precision import HALF_DTYPES

_MATMUL_LAYERS = (nn.Linear, nn.Conv2d)


def autocast_weight_copies(module: nn.Module, device_type: str, prefix: str = "") -> dict[str, torch.Tensor] | None:
    """Half-precision copies of ``module``'s Linear/Conv2d parameters, or ``None`` when autocast would not cast them.

    Why: autocast caches its weight casts only for parameters that require grad, so a frozen
    module (the backbone, VGG) under bf16/fp16 autocast casts every matmul weight again at
    every call: about a hundred extra kernels and a full read of the float32 weights per
    backbone forward. These copies are what autocast would make (the same rounding, so the
    outputs are identical); they are kept on the module, outside its state dict, and remade
    whenever a parameter changes device, storage or value. Pass them to
    ``torch.func.functional_call`` (keys are ``prefix`` + parameter names).
    """
    if not torch.is_autocast_enabled(device_type):
        return None
    dtype = torch.get_autocast_dtype(device_type)
    if dtype not in HALF_DTYPES:
        return None
    params = [
        (f"{name}.{pname}" if name else pname, p)
        for name, layer in module.named_modules()
        if isinstance(layer, _MATMUL_LAYERS)
        for pname, p in layer.named_parameters(recurse=False)
    ]
    if not params or any(p.dtype != torch.float32 or p.requires_grad for _, p in params):
        return None  # autocast casts float32 only; trainable weights are cached by autocast itself
    key = (dtype, prefix, tuple((id(p), p.device, p.data_ptr(), p._version) for _, p in params))
    cached = module.__dict__.get("_autocast_weight_copies")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, {prefix + name: p.to(dtype) for name, p in params})
        module.__dict__["_autocast_weight_copies"] = cached
    return cached[1]


def disable_packing(cls: type, what: str, err: BaseException) -> None:
    """Turn a packed-weight fast path off for good (``cls.pack_cpu_weights = False``), saying so once.

    The fast paths use private torch operators (those ``torch.compile`` uses on the CPU); a torch
    release that changes them costs speed, never a run."""
    cls.pack_cpu_weights = False
    warnings.warn(f"{what} is not usable with torch {torch.__version__} ({type(err).__name__}: {err}); "
                  "running the plain layers instead (same results, slower on the CPU)", stacklevel=3)


def _mkl_packed_gemm_available() -> bool:
    return bool(torch._C.has_mkl) and hasattr(torch.ops.mkl, "_mkl_linear")


class PackedFrozenLinear(nn.Linear):
    """``nn.Linear`` of a frozen module that, on the CPU in float32, runs MKL's packed GEMM.

    Why: MKL re-packs the weight into its blocked layout inside every ``sgemm`` call; for a
    frozen weight the packing can be done once. On the frozen DINOv2 ViT-B this makes the
    backbone forward ~7 % faster on the CPU, and the output is the same bit for bit (the same
    MKL kernel on the same packed panels; tested). The packed copy costs about the weight's
    own size in resident memory (0.33 GB for ViT-B); it is made at the first CPU float32
    call, kept outside the state dict (and out of copies and pickles), and remade when the
    weight changes. Everything else (grad enabled on the input or weight, other dtypes or
    devices, autocast, non-contiguous input, ``torch.compile`` tracing, no MKL, or
    ``pack_cpu_weights = False``) is plain ``F.linear``.

    Existing layers become this class with :meth:`convert` (parameters and state-dict keys
    are unchanged).
    """

    #: set to False (on the class or one layer) to never pack (saves the copy's memory).
    pack_cpu_weights: bool = True

    @classmethod
    def convert(cls, module: nn.Module) -> nn.Module:
        """Make every ``nn.Linear`` inside ``module`` a ``PackedFrozenLinear`` in place; returns ``module``."""
        for layer in module.modules():
            if type(layer) is nn.Linear:
                layer.__class__ = cls
        return module

    def __getstate__(self) -> dict:
        # The packed copy is an opaque MKL tensor: not copyable or picklable, and remade on demand.
        state = dict(super().__getstate__())
        state.pop("_mkl_packed", None)
        return state

    def _packed_weight(self, rows: int) -> torch.Tensor:
        w = self.weight
        key = (w.data_ptr(), w._version, tuple(w.shape))
        cached = self.__dict__.get("_mkl_packed")
        if cached is None or cached[0] != key:
            # The row count is only MKL's blocking hint: any input size gives identical results.
            cached = (key, torch.ops.mkl._mkl_reorder_linear_weight(w.detach(), rows))
            self.__dict__["_mkl_packed"] = cached
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if (
            self.pack_cpu_weights
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and w.dtype == torch.float32
            and x.is_contiguous()
            and x.dim() >= 2
            and not (x.requires_grad or w.requires_grad or (b is not None and b.requires_grad))
            and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()  # torch.compile packs (or not) on its own
            and _mkl_packed_gemm_available()
        ):
            rows = x.numel() // max(x.shape[-1], 1)
            try:
                return torch.ops.mkl._mkl_linear(x, self._packed_weight(rows), w, b, rows)
            except (RuntimeError, TypeError, AttributeError) as err:  # a torch whose private op changed
                disable_packing(PackedFrozenLinear, "MKL packed GEMM", err)
        return F.linear(x, w, b)


def _may_overwrite(x: torch.Tensor) -> bool:
    """No gradient recorded and no autocast (whose casts an in-place op would bypass)."""
    return not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)


class InplaceGELU(nn.GELU):
    """``nn.GELU`` that overwrites its input under ``no_grad`` without autocast: the same values,
    one full-size activation less to allocate and write per MLP of a frozen ViT."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _may_overwrite(x):
            return torch.ops.aten.gelu_(x, approximate=self.approximate)
        return super().forward(x)


class InplaceLayerScale(LayerScale):
    """timm's ``LayerScale`` scaling in place under ``no_grad`` when that keeps the result's
    dtype (timm's own ``inplace`` flag would also keep a bf16 input bf16 where ``x * gamma``
    promotes it to float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _may_overwrite(x) and x.dtype == self.gamma.dtype:
            return x.mul_(self.gamma)
        return super().forward(x)


def optimize_frozen_vit(vit: nn.Module) -> nn.Module:
    """In place, for a frozen timm ViT: bit-identical speed-ups of its forward under ``no_grad``.

    * every ``nn.Linear`` becomes a :class:`PackedFrozenLinear` (CPU float32: MKL GEMM on
      weights packed once);
    * every ``nn.GELU`` becomes an :class:`InplaceGELU` and every ``LayerScale`` an
      :class:`InplaceLayerScale`: two fewer full-size tensors per block to allocate and write.

    On the CPU these make the DINOv2 ViT-B forward ~7-10 % faster; parameters, state-dict keys
    and outputs are unchanged (tested bit for bit). Returns ``vit``.
    """
    PackedFrozenLinear.convert(vit)
    swaps = {nn.GELU: InplaceGELU, LayerScale: InplaceLayerScale}
    for layer in vit.modules():
        if type(layer) in swaps:
            layer.__class__ = swaps[type(layer)]
    return vit
