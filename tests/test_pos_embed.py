"""models/pos_embed.py: MAE's fixed 2-D sin-cos position embeddings, and where MPAE uses them."""
from __future__ import annotations

import math

import pytest
import torch

from model_utils import TINY_MODEL
from mpae_lightning import MPAE
from mpae_lightning.models.pos_embed import sincos_pos_embed_2d


def test_sincos_pos_embed_values():
    emb = sincos_pos_embed_2d(8, 2, 3)  # grid 2 rows x 3 columns, width 8
    assert emb.shape == (6, 8) and emb.dtype == torch.float32
    # Each half: [sin(pos * omega), cos(pos * omega)], omega = (1, 1/100); first half = column, second = row.
    assert emb[0].tolist() == [0, 0, 1, 1, 0, 0, 1, 1]  # position 0: sin = 0, cos = 1
    s1, s2, c1, c2 = math.sin(1), math.sin(0.01), math.cos(1), math.cos(0.01)
    assert emb[1].tolist() == pytest.approx([s1, s2, c1, c2, 0, 0, 1, 1], abs=1e-7)  # row 0, column 1
    assert emb[3].tolist() == pytest.approx([0, 0, 1, 1, s1, s2, c1, c2], abs=1e-7)  # row 1, column 0
    assert emb[5, :4].tolist() == pytest.approx([math.sin(2), math.sin(0.02), math.cos(2), math.cos(0.02)], abs=1e-7)
    big = sincos_pos_embed_2d(256, 16, 16)
    assert big.shape == (256, 256)
    assert torch.equal(big[0, :64], torch.zeros(64)) and torch.equal(big[0, 64:128], torch.ones(64))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(6, 2, 2)


def test_model_position_embeddings_are_sincos():
    torch.manual_seed(0)
    model = MPAE(**TINY_MODEL)
    grid = model.grid_size
    restorer = model.restorer
    assert torch.equal(restorer.pos_embed[0], sincos_pos_embed_2d(TINY_MODEL["encoder_width"], *grid))
    assert torch.equal(restorer.decoder_pos_embed[0], sincos_pos_embed_2d(TINY_MODEL["feature_dim"], *grid))
    k1 = TINY_MODEL["num_parts"] + 1
    desc_pos = model.descriptor_vit.pos_embed[0].detach()
    assert torch.equal(desc_pos[:k1], torch.zeros(k1, TINY_MODEL["descriptor_width"]))  # queries first, zeros
    assert torch.equal(desc_pos[k1:], sincos_pos_embed_2d(TINY_MODEL["descriptor_width"], *grid))
