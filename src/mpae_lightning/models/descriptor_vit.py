"""The trainable ViT over raw pixels that produces the K+1 part descriptors."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Mlp, QuickGELU
from torch import nn

from .precision import at_least_float32
from .pos_embed import sincos_pos_embed_2d


class Float32LayerNorm(nn.LayerNorm):
    """LayerNorm computed in at least float32 and cast back (CLIP's, which the authors reuse).

    Half-precision inputs are normalised in float32; float32 and float64 inputs stay as they are.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = at_least_float32(x)
        weight = None if self.weight is None else self.weight.to(y.dtype)
        bias = None if self.bias is None else self.bias.to(y.dtype)
        return F.layer_norm(y, self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class DescriptorAttention(nn.Module):
    """Multi-head self-attention on PyTorch's fused ``scaled_dot_product_attention`` kernel.

    Parameters carry ``nn.MultiheadAttention``'s names and layout (``in_proj_weight``,
    ``in_proj_bias``, ``out_proj``), which are CLIP's and so the authors' checkpoint keys.
    The fused kernel is ~7x faster than MultiheadAttention's explicit-softmax path on the
    CPU, and computes the same function: in float64 the two agree to ~1e-16.

    Args:
        width: embedding width.
        num_heads: attention heads; must divide ``width``.
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        if width % num_heads:
            raise ValueError(f"descriptor_width={width} is not divisible by descriptor_heads={num_heads}")
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # MultiheadAttention's initialisation
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self, x: torch.Tensor, return_weights: bool = False, num_queries: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, N, W) -> (B, N, W), plus the head-averaged (B, N, N) attention if ``return_weights``.

        With ``num_queries = n`` only the first n tokens attend (to all N): (B, n, W) out,
        the same rows as the full call, for n/N of the query-side work.
        """
        b, n, w = x.shape
        heads, dim = self.num_heads, w // self.num_heads
        if num_queries is None:
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
            q, k, v = qkv.view(b, n, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
        else:  # queries from the first rows only; keys and values from all (rows of in_proj: q, k, v)
            q = F.linear(x[:, :num_queries], self.in_proj_weight[:w], self.in_proj_bias[:w])
            q = q.view(b, num_queries, heads, dim).transpose(1, 2)
            kv = F.linear(x, self.in_proj_weight[w:], self.in_proj_bias[w:])
            k, v = kv.view(b, n, 2, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
            n = num_queries
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
        weights = None
        if return_weights:  # explicit maps for visualisation only; never on the training path
            scale = (w // self.num_heads) ** -0.5
            weights = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1).mean(dim=1).detach()
        return self.out_proj(out), weights


class DescriptorBlock(nn.Module):
    """Pre-norm CLIP residual block with fused attention.

    Set ``keep_attention = True`` to store the head-averaged attention maps of the
    next forward in ``attention_maps`` (computed separately, for visualisation).
    """

    def __init__(self, width: int, num_heads: int) -> None:
        super().__init__()
        self.norm1 = Float32LayerNorm(width)
        self.attn = DescriptorAttention(width, num_heads)
        self.norm2 = Float32LayerNorm(width)
        self.mlp = Mlp(width, width * 4, act_layer=QuickGELU)
        self.attention_maps: torch.Tensor | None = None
        self.keep_attention = False

    def forward(self, x: torch.Tensor, num_queries: int | None = None) -> torch.Tensor:
        """(B, N, W) -> (B, N, W); with ``num_queries = n``, only the first n outputs, (B, n, W).

        The descriptor ViT reads out only its query tokens, so its last block computes just
        those rows: attention from the n queries to all tokens, then the MLP on n rows.
        """
        if self.keep_attention:  # the maps need every row
            num_queries = None
        y, weights = self.attn(self.norm1(x), return_weights=self.keep_attention, num_queries=num_queries)
        if self.keep_attention:
            self.attention_maps = weights  # (B, N, N), averaged over heads
        x = (x if num_queries is None else x[:, :num_queries]) + y
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
        for i, block in enumerate(self.blocks):
            # Only the query rows of the last block are read out: it computes just those.
            x = block(x, num_queries=self.num_parts) if i == len(self.blocks) - 1 else block(x)
        return self.head(self.norm_post(x[:, : self.num_parts]))
