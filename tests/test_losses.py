"""Each MPAE loss term on hand-made inputs whose value is known (docs/method.md §3), and the frozen VGG-19 taps
of the restoration term (losses/vgg.py). MPAELoss, which weighs the terms, is tested in test_objective.py."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from model_utils import no_vgg_download, offline, random_vgg19_features  # noqa: F401 - fixtures
from mpae_lightning.losses import (
    ArcFaceSemanticLoss,
    BackgroundPresenceLoss,
    EntropyLoss,
    MiniGroupPresenceLoss,
    RestorationLoss,
    TotalVariationLoss,
    VGGFeatures,
)
from mpae_lightning.models import WeightsUnavailableError

LAYER_WEIGHTS = (5 / 32, 5 / 16, 5 / 8, 5 / 4, 5.0)


def _with_background(foreground: torch.Tensor) -> torch.Tensor:
    """Append the background channel (last) so that every pixel sums to 1."""
    background = 1 - foreground.sum(dim=1, keepdim=True)
    assert background.min() >= 0
    return torch.cat([foreground, background], dim=1)


def _blocks(peaks: list[list[float]], size: int = 9) -> torch.Tensor:
    """Foreground maps (B, K, size, size): part k of image b is ``peaks[b][k]`` on its own 3x3 block, 0 elsewhere.

    The blocks of different parts do not overlap, so the 3x3-pooled spatial max of part k is exactly its value.
    """
    b, k = len(peaks), len(peaks[0])
    assert 3 * k <= size
    fg = torch.zeros(b, k, size, size, dtype=torch.float64)
    for i, row in enumerate(peaks):
        for j, value in enumerate(row):
            fg[i, j, 3 * j : 3 * j + 3, 3 * j : 3 * j + 3] = value
    return fg


# --------------------------------------------------------------------------- foreground presence


def test_foreground_presence_zero_when_every_part_peaks_in_every_group():
    # Batch 4 in chunks of 2, K = 3. Within each chunk every part reaches 1 on some image,
    # and every image has some part at 1 -> both a and b vanish in every chunk.
    peaks = [
        [1.0, 0.0, 1.0],
        [0.0, 1.0, 0.0],
        [0.0, 1.0, 0.0],
        [1.0, 0.0, 1.0],
    ]
    similarity = _with_background(_blocks(peaks))
    loss = MiniGroupPresenceLoss(mini_group=2)(similarity)
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    # In chunks of one image, a part must be present in every image: a = 1/3, 2/3, 2/3, 1/3 and b = 0.
    assert MiniGroupPresenceLoss(mini_group=1)(similarity).item() == pytest.approx(0.5, abs=1e-12)


def test_foreground_presence_hand_computed_with_smaller_last_chunk():
    # Batch 5, mini_group 2 -> chunks {0, 1}, {2, 3}, {4}. M = pooled spatial peaks (B, K=3).
    peaks = [
        [0.2, 0.5, 0.1],
        [0.4, 0.1, 0.3],
        [0.3, 0.3, 0.2],
        [0.0, 0.8, 0.1],
        [0.1, 0.2, 0.6],
    ]
    # chunk 0: max over images per part (.4, .5, .3) -> a = 1 - 0.4    = 0.6
    #          max over parts per image (.5, .4)      -> b = 1 - 0.45   = 0.55
    # chunk 1: (.3, .8, .2) -> a = 1 - 1.3/3 = 17/30;  (.3, .8) -> b = 1 - 0.55 = 0.45
    # chunk 2: (.1, .2, .6) -> a = 1 - 0.3   = 0.7;    (.6,)    -> b = 1 - 0.6  = 0.4
    # L_fg = mean(a) + mean(b) = 28/45 + 21/45 = 49/45
    expected = 49 / 45
    similarity = _with_background(_blocks(peaks))
    loss = MiniGroupPresenceLoss(mini_group=2)(similarity)
    assert loss.item() == pytest.approx(expected, abs=1e-9)
    # Chunk means are not image means: averaging b over the 5 images would give 0.48, not 7/15.
    wrong_b = 1 - (0.5 + 0.4 + 0.3 + 0.8 + 0.6) / 5
    assert abs(loss.item() - (28 / 45 + wrong_b)) > 1e-3


def test_foreground_presence_pools_before_the_max():
    # A single pixel at 0.9 is pooled to 0.1 by the 3x3 average: it does not count as presence.
    fg = torch.zeros(1, 1, 5, 5, dtype=torch.float64)
    fg[0, 0, 2, 2] = 0.9
    loss = MiniGroupPresenceLoss(mini_group=8)(_with_background(fg))
    assert loss.item() == pytest.approx(2 * (1 - 0.1), abs=1e-12)


def test_foreground_presence_ignores_background_channel():
    # Background (last channel) everywhere at 1 gives no foreground presence at all.
    similarity = torch.zeros(2, 4, 6, 6)
    similarity[:, -1] = 1
    assert MiniGroupPresenceLoss(mini_group=2)(similarity).item() == pytest.approx(2.0)


@pytest.mark.parametrize("batch, group", [(8, 4), (7, 3), (5, 8), (6, 1)])
def test_foreground_presence_matches_per_chunk_loop(batch, group):
    """The batched chunks (whole ones together, the smaller last one apart) equal a loop over chunks."""
    gen = torch.Generator().manual_seed(batch * 10 + group)
    similarity = torch.randn(batch, 5, 7, 7, generator=gen, dtype=torch.float64).softmax(dim=1)
    peaks = torch.nn.functional.avg_pool2d(similarity[:, :-1], 3, stride=1).flatten(2).amax(dim=2).tolist()
    chunks = [peaks[i : i + group] for i in range(0, batch, group)]
    per_part = [1 - sum(max(img[k] for img in c) for k in range(4)) / 4 for c in chunks]
    per_image = [1 - sum(max(img) for img in c) / len(c) for c in chunks]
    expected = sum(per_part) / len(chunks) + sum(per_image) / len(chunks)
    assert MiniGroupPresenceLoss(group)(similarity).item() == pytest.approx(expected, rel=1e-13)


def test_foreground_presence_rejects_bad_group():
    with pytest.raises(ValueError, match="mini_group"):
        MiniGroupPresenceLoss(mini_group=0)


# --------------------------------------------------------------------------- background presence


def _radial_peak_bce(background: torch.Tensor) -> float:
    """Independent loop implementation of L_bg for (B, H, W) background maps."""
    total = 0.0
    for img in background.tolist():
        hh, ww = len(img) - 2, len(img[0]) - 2
        gy = [-1 + 2 * i / (hh - 1) for i in range(hh)]
        gx = [-1 + 2 * j / (ww - 1) for j in range(ww)]
        rmax = max(y * y + x * x for y in gy for x in gx)
        peak = 0.0
        for i in range(hh):
            for j in range(ww):
                pooled = sum(img[i + di][j + dj] for di in range(3) for dj in range(3)) / 9
                peak = max(peak, pooled * (gy[i] ** 2 + gx[j] ** 2) / rmax)
        total += -math.log(peak)
    return total / len(background)


def test_background_presence_zero_when_background_fills_the_borders():
    bg = torch.ones(2, 9, 9)
    bg[:, 3:6, 3:6] = 0  # everything but the centre is background
    similarity = torch.stack([1 - bg, bg], dim=1)
    assert BackgroundPresenceLoss()(similarity).item() == pytest.approx(0.0, abs=1e-6)


def test_background_presence_hand_computed_radial_max():
    # Image 0: background fills the border frame -> peak 1, BCE 0.
    # Image 1: background 0.5 on a 3x3 block at rows 3..5, columns 0..2 of a 9x9 map.
    #   Pooled grid 7x7, g = linspace(-1, 1, 7), rho = (gx^2 + gy^2) / 2.
    #   Window (3, 0): pooled 0.5, rho = (0 + 1) / 2 = 0.5 -> 0.25
    #   Window (2, 0): pooled 1/3, rho = (1/9 + 1) / 2  -> 5/27 < 0.25; others smaller.
    #   BCE(0.25, 1) = log 4.  L_bg = (0 + log 4) / 2 = log 2.
    bg = torch.zeros(2, 9, 9, dtype=torch.float64)
    bg[0] = 1
    bg[0, 3:6, 3:6] = 0
    bg[1, 3:6, 0:3] = 0.5
    similarity = torch.stack([1 - bg, bg], dim=1)
    loss = BackgroundPresenceLoss()(similarity)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert _radial_peak_bce(bg) == pytest.approx(math.log(2), abs=1e-9)


def test_background_presence_matches_loop_formula_on_random_maps():
    torch.manual_seed(0)
    similarity = torch.rand(3, 3, 8, 11, dtype=torch.float64).softmax(dim=1)  # non-square grid
    loss = BackgroundPresenceLoss()(similarity)
    assert loss.item() == pytest.approx(_radial_peak_bce(similarity[:, -1]), rel=1e-6)


def test_background_in_the_centre_is_penalised():
    # Background 1 on the central 3x3 block of a 9x9 map: the fully covered window has rho = 0.
    # Best window (1, 3): pooled 3/9, rho = ((2/3)^2 + 0) / 2 = 2/9 -> peak 2/27, L_bg = log(27/2).
    bg = torch.zeros(1, 9, 9)
    bg[0, 3:6, 3:6] = 1
    similarity = torch.stack([1 - bg, bg], dim=1)
    assert BackgroundPresenceLoss()(similarity).item() == pytest.approx(math.log(27 / 2), rel=1e-5)


# --------------------------------------------------------------------------- distribution: entropy and TV


@pytest.mark.parametrize("parts", [2, 5, 17])
def test_entropy_of_uniform_map_is_log_parts(parts):
    similarity = torch.full((2, parts, 4, 3), 1.0 / parts, dtype=torch.float64)
    assert EntropyLoss()(similarity).item() == pytest.approx(math.log(parts), rel=1e-9)


def test_entropy_of_one_hot_map_is_zero_with_finite_gradient():
    labels = torch.randint(0, 5, (2, 4, 4), generator=torch.Generator().manual_seed(0))
    similarity = torch.nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).float().requires_grad_(True)
    loss = EntropyLoss()(similarity)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.isfinite(similarity.grad).all()


def test_entropy_is_averaged_over_pixels_and_images():
    # Half the pixels uniform over 2 of 3 parts (entropy log 2), half one-hot (0) -> log(2) / 2.
    similarity = torch.zeros(2, 3, 2, 2)
    similarity[:, 2, 0, :] = 1
    similarity[:, 0, 1, :] = 0.5
    similarity[:, 1, 1, :] = 0.5
    assert EntropyLoss()(similarity).item() == pytest.approx(math.log(2) / 2, rel=1e-6)


def test_total_variation_of_constant_map_is_zero():
    similarity = torch.full((3, 4, 5, 6), 0.25)
    assert TotalVariationLoss()(similarity).item() == 0.0


def test_total_variation_of_step_maps():
    # B = 2, two channels, h = 4, w = 5 (non-square).
    # Image 0: vertical edge between columns 1 and 2 -> per channel one jump of 1 in each of 4 rows: 2*4 = 8.
    # Image 1: horizontal edge between rows 0 and 1 -> per channel one jump in each of 5 columns: 2*5 = 10.
    # TV = (8 + 10) / (B*h*w) = 18 / 40.
    fg = torch.zeros(2, 1, 4, 5)
    fg[0, 0, :, :2] = 1
    fg[1, 0, :1, :] = 1
    similarity = torch.cat([fg, 1 - fg], dim=1)
    assert TotalVariationLoss()(similarity).item() == pytest.approx(18 / 40, rel=1e-6)


def test_total_variation_magnitude_of_jump_counts():
    # One channel, a single pixel of height 0.3 in the interior: 4 jumps of 0.3, divided by 1*3*3.
    similarity = torch.zeros(1, 1, 3, 3)
    similarity[0, 0, 1, 1] = 0.3
    assert TotalVariationLoss()(similarity).item() == pytest.approx(4 * 0.3 / 9, rel=1e-6)


# --------------------------------------------------------------------------- semantic (ArcFace)


def _manual_arcface(similarity, features, descriptors, s=20.0, m=0.5, threshold=1e-3):
    """Per-entry loop over (b, j) in double precision, straight from docs/method.md §3.5."""
    similarity, features, descriptors = similarity.double(), features.double(), descriptors.double()
    b, parts, h, w = similarity.shape
    k = parts - 1
    total = 0.0
    for i in range(b):
        for j in range(k):
            if similarity[i, j].sum() <= threshold:
                continue  # absent: contributes 0 but is still counted below
            r = (similarity[i, j][None] * features[i]).sum(dim=(1, 2)) / (h * w)
            logits = []
            for kk in range(k):
                d = descriptors[i, kk]
                cos = float(r @ d / (r.norm() * d.norm()))
                if kk == j:
                    sin = math.sqrt(min(max(1 - cos * cos, 0.0), 1.0))
                    if cos > math.cos(math.pi - m):
                        phi = cos * math.cos(m) - sin * math.sin(m)
                    else:
                        phi = cos - m * math.sin(m)
                    logits.append(s * phi)
                else:
                    logits.append(s * cos)
            log_norm = math.log(sum(math.exp(x) for x in logits))
            total += log_norm - logits[j]
    return total / (b * k)


def _arcface_case():
    torch.manual_seed(3)
    b, k, c, h, w = 2, 4, 6, 3, 4
    logits = torch.randn(b, k + 1, h, w)
    similarity = logits.softmax(dim=1)
    # Image 1, part 2: absent (total mass 0.5e-3 <= 1e-3). Image 0, part 3: barely present (2e-3).
    similarity[1, 2] = 0.5e-3 / (h * w)
    similarity[0, 3] = 2e-3 / (h * w)
    features = torch.randn(b, c, h, w)
    descriptors = torch.randn(b, k + 1, c)
    # Push image 0, part 0 past the margin threshold: its descriptor points against its region feature.
    region = (similarity[0, 0][None] * features[0]).mean(dim=(1, 2))
    descriptors[0, 0] = -region / region.norm() * 3 + 0.05 * torch.randn(c)
    return similarity, features, descriptors


def test_arcface_matches_manual_formula_with_absent_parts():
    similarity, features, descriptors = _arcface_case()
    # The case covers the cos - m*sin(m) branch: image 0, part 0 sits beyond cos(pi - m).
    region = (similarity[0, 0][None] * features[0]).mean(dim=(1, 2))
    assert torch.nn.functional.cosine_similarity(region, descriptors[0, 0], dim=0) < math.cos(math.pi - 0.5)
    loss = ArcFaceSemanticLoss(s=20.0, m=0.5)(similarity, features, descriptors)
    expected = _manual_arcface(similarity, features, descriptors)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    # The background descriptor (last) plays no part.
    descriptors2 = descriptors.clone()
    descriptors2[:, -1] = torch.randn_like(descriptors2[:, -1]) * 100
    assert ArcFaceSemanticLoss()(similarity, features, descriptors2).item() == pytest.approx(loss.item(), rel=1e-6)


def test_arcface_absent_parts_contribute_zero_but_count_in_the_mean():
    similarity, features, descriptors = _arcface_case()
    b, k = similarity.shape[0], similarity.shape[1] - 1
    loss = ArcFaceSemanticLoss()(similarity, features, descriptors).item()
    # Sum of the 7 present entries' losses (threshold 1e-3 drops entry (1, 2) only).
    present_sum = _manual_arcface(similarity, features, descriptors) * b * k
    assert loss == pytest.approx(present_sum / (b * k), rel=1e-5)  # mean over all B*K = 8 entries
    assert loss != pytest.approx(present_sum / (b * k - 1), rel=1e-3)  # not over the 7 present ones
    # The absent entry would have a nonzero loss if it counted (threshold below its mass).
    counted = ArcFaceSemanticLoss(presence_threshold=1e-4)(similarity, features, descriptors).item()
    assert counted > loss + 1e-3
    # With every part absent the loss is exactly 0, not NaN.
    empty = similarity.clone()
    empty[:, :-1] = 0
    empty[:, -1] = 1
    assert ArcFaceSemanticLoss()(empty, features, descriptors).item() == 0.0


def test_arcface_threshold_boundary():
    similarity, features, descriptors = _arcface_case()
    loss_fn = ArcFaceSemanticLoss()
    # Image 0 part 3 holds 2e-3 of mass: present at threshold 1e-3, absent at threshold 3e-3.
    high = ArcFaceSemanticLoss(presence_threshold=3e-3)(similarity, features, descriptors)
    assert high.item() == pytest.approx(_manual_arcface(similarity, features, descriptors, threshold=3e-3), rel=1e-5)
    assert high.item() != pytest.approx(loss_fn(similarity, features, descriptors).item(), rel=1e-3)


def test_arcface_gradient_is_finite():
    similarity, features, descriptors = _arcface_case()
    logits = similarity.log().requires_grad_(True)
    features.requires_grad_(True)
    descriptors.requires_grad_(True)
    loss = ArcFaceSemanticLoss()(logits.softmax(dim=1), features, descriptors)
    loss.backward()
    for t in (logits, features, descriptors):
        assert t.grad is not None and torch.isfinite(t.grad).all()
    assert descriptors.grad[:, :-1].abs().sum() > 0
    # The background descriptor gets no gradient from L_s.
    assert descriptors.grad[:, -1].abs().sum() == 0


def test_arcface_scale_and_margin_are_used():
    similarity, features, descriptors = _arcface_case()
    base = ArcFaceSemanticLoss()(similarity, features, descriptors).item()
    for s, m in ((10.0, 0.5), (20.0, 0.2)):
        value = ArcFaceSemanticLoss(s=s, m=m)(similarity, features, descriptors).item()
        assert value == pytest.approx(_manual_arcface(similarity, features, descriptors, s=s, m=m), rel=1e-5)
        assert value != pytest.approx(base, rel=1e-3)


# --------------------------------------------------------------------------- restoration


class ScaledTaps(nn.Module):
    """Stub VGG: returns five known maps, c_i * x for c = 1..5 (with different shapes), and records them."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[torch.Tensor]] = []

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = [1 * x, 2 * x[:, :1], 3 * x[..., ::2, ::2], 4 * x.flatten(1), 5 * x]
        self.calls.append(taps)
        return taps


