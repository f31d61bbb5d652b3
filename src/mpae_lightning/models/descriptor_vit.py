"""The trainable ViT over raw pixels that produces the K+1 part descriptors."""
from __future__ import annotations

import torch
from timm.layers import Mlp, QuickGELU
from torch import nn

from .pos_embed import sincos_pos_embed_2d


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (CLIP's, which the authors reuse)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class DescriptorBlock(nn.Module):
    """Pre-norm CLIP residual block.

    Attention is ``nn.MultiheadAttention`` called with ``need_weights=True``: its
    explicit softmax path is the one the authors' code runs, so our outputs match
    theirs bit for bit, and the attention maps are available for visualisation.
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = Float32LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, num_heads, batch_first=True)
        self.norm2 = Float32LayerNorm(width)
        self.mlp = Mlp(width, width * 4, act_layer=QuickGELU)
        self.attention_maps: torch.Tensor | None = None
        self.keep_attention = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        y, weights = self.attn(y, y, y, need_weights=True)
        if self.keep_attention:
            self.attention_maps = weights.detach()  # (B, N, N), averaged over heads
        x = x + y
        return x + self.mlp(self.norm2(x))


class DescriptorViT(nn.Module):
    """CLIP-style ViT whose K+1 learned query tokens read out one descriptor per part.

    Queries come before the patch tokens; the query outputs pass a LayerNorm and a
    bias-free linear map to the feature width C. The last query is the background.

    Args:
        num_parts: K+1, foreground parts plus background.
        out_dim: feature width C of the descriptors.
        grid_size: (h, w) patch grid of the input images.
        patch_size: pixel size of a patch.
        width: transformer width W.
        depth: number of transformer blocks.
        num_heads: attention heads.
    """

    def __init__(
        self,
        num_parts: int,
        out_dim: int,
        grid_size: tuple[int, int],
        patch_size: int = 14,
        width: int = 256,
        depth: int = 6,
        num_heads: int = 8,
    ) -> None:
        super().__init__()
        self.num_parts = num_parts
        self.grid_size = tuple(grid_size)
        self.patch_embed = nn.Conv2d(3, width, patch_size, stride=patch_size, bias=False)
        self.part_queries = nn.Parameter(torch.randn(1, num_parts, width) * 0.02)
        pos = torch.zeros(1, num_parts + grid_size[0] * grid_size[1], width)
        pos[0, num_parts:] = sincos_pos_embed_2d(width, *grid_size)
        self.pos_embed = nn.Parameter(pos)
        self.norm_pre = Float32LayerNorm(width)
        self.blocks = nn.ModuleList(DescriptorBlock(width, num_heads) for _ in range(depth))
        self.norm_post = Float32LayerNorm(width)
        self.head = nn.Linear(width, out_dim, bias=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, K+1, C) descriptors."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        if x.shape[1] + self.num_parts != self.pos_embed.shape[1]:
            raise ValueError(
                f"DescriptorViT was built for a {self.grid_size[0]}x{self.grid_size[1]} patch grid, "
                f"got images of {tuple(images.shape[-2:])}"
            )
        x = torch.cat([self.part_queries.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = self.norm_pre(x + self.pos_embed.to(x.dtype))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm_post(x[:, : self.num_parts]))
