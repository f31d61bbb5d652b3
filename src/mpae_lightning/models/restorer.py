"""Masked patch encoder and decoder that restore the image from visible patches and part descriptors."""
from __future__ import annotations

from functools import partial

import torch
from timm.models.vision_transformer import Block
from torch import nn

from .pos_embed import sincos_pos_embed_2d


def random_masking_ids(noise: torch.Tensor, mask_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's per-sample masking: patches sorted by ascending noise, the first ``int(L*(1-r))`` kept.

    Returns ``ids_keep`` (B, n_keep) and the boolean ``masked`` map (B, L).
    """
    num_patches = noise.shape[1]
    num_keep = int(num_patches * (1 - mask_ratio))
    ids_keep = torch.argsort(noise, dim=1)[:, :num_keep]
    masked = torch.ones_like(noise, dtype=torch.bool)
    masked.scatter_(1, ids_keep, False)
    return ids_keep, masked


def unpatchify(tokens: torch.Tensor, grid_size: tuple[int, int], patch: int) -> torch.Tensor:
    """(B, h*w, p*p*3) tokens laid out (row, column, channel) -> (B, 3, h*p, w*p) image."""
    b = tokens.shape[0]
    h, w = grid_size
    x = tokens.reshape(b, h, w, patch, patch, 3)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, 3, h * patch, w * patch)


class MaskedRestorer(nn.Module):
    """Encodes the visible patches and decodes a full grid in which masked positions hold R.

    There is no learned mask token: every masked position receives the filled feature
    map's vector at that position, so restoring the image forces the part descriptors
    to carry appearance.

    Args:
        grid_size: (h, w) patch grid.
        patch_size: input patch size in pixels.
        feature_dim: C, the width of R and of the decoder.
        encoder_width: E, width of the masked patch encoder.
        encoder_depth: encoder blocks.
        encoder_heads: encoder attention heads.
        decoder_depth: decoder blocks.
        decoder_heads: decoder attention heads (``None``: C // 64, at least 1).
        restore_patch: side p_r of the restored patch per token.
        norm_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        grid_size: tuple[int, int],
        patch_size: int = 14,
        feature_dim: int = 256,
        encoder_width: int = 256,
        encoder_depth: int = 2,
        encoder_heads: int = 4,
        decoder_depth: int = 2,
        decoder_heads: int | None = None,
        restore_patch: int = 8,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.restore_patch = restore_patch
        decoder_heads = decoder_heads or max(1, feature_dim // 64)

        norm = partial(nn.LayerNorm, eps=norm_eps)

        self.patch_embed = nn.Conv2d(3, encoder_width, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(encoder_width, *grid_size)[None])
        self.encoder_blocks = nn.ModuleList(
            Block(encoder_width, encoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(encoder_depth)
        )
        self.encoder_norm = norm(encoder_width)
        self.encoder_proj = nn.Linear(encoder_width, feature_dim)
        self.register_buffer("decoder_pos_embed", sincos_pos_embed_2d(feature_dim, *grid_size)[None])
        self.decoder_blocks = nn.ModuleList(
            Block(feature_dim, decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm) for _ in range(decoder_depth)
        )
        self.decoder_norm = norm(feature_dim)
        self.decoder_pred = nn.Linear(feature_dim, restore_patch**2 * 3)

    def forward(self, images: torch.Tensor, filled: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Restore (B, 3, h*p_r, w*p_r) from images, R (B, C, h, w) and the kept patch ids."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2) + self.pos_embed.to(images.dtype)
        x = torch.gather(x, 1, ids_keep[..., None].expand(-1, -1, x.shape[-1]))
        for block in self.encoder_blocks:
            x = block(x)
        visible = self.encoder_proj(self.encoder_norm(x))
        # Start from R everywhere, then put the encoded visible tokens back at their positions.
        seq = filled.flatten(2).transpose(1, 2).to(visible.dtype)
        seq = seq.scatter(1, ids_keep[..., None].expand(-1, -1, seq.shape[-1]), visible)
        seq = seq + self.decoder_pos_embed.to(seq.dtype)
        for block in self.decoder_blocks:
            seq = block(seq)
        tokens = self.decoder_pred(self.decoder_norm(seq))
        return unpatchify(tokens, self.grid_size, self.restore_patch)