def test_restoration_zero_when_restored_equals_target():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 8, 8)
    conv = nn.Conv2d(3, 4, 3)
    loss = RestorationLoss(lambda x: [conv(x), conv(x).relu(), x.tanh(), 2 * x, conv(x).sigmoid()])
    out = loss(target.clone().requires_grad_(True), target)
    assert out["restoration"].item() == 0.0
    assert out["restoration_l1"].item() == 0.0


def test_restoration_formula_with_stub_features():
    torch.manual_seed(0)
    target = torch.randn(2, 3, 8, 8)
    delta = torch.where(torch.rand_like(target) < 0.5, -0.5, 0.5)  # |restored - target| = 0.5 everywhere
    restored = (target + delta).requires_grad_(True)
    stub = ScaledTaps()
    out = RestorationLoss(stub)(restored, target)
    # mean|c_i (R - T)| = 0.5 c_i on every tap (sub-sampled taps included).
    expected_terms = [0.5 * c for c in (1, 2, 3, 4, 5)]
    assert out["perceptual_terms"].tolist() == pytest.approx(expected_terms, rel=1e-6)
    expected_perceptual = sum(w * t for w, t in zip(LAYER_WEIGHTS, expected_terms))  # 16.328125
    assert out["perceptual"].item() == pytest.approx(expected_perceptual, rel=1e-6)
    assert out["restoration_l1"].item() == pytest.approx(0.5, rel=1e-6)
    assert out["restoration"].item() == pytest.approx(0.1 * 0.5 + expected_perceptual, rel=1e-6)  # 16.378125


