"""Upcasting for the few computations MPAE keeps out of half precision."""
from __future__ import annotations

import torch

#: Floating dtypes too narrow for LayerNorm statistics, logs and cross-entropies.
HALF_DTYPES = (torch.float16, torch.bfloat16)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` in float32 if it is half precision (fp16/bf16), otherwise unchanged.

    Why not ``x.float()``: that would also *downcast* a float64 tensor, so a model
    run in float64 (the parity check against the authors' code) would silently lose
    precision wherever mixed-precision safety casts sit.
    """
    return x.float() if x.dtype in HALF_DTYPES else x


def low_precision_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """The half dtype of an opt-in low-precision inference, or None for the default float32 path.

    ``None`` and ``torch.float32`` both mean "as the authors evaluate" (float32 after the backbone).
    """
    if dtype is None or dtype == torch.float32:
        return None
    if dtype not in HALF_DTYPES:
        raise ValueError(f"dtype must be None, torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    return dtype
