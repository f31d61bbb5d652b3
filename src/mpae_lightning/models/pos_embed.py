"""Fixed 2-D sin-cos position embeddings, as in MAE (He et al., 2022)."""
from __future__ import annotations

import numpy as np
import torch


def _sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", positions.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_pos_embed_2d(embed_dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """(grid_h*grid_w, embed_dim) float32 table, row-major grid order, MAE's layout.

    The first half of the channels encodes the column (x) coordinate and the second
    half the row (y) coordinate, exactly as MAE's ``get_2d_sincos_pos_embed`` does.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {embed_dim}")
    gw, gh = np.meshgrid(np.arange(grid_w, dtype=np.float32), np.arange(grid_h, dtype=np.float32))
    emb = np.concatenate([_sincos_1d(embed_dim // 2, gw), _sincos_1d(embed_dim // 2, gh)], axis=1)
    return torch.from_numpy(emb.astype(np.float32))
