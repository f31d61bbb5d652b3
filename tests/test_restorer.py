"""models/restorer.py: MAE's random masking, the (row, column, channel) unpatchify and the masked restorer."""
from __future__ import annotations

import pytest
import torch

from mpae_lightning.models.restorer import MaskedRestorer, random_masking_ids, unpatchify

# --------------------------------------------------------------------------- random masking


def test_random_masking_keeps_lowest_noise_patches():
    noise = torch.tensor(
        [
            [0.50, 0.10, 0.90, 0.30, 0.70, 0.20, 0.80, 0.40, 0.60, 0.05],
            [0.00, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.01],
        ]
    )
    ids_keep, masked = random_masking_ids(noise, mask_ratio=0.7)  # int(10 * 0.3) = 3 kept
    assert ids_keep.tolist() == [[9, 1, 5], [0, 9, 8]]  # ascending noise order
    expected_masked = torch.ones(2, 10, dtype=torch.bool)
    expected_masked[0, [9, 1, 5]] = False
    expected_masked[1, [0, 9, 8]] = False
    assert torch.equal(masked, expected_masked)


@pytest.mark.parametrize("num_patches, ratio", [(256, 0.9), (64, 0.9), (16, 0.75), (1024, 0.9), (49, 0.5)])
def test_random_masking_keeps_int_of_l_times_one_minus_ratio(num_patches, ratio):
    noise = torch.rand(3, num_patches, generator=torch.Generator().manual_seed(num_patches))
    ids_keep, masked = random_masking_ids(noise, ratio)
    n_keep = int(num_patches * (1 - ratio))  # 256, 0.9 -> 25 (docs/method.md §2.6)
    assert ids_keep.shape == (3, n_keep)
    assert (~masked).sum(dim=1).tolist() == [n_keep] * 3
    # kept = exactly the n_keep smallest noise values of each row
    for row in range(3):
        assert set(ids_keep[row].tolist()) == set(noise[row].argsort()[:n_keep].tolist())
        assert noise[row, ~masked[row]].max() < noise[row, masked[row]].min()


def test_random_masking_same_noise_same_mask():
    noise = torch.rand(4, 64, generator=torch.Generator().manual_seed(7))
    a = random_masking_ids(noise, 0.9)
    b = random_masking_ids(noise.clone(), 0.9)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = random_masking_ids(torch.rand(4, 64, generator=torch.Generator().manual_seed(8)), 0.9)
    assert not torch.equal(a[1], c[1])


# --------------------------------------------------------------------------- unpatchify


def test_unpatchify_row_column_channel_layout():
    # grid h=2, w=3 (non-square), patch 2: token t's entry (r, c, ch) is at index (r*2 + c)*3 + ch.
    h, w, p = 2, 3, 2
    tokens = torch.zeros(2, h * w, p * p * 3)
    for n in range(2):
        for t in range(h * w):
            for r in range(p):
                for c in range(p):
                    for ch in range(3):
                        tokens[n, t, (r * p + c) * 3 + ch] = 10000 * n + 1000 * t + 100 * r + 10 * c + ch
    image = unpatchify(tokens, (h, w), p)
    assert image.shape == (2, 3, h * p, w * p)
    for n in range(2):
        for ch in range(3):
            for y in range(h * p):
                for x in range(w * p):
                    t = (y // p) * w + (x // p)  # row-major token order
                    expected = 10000 * n + 1000 * t + 100 * (y % p) + 10 * (x % p) + ch
                    assert image[n, ch, y, x].item() == expected, (n, ch, y, x)


# --------------------------------------------------------------------------- the masked restorer


def test_restorer_reads_the_filled_map_only_at_masked_patches():
    """R fills exactly the masked positions: the encoded visible tokens replace it everywhere else."""
    torch.manual_seed(0)
    restorer = MaskedRestorer((2, 3), patch_size=4, feature_dim=16, encoder_width=8, encoder_depth=1,
                              encoder_heads=2, decoder_depth=1, decoder_heads=2, restore_patch=2).double().eval()
    images = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    filled = torch.randn(2, 16, 2, 3, dtype=torch.float64)
    noise = torch.rand(2, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ids_keep, masked = random_masking_ids(noise, 0.5)
    restored = restorer(images, filled, ids_keep)
    assert restored.shape == (2, 3, 4, 6)  # (h * p_r, w * p_r)
    kept_changed = filled.flatten(2).clone()  # (B, C, h*w)
    masked_changed = filled.flatten(2).clone()
    for b in range(2):
        kept_changed[b][:, ~masked[b]] += 100 * torch.randn(16, int((~masked[b]).sum()), dtype=torch.float64)
    # (not a constant shift over channels: the LayerNorms would remove that)
    masked_changed[0][:, masked[0]] += torch.randn(16, int(masked[0].sum()), dtype=torch.float64)
    same = restorer(images, kept_changed.view_as(filled), ids_keep)
    assert torch.allclose(same, restored, rtol=0, atol=1e-12)
    moved = restorer(images, masked_changed.view_as(filled), ids_keep)
    assert not torch.allclose(moved[0], restored[0])
    assert torch.allclose(moved[1], restored[1], rtol=0, atol=1e-12)  # images are independent
