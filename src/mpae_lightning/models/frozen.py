"""Frozen modules (the backbone, VGG-19): their matmul weights cast once under mixed precision."""
from __future__ import annotations

import torch
from torch import nn

from .precision import HALF_DTYPES

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
    # A tensor's version counter (``_version``, what autograd checks saved tensors with) rises at
    # every in-place change, e.g. ``load_state_dict`` copying new weights into the same storage.
    key = (dtype, prefix, tuple((id(p), p.device, p.data_ptr(), p._version) for _, p in params))
    cached = module.__dict__.get("_autocast_weight_copies")
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, {prefix + name: p.to(dtype) for name, p in params})
        module.__dict__["_autocast_weight_copies"] = cached
    return cached[1]