def test_restoration_custom_weights():
    target = torch.zeros(1, 3, 4, 4)
    restored = torch.ones(1, 3, 4, 4)
    out = RestorationLoss(ScaledTaps(), l1_weight=2.0, layer_weights=(1, 0, 0, 0, 0.5))(restored, target)
    assert out["restoration"].item() == pytest.approx(2.0 * 1 + 1 * 1 + 0.5 * 5, rel=1e-6)


def test_restoration_gradients_flow_to_restored_only():
    torch.manual_seed(0)
    target = torch.randn(1, 3, 4, 4).requires_grad_(True)
    delta = torch.where(torch.rand_like(target) < 0.5, -0.25, 0.25)
    restored = (target.detach() + delta).requires_grad_(True)
    stub = ScaledTaps()
    RestorationLoss(stub)(restored, target)["restoration"].backward()
    # The extractor saw the target first (no graph) and the restored image second (with graph).
    target_taps, restored_taps = stub.calls[0], stub.calls[1]
    assert all(not t.requires_grad and t.grad_fn is None for t in target_taps)
    assert all(t.requires_grad for t in restored_taps)
    # d/dR of 0.1 mean|R-T| + sum_i w_i c_i mean|R-T| is (0.1 + sum w_i c_i) sign(R-T) / N.
    n = target.numel()
    sign = delta.sign()
    # Tap 2 keeps 1 of 3 channels, tap 3 every other pixel: their gradients only reach those entries.
    expected = (0.1 + LAYER_WEIGHTS[0] * 1 + LAYER_WEIGHTS[3] * 4 + LAYER_WEIGHTS[4] * 5) * sign / n
    expected[:, :1] += LAYER_WEIGHTS[1] * 2 * sign[:, :1] / (n / 3)
    expected[..., ::2, ::2] += LAYER_WEIGHTS[2] * 3 * sign[..., ::2, ::2] / (n / 4)
    assert torch.allclose(restored.grad, expected, rtol=1e-5, atol=1e-7)
    # The target only receives the pixel L1's gradient: the VGG part of the target has no graph.
    assert torch.allclose(target.grad, -0.1 * sign / n, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------- precision of the upcast terms


def _loss_terms(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every loss term that upcasts for mixed precision, on the same random maps cast to ``dtype``."""
    gen = torch.Generator().manual_seed(0)
    similarity = torch.randn(4, 4, 6, 6, generator=gen, dtype=torch.float64).softmax(dim=1)
    features = torch.randn(4, 8, 6, 6, generator=gen, dtype=torch.float64)
    descriptors = torch.randn(4, 4, 8, generator=gen, dtype=torch.float64)
    restored, target = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64).unbind(0)
    s, f, d, r, t = (x.to(dtype) for x in (similarity, features, descriptors, restored[None], target[None]))
    return {
        "presence_background": BackgroundPresenceLoss()(s),
        "semantic": ArcFaceSemanticLoss()(s, f, d),
        "perceptual": RestorationLoss(ScaledTaps())(r, t)["perceptual"],
        "perceptual_terms": RestorationLoss(ScaledTaps())(r, t)["perceptual_terms"],
    }


def test_upcast_losses_keep_float64_in_float64():
    """A float64 model must get float64 losses: a float32 cast would cap agreement with float64 code at ~1e-8."""
    ours = _loss_terms(torch.float64)
    for name, value in ours.items():
        assert value.dtype == torch.float64, name
    # Spot-check the values against direct float64 formulas.
    gen = torch.Generator().manual_seed(0)
    similarity = torch.randn(4, 4, 6, 6, generator=gen, dtype=torch.float64).softmax(dim=1)
    assert ours["presence_background"].item() == pytest.approx(_radial_peak_bce(similarity[:, -1]), rel=1e-14)


def test_upcast_losses_compute_half_precision_in_float32():
    for dtype in (torch.bfloat16, torch.float16):
        for name, value in _loss_terms(dtype).items():
            assert value.dtype == torch.float32, (dtype, name)


# --------------------------------------------------------------------------- mean |a - b| of the restoration loss


def test_mean_abs_difference_matches_autograd_for_both_inputs():
    from mpae_lightning.losses.restoration import mean_abs_difference

    gen = torch.Generator().manual_seed(0)
    a0, b0 = torch.randn(2, 2, 5, 6, 7, generator=gen, dtype=torch.float64).unbind(0)
    a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    ours = mean_abs_difference(a, b)
    (ours * 3).backward()
    ra, rb = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    ref = (ra - rb).abs().mean()
    (ref * 3).backward()
    assert ours.dtype == torch.float64 and ours.item() == pytest.approx(ref.item(), rel=1e-14)
    assert torch.allclose(a.grad, ra.grad, rtol=0, atol=1e-16) and torch.allclose(b.grad, rb.grad, rtol=0, atol=1e-16)
    # Only the inputs that need a gradient get one (VGG target taps have no graph).
    c = a0.clone().requires_grad_(True)
    mean_abs_difference(c, b0).backward()
    assert torch.allclose(c.grad, ra.grad / 3, rtol=0, atol=1e-16)


def test_mean_abs_difference_gradient_keeps_channels_last_and_upcasts_half():
    """Autograd's ``(a - b).abs().mean()`` returns an NCHW gradient for channels-last activations, which
    makes every layer of the channels-last VGG backward mix layouts; this one keeps the layout."""
    from mpae_lightning.losses.restoration import mean_abs_difference

    gen = torch.Generator().manual_seed(1)
    a = torch.randn(2, 8, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    b = torch.randn(2, 8, 4, 4, generator=gen).contiguous(memory_format=torch.channels_last)
    mean_abs_difference(a, b).backward()
    assert a.grad.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a.grad, (a - b).detach().sign() / a.numel())
    half = mean_abs_difference(a.detach().bfloat16(), b.bfloat16())
    assert half.dtype == torch.float32
    assert half.item() == pytest.approx((a.detach().bfloat16().float() - b.bfloat16().float()).abs().mean().item(), rel=1e-2)


def test_mean_abs_difference_is_as_exact_as_the_authors_mean_on_full_size_taps():
    """float32 on a full-size relu1_1 tap (batch 4, 64 x 128 x 128, channels-last): the value is within
    1e-6 of float64, like the authors' ``(a - b).abs().mean()`` (an L1 norm reduction was 1.5e-4 off)."""
    from mpae_lightning.losses.restoration import mean_abs_difference

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 64, 128, 128, generator=gen).relu().contiguous(memory_format=torch.channels_last)
    b = (a + 0.1 * torch.randn(a.shape, generator=gen)).relu()
    exact = (a.double() - b.double()).abs().mean().item()
    assert mean_abs_difference(a, b).item() == pytest.approx(exact, rel=1e-6)
    assert (a - b).abs().mean().item() == pytest.approx(exact, rel=1e-6)  # the authors' formula, for scale


# --------------------------------------------------------------------------- VGG-19 taps (losses/vgg.py)


def test_vgg_download_offline_names_the_local_file_option(offline):  # noqa: F811
    vgg = VGGFeatures(weights="torchvision")  # construction never downloads
    assert not vgg.is_ready and vgg.source == "torchvision"
    with pytest.raises(WeightsUnavailableError) as info:
        vgg.resolve()
    message = str(info.value)
    assert "vgg_weights" in message
    assert "vgg_weights=/path/to/vgg19.pth" in message
    assert not list((offline / "torch_home").rglob("*.pth"))  # nothing was downloaded
    with pytest.raises(WeightsUnavailableError, match="vgg_weights=/path"):
        vgg(torch.zeros(1, 3, 16, 16))  # the first forward resolves too
    assert not vgg.is_ready


def test_vgg_filled_from_a_checkpoint_is_not_fetched_again(no_vgg_download):  # noqa: F811
    """``mark_loaded`` (called by MPAEModule when a checkpoint carries VGG): resolving is then a no-op."""
    vgg = VGGFeatures(weights="torchvision")
    source = random_vgg19_features()
    vgg._load_features_state(source.state_dict())
    vgg.mark_loaded()
    assert vgg.is_ready and vgg.source is None
    vgg.resolve()
    taps = vgg(torch.randn(1, 3, 16, 16))
    assert len(taps) == 5 and no_vgg_download == []
    assert torch.equal(vgg.slices[0][0].weight, source[0].weight)


def test_missing_local_vgg_file_is_named(tmp_path):
    missing_vgg = tmp_path / "vgg19-dcbb9e9d.pth"
    vgg = VGGFeatures(weights=str(missing_vgg))  # not read yet
    with pytest.raises(WeightsUnavailableError) as info:
        vgg.resolve()
    assert str(missing_vgg) in str(info.value) and "vgg_weights" in str(info.value)
    assert not vgg.is_ready


def test_vgg_file_of_another_network_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, path)
    with pytest.raises(WeightsUnavailableError, match=r"vgg_weights: .*resnet\.pth is not a VGG-19 state dict"):
        VGGFeatures(weights=str(path)).resolve()


