"""models/precision.py: what is computed in (at least) float32 under mixed precision."""
from __future__ import annotations

import torch

from mpae_lightning.models.precision import HALF_DTYPES, at_least_float32


def test_at_least_float32_upcasts_half_only():
    for dtype, expected in [(torch.float16, torch.float32), (torch.bfloat16, torch.float32),
                            (torch.float32, torch.float32), (torch.float64, torch.float64)]:
        x = torch.ones(2, dtype=dtype)
        out = at_least_float32(x)
        assert out.dtype == expected, dtype
        if dtype == expected:
            assert out is x  # no copy where nothing changes
    assert set(HALF_DTYPES) == {torch.float16, torch.bfloat16}