def test_vgg_from_local_files(tmp_path):
    features = random_vgg19_features().state_dict()
    # A full torchvision vgg19 state dict: features.* plus the classifier (stored as stride-0 tensors,
    # same keys and shapes as torchvision's file at a fraction of the size).
    full = {f"features.{k}": v for k, v in features.items()}
    for key, shape in {
        "classifier.0.weight": (4096, 25088), "classifier.0.bias": (4096,),
        "classifier.3.weight": (4096, 4096), "classifier.3.bias": (4096,),
        "classifier.6.weight": (1000, 4096), "classifier.6.bias": (1000,),
    }.items():
        full[key] = torch.zeros(1).expand(*shape)
    early = VGGFeatures(weights=str(tmp_path / "vgg19_full.pth"))  # the file is read on first use, not now
    torch.save(full, tmp_path / "vgg19_full.pth")
    torch.save(features, tmp_path / "vgg19_features.pth")
    for name in ("vgg19_full.pth", "vgg19_features.pth"):
        vgg = early if name == "vgg19_full.pth" else VGGFeatures(weights=str(tmp_path / name))
        assert not vgg.is_ready
        vgg.resolve()
        assert vgg.is_ready and vgg.source is None
        convs = [m for block in vgg.slices for m in block if isinstance(m, nn.Conv2d)]
        assert len(convs) == 13  # conv1_1 .. conv5_1
        own = {}
        index = 0
        for block in vgg.slices:
            for layer in block:
                for pname, p in layer.named_parameters():
                    own[f"{index}.{pname}"] = p
                index += 1
        assert index == 30
        for key, value in own.items():
            assert torch.equal(value, features[key]), (name, key)
            if value.ndim == 4:  # loading copies into the channels-last weights and keeps their layout
                assert value.is_contiguous(memory_format=torch.channels_last), (name, key)
        assert not vgg.training and all(not p.requires_grad for p in vgg.parameters())


def test_vgg_runs_channels_last_and_computes_the_nchw_taps():
    """Channels-last VGG (weights and activations) gives the same five taps as plain NCHW layers."""
    from mpae_lightning.losses.vgg import VGG19_TAPS

    plain = random_vgg19_features().double().eval()
    vgg = VGGFeatures(weights="random", features=random_vgg19_features()).double()
    vgg._load_features_state(plain.state_dict())
    convs = [m for block in vgg.slices for m in block if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    taps = vgg(x)
    expected, y = [], x
    for a, b in VGG19_TAPS:
        y = plain[a:b](y)
        expected.append(y)
    assert len(taps) == 5
    for tap, ref in zip(taps, expected):
        assert tap.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(tap, ref, rtol=1e-12, atol=1e-12)


def test_vgg_under_autocast_uses_cached_half_weights_with_identical_taps():
    """The frozen VGG under bf16 autocast: the same taps bit for bit as its plain layers under autocast."""
    from mpae_lightning.models.frozen import autocast_weight_copies

    vgg = VGGFeatures(weights="random", features=random_vgg19_features())
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        taps = vgg(images)
        x = images.contiguous(memory_format=torch.channels_last)
        plain_taps = []
        for block in vgg.slices:
            x = block(x)
            plain_taps.append(x)
        copies = autocast_weight_copies(vgg.slices[0], "cpu")
    assert all(t.dtype == torch.bfloat16 for t in taps)
    assert all(torch.equal(a, b) for a, b in zip(taps, plain_taps))
    assert copies is not None and all(v.dtype == torch.bfloat16 for v in copies.values())
    assert not any("autocast" in k for k in vgg.state_dict())
