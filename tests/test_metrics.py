"""Streaming NMI/ARI against scikit-learn, and the keypoint / mask evaluation protocol."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import adjusted_rand_score, jaccard_score, normalized_mutual_info_score

from mpae_lightning.metrics import (
    ForegroundIoU,
    ForegroundMaskMetrics,
    KeypointPartMetrics,
    MaskPartMetrics,
    PartARI,
    PartCount,
    PartNMI,
    ari_from_contingency,
    contingency_table,
    count_foreground_parts,
    foreground_iou,
    foreground_iou_from_contingency,
    keypoint_part_labels,
    mask_part_labels,
    nmi_from_contingency,
    part_ari,
    part_nmi,
    upsampled_foreground,
)

TOL = 1e-9


def _sklearn(preds: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    t, p = target.reshape(-1).numpy(), preds.reshape(-1).numpy()
    return normalized_mutual_info_score(t, p), adjusted_rand_score(t, p)


def _labels(n: int, num_true: int, num_pred: int, seed: int, structured: bool = True):
    """Random labels; ``structured`` makes the prediction depend on the truth (NMI well above 0)."""
    g = torch.Generator().manual_seed(seed)
    target = torch.randint(0, num_true, (n,), generator=g)
    if structured:
        mapping = torch.randint(0, num_pred, (num_true,), generator=g)
        noise = torch.randint(0, num_pred, (n,), generator=g)
        preds = torch.where(torch.rand(n, generator=g) < 0.7, mapping[target], noise)
    else:
        preds = torch.randint(0, num_pred, (n,), generator=g)
    return preds, target


def _stream(metric, preds, target, num_chunks: int, seed: int = 0):
    """Update ``metric`` with ``num_chunks`` contiguous pieces of random sizes."""
    g = torch.Generator().manual_seed(seed)
    cuts = torch.randint(0, preds.numel() + 1, (num_chunks - 1,), generator=g).sort().values.tolist()
    bounds = [0, *cuts, preds.numel()]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        metric.update(preds[lo:hi], target[lo:hi])
    return metric.compute()


@pytest.mark.parametrize(
    ("n", "num_true", "num_pred", "structured"),
    [
        (1, 3, 4, True),
        (2, 2, 2, False),
        (17, 5, 3, False),
        (1_000, 15, 17, True),
        (1_000, 15, 17, False),
        (50_000, 51, 41, True),
        (150_000, 200, 2, False),  # beyond the int64 pair-product overflow of torchmetrics' ARI
    ],
)
def test_matches_sklearn_on_random_labels(n, num_true, num_pred, structured):
    preds, target = _labels(n, num_true, num_pred, seed=n + num_true, structured=structured)
    nmi_ref, ari_ref = _sklearn(preds, target)

    assert part_nmi(preds, target, num_true, num_pred).dtype == torch.float64
    assert abs(part_nmi(preds, target, num_true, num_pred).item() - nmi_ref) < TOL
    assert abs(part_ari(preds, target, num_true, num_pred).item() - ari_ref) < TOL

    num_chunks = min(n, 37)
    nmi = _stream(PartNMI(num_true, num_pred), preds, target, num_chunks)
    ari = _stream(PartARI(num_true, num_pred), preds, target, num_chunks)
    assert nmi.dtype == ari.dtype == torch.float64 and nmi.ndim == ari.ndim == 0
    assert abs(nmi.item() - nmi_ref) < TOL
    assert abs(ari.item() - ari_ref) < TOL


def test_any_matching_shape_and_integer_dtype():
    preds, target = _labels(4 * 32 * 32, 6, 5, seed=3)
    nmi_ref, ari_ref = _sklearn(preds, target)
    metric = PartNMI(6, 5)
    metric.update(preds.reshape(4, 32, 32).to(torch.int32), target.reshape(4, 32, 32).to(torch.uint8))
    assert abs(metric.compute().item() - nmi_ref) < TOL
    assert abs(part_ari(preds.reshape(4, 1024), target.reshape(4, 1024), 6, 5).item() - ari_ref) < TOL


def test_twenty_million_labels_streamed():
    n, num_true, num_pred = 20_000_000, 51, 41
    preds, target = _labels(n, num_true, num_pred, seed=2025)
    nmi_metric, ari_metric = PartNMI(num_true, num_pred), PartARI(num_true, num_pred)
    for p, t in zip(preds.split(1 << 20), target.split(1 << 20)):
        nmi_metric.update(p, t)
        ari_metric.update(p, t)
    assert nmi_metric.contingency.sum().item() == n
    nmi_ref, ari_ref = _sklearn(preds, target)
    assert 0.05 < ari_ref < 0.95  # a non-trivial score, where an overflow would show
    assert abs(nmi_metric.compute().item() - nmi_ref) < TOL
    assert abs(ari_metric.compute().item() - ari_ref) < TOL


DEGENERATE = {
    "one_cluster_both": ([0, 0, 0, 0], [3, 3, 3, 3]),
    "one_true_cluster": ([1, 1, 1, 1, 1], [0, 1, 2, 3, 3]),
    "one_pred_cluster": ([0, 1, 2, 3, 3], [2, 2, 2, 2, 2]),
    "all_distinct_both": ([0, 1, 2, 3, 4], [4, 3, 2, 1, 0]),
    "all_distinct_vs_one": ([0, 1, 2, 3, 4], [0, 0, 0, 0, 0]),
    "perfect_match_permuted": ([0, 0, 1, 1, 2, 2, 2], [5, 5, 0, 0, 3, 3, 3]),
    "single_sample": ([3], [2]),
    "two_samples_split": ([0, 0], [0, 1]),
    "unused_label_ids": ([0, 0, 7, 7, 9, 9, 9], [2, 2, 2, 5, 5, 5, 1]),
    "independent": ([0, 0, 1, 1], [0, 1, 0, 1]),
    "singletons_mixed": ([0, 1, 2, 2, 3], [0, 0, 1, 2, 2]),
}


@pytest.mark.parametrize("case", sorted(DEGENERATE))
def test_degenerate_cases_match_sklearn(case):
    target, preds = (torch.tensor(x) for x in DEGENERATE[case])
    nmi_ref, ari_ref = _sklearn(preds, target)
    # Plenty of never-seen label ids: empty rows and columns must not matter.
    for num_true, num_pred in ((10, 10), (int(target.max()) + 1, int(preds.max()) + 1), (50, 7)):
        nmi = PartNMI(num_true, num_pred)
        ari = PartARI(num_true, num_pred)
        nmi.update(preds, target)
        ari.update(preds, target)
        assert abs(nmi.compute().item() - nmi_ref) < TOL, (num_true, num_pred)
        assert abs(ari.compute().item() - ari_ref) < TOL, (num_true, num_pred)


def test_exact_special_values_and_empty_input():
    empty = torch.zeros(0, dtype=torch.long)
    # sklearn: 1.0 for both scores on empty input.
    assert normalized_mutual_info_score([], []) == adjusted_rand_score([], []) == 1.0
    assert part_nmi(empty, empty, 3, 3).item() == part_ari(empty, empty, 3, 3).item() == 1.0
    table = torch.zeros(4, 6, dtype=torch.long)
    table[1, 4], table[3, 0] = 7, 2  # perfect match up to relabeling
    assert nmi_from_contingency(table).item() == pytest.approx(1.0, abs=1e-15)
    assert ari_from_contingency(table).item() == 1.0
    table[1, 0] = 1
    assert ari_from_contingency(table).item() < 1.0


def test_ignore_index():
    preds, target = _labels(5_000, 8, 6, seed=11)
    g = torch.Generator().manual_seed(1)
    ignored = torch.rand(5_000, generator=g) < 0.2
    target_255 = torch.where(ignored, torch.full_like(target, 255), target)
    nmi_ref, ari_ref = _sklearn(preds[~ignored], target[~ignored])
    nmi, ari = PartNMI(8, 6, ignore_index=255), PartARI(8, 6, ignore_index=255)
    nmi.update(preds, target_255)
    ari.update(preds, target_255)
    assert nmi.contingency.sum().item() == int((~ignored).sum())
    assert abs(nmi.compute().item() - nmi_ref) < TOL
    assert abs(ari.compute().item() - ari_ref) < TOL
    # an in-range ignore_index drops that class
    keep = target != 0
    nmi_ref0, _ = _sklearn(preds[keep], target[keep])
    assert abs(part_nmi(preds, target, 8, 6, ignore_index=0).item() - nmi_ref0) < TOL
    # without ignore_index, 255 is out of range
    with pytest.raises(ValueError, match="255"):
        PartNMI(8, 6).update(preds, target_255)


@pytest.mark.parametrize(
    ("preds", "target", "pattern"),
    [
        ([0, 1, 6], [0, 1, 2], r"`preds` contains the label 6, outside the allowed range \[0, 6\)"),
        ([0, -1, 2], [0, 1, 2], r"`preds` contains the label -1, outside the allowed range \[0, 6\)"),
        ([0, 1, 2], [0, 4, 2], r"`target` contains the label 4, outside the allowed range \[0, 4\)"),
    ],
)
def test_out_of_range_labels_raise(preds, target, pattern):
    with pytest.raises(ValueError, match=pattern):
        PartARI(num_true_labels=4, num_pred_labels=6).update(torch.tensor(preds), torch.tensor(target))


def test_bad_inputs_raise():
    metric = PartNMI(4, 4)
    with pytest.raises(ValueError, match=r"same shape.*\(2, 3\).*\(6,\)"):
        metric.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        metric.update(torch.zeros(3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="positive integer"):
        PartARI(0, 3)
    with pytest.raises(ValueError, match="positive integer"):
        PartARI(3, 2.5)


def test_metric_contract_reset_and_forward():
    assert PartNMI.full_state_update is False and PartARI.is_differentiable is False
    assert PartNMI.higher_is_better is True and PartARI.higher_is_better is True
    preds, target = _labels(2_000, 5, 5, seed=5)
    metric = PartARI(5, 5)
    batch_value = metric(preds[:1000], target[:1000])  # forward: score of this batch only
    assert abs(batch_value.item() - _sklearn(preds[:1000], target[:1000])[1]) < TOL
    metric.update(preds[1000:], target[1000:])
    assert abs(metric.compute().item() - _sklearn(preds, target)[1]) < TOL
    metric.reset()
    assert metric.contingency.sum().item() == 0 and metric.contingency.dtype == torch.long
    metric.update(preds[:10], target[:10])
    assert abs(metric.compute().item() - _sklearn(preds[:10], target[:10])[1]) < TOL
    # dtype casts of a parent module leave the integer table alone
    assert torch.nn.ModuleList([metric]).to(torch.float64)[0].contingency.dtype == torch.long


def test_contingency_table_counts():
    preds = torch.tensor([[0, 2], [2, 1]])
    target = torch.tensor([[1, 1], [0, 1]])
    expected = torch.tensor([[0, 0, 1], [1, 1, 1], [0, 0, 0]])
    assert torch.equal(contingency_table(preds, target, 3, 3), expected)
    assert contingency_table(preds, target, 3, 3).dtype == torch.long


# ---------------------------------------------------------------- evaluation protocol


def _quadrant_map(size: int = 8) -> torch.Tensor:
    """(1, 5, size, size): foreground part q wins quadrant q (TL, TR, BL, BR); in BR the
    background (last channel) dominates, with part 3 the best foreground channel."""
    probs = torch.full((1, 5, size, size), 0.01)
    h = size // 2
    probs[0, 0, :h, :h] = 0.9
    probs[0, 1, :h, h:] = 0.9
    probs[0, 2, h:, :h] = 0.9
    probs[0, 3, h:, h:] = 0.3
    probs[0, 4, h:, h:] = 0.6
    probs[0, 4, :h, :h] = 0.05
    return probs


def test_keypoint_part_labels_on_quadrants():
    probs = _quadrant_map(8)  # map 8x8 read from a 64x64 input image
    # one keypoint per quadrant, an invisible one, and one exactly on the border
    keypoints = torch.tensor([[[16.0, 16.0], [48.0, 16.0], [16.0, 48.0], [48.0, 48.0], [1.0, 1.0], [64.0, 64.0]]])
    visible = torch.tensor([[True, True, True, True, False, True]])
    out = keypoint_part_labels(probs, keypoints, visible, image_size=64)
    assert out["pred"].tolist() == [0, 1, 2, 4, 0]  # (64, 64) is outside the map: zero padding, label 0
    assert out["fg_pred"].tolist() == [0, 1, 2, 3, 0]
    assert out["target"].tolist() == [0, 1, 2, 3, 5]
    assert all(v.dtype == torch.long for v in out.values())
    # (height, width) form and visible=None (all keypoints, e.g. CelebA)
    out = keypoint_part_labels(probs, keypoints, None, image_size=(64, 64))
    assert out["target"].tolist() == [0, 1, 2, 3, 4, 5]
    assert out["pred"].tolist() == [0, 1, 2, 4, 0, 0]
    # a missing keypoint stored as NaN is harmless when invisible
    nan_kp = torch.cat([keypoints, torch.full((1, 1, 2), float("nan"))], dim=1)
    out = keypoint_part_labels(probs, nan_kp, torch.cat([visible, torch.tensor([[False]])], 1), 64)
    assert out["target"].tolist() == [0, 1, 2, 3, 5]
    # a rectangular input: x is normalised by the width, y by the height
    rect = keypoint_part_labels(probs, torch.tensor([[[100.0, 10.0]]]), None, image_size=(32, 128))
    assert rect["pred"].tolist() == [1]


def test_keypoint_on_the_right_or_bottom_border_reads_label_0_like_the_authors():
    # The authors read the map with grid_sample's zero padding: x = W or y = H maps past the last
    # pixel of an even-sized map, the sampled vector is all zeros and its argmax is label 0.
    probs = torch.full((1, 4, 8, 8), 0.1)
    probs[0, 2] = 0.9  # foreground part 2 everywhere
    keypoints = torch.tensor([[[64.0, 20.0], [20.0, 48.0], [40.0, 48.0], [63.9, 47.9], [0.0, 0.0], [64.0, 48.0]]])
    out = keypoint_part_labels(probs, keypoints, None, image_size=(48, 64))  # (height, width)
    assert out["pred"].tolist() == [0, 0, 0, 2, 2, 0]
    assert out["fg_pred"].tolist() == [0, 0, 0, 2, 2, 0]
    # float64 maps read the same pixels
    out64 = keypoint_part_labels(probs.double(), keypoints, None, image_size=(48, 64))
    assert out64["pred"].tolist() == [0, 0, 0, 2, 2, 0]


def test_keypoint_part_labels_nearest_pixel():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(3, 6, 16, 16, generator=g)
    keypoints = torch.rand(3, 10, 2, generator=g) * 256  # input 256x256, map 16x16
    out = keypoint_part_labels(probs, keypoints, None, image_size=256)
    cols = (keypoints[..., 0] * 16 / 256).floor().long()
    rows = (keypoints[..., 1] * 16 / 256).floor().long()
    picked = probs[torch.arange(3)[:, None], :, rows, cols]  # (3, 10, 6)
    assert torch.equal(out["pred"], picked.argmax(-1).reshape(-1))
    assert torch.equal(out["fg_pred"], picked[..., :-1].argmax(-1).reshape(-1))


def test_mask_part_labels_resolutions():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(2, 4, 4, 4, generator=g)
    mask = torch.randint(0, 3, (2, 8, 8), generator=g)
    labels = probs.argmax(1)
    at_map = mask_part_labels(probs, mask)  # mask downsampled: pixel (2i, 2j)
    assert torch.equal(at_map["pred"], labels.reshape(-1))
    assert torch.equal(at_map["target"], mask[:, ::2, ::2].reshape(-1))
    at_mask = mask_part_labels(probs, mask[:, None], resolution="mask")  # map upsampled
    up = labels.repeat_interleave(2, 1).repeat_interleave(2, 2)
    assert torch.equal(at_mask["pred"], up.reshape(-1))
    assert torch.equal(at_mask["target"], mask.reshape(-1))
    same = mask_part_labels(probs, mask[:, :4, :4])
    assert same["pred"].numel() == 2 * 16


def _pdiscoformer_fg_bg_iou(grid_maps, masks, num_parts, ignore_index=None):
    """Re-typed from PDiscoFormer's engine/eval_fg_bg.py (FgBgIoU.calculate_iou): per batch, the
    assignment map upsampled bilinearly (align_corners=True) to the mask size, argmax, any part ->
    1 and the background channel -> 0; BinaryJaccardIndex on it and on its inverse, accumulated
    over the batches."""
    from torchmetrics.classification import BinaryJaccardIndex

    metric_fg, metric_bg = BinaryJaccardIndex(ignore_index=ignore_index), BinaryJaccardIndex(ignore_index=ignore_index)
    for assign, mask in zip(grid_maps, masks):
        map_argmax = torch.nn.functional.interpolate(assign, size=(mask.shape[-2], mask.shape[-1]),
                                                     mode="bilinear", align_corners=True).argmax(dim=1)
        map_argmax[map_argmax != num_parts] = 1
        map_argmax[map_argmax == num_parts] = 0
        mask = mask.float()
        map_argmax = map_argmax.float()
        inv_mask = torch.where(mask == ignore_index, mask, 1 - mask) if ignore_index is not None else 1 - mask
        metric_fg(map_argmax, mask)
        metric_bg(1 - map_argmax, inv_mask)
    return metric_fg.compute().item(), metric_bg.compute().item()


@pytest.mark.parametrize("ignore_index", [None, 255])
def test_foreground_iou_as_pdiscoformer_computes_it(ignore_index):
    """Default fg/bg IoU: the patch-grid map upsampled to the mask size (not the evaluation map)."""
    g = torch.Generator().manual_seed(7)
    k, labels = 4, 6  # K=4 parts + background; mask labels 0..4 parts, 5 background
    metric = MaskPartMetrics(num_mask_labels=labels, num_parts=k, ignore_index=ignore_index)
    grids, binary_masks = [], []
    for _ in range(3):
        grid = torch.softmax(3 * torch.randn(5, k + 1, 7, 7, generator=g), dim=1)
        eval_map = torch.softmax(torch.randn(5, k + 1, 16, 16, generator=g), dim=1)  # not used by the IoU
        mask = torch.randint(0, labels, (5, 20, 22), generator=g)
        mask[:, :6][torch.rand(5, 6, 22, generator=g) < 0.7] = labels - 1  # more background on top
        binary = (mask != labels - 1).long()
        if ignore_index is not None:
            mask[:, -2:] = ignore_index
            binary[:, -2:] = ignore_index
        metric.update(eval_map, mask, grid)
        grids.append(grid)
        binary_masks.append(binary)
    fg, bg = _pdiscoformer_fg_bg_iou(grids, binary_masks, k, ignore_index)
    out = metric.compute()
    assert abs(out["fg_iou"].item() / 100 - fg) < 1e-5 and abs(out["bg_iou"].item() / 100 - bg) < 1e-5
    assert 0.05 < fg < 0.95 and 0.05 < bg < 0.95  # neither protocol detail is trivially satisfied
    # the evaluation-map protocol gives another value on the same data (kept for MPAE's own pixels)
    at_map = MaskPartMetrics(num_mask_labels=labels, num_parts=k, fg_iou_protocol="eval_map")
    at_map.update(grids[0], torch.randint(0, labels - 1, (5, 20, 22), generator=g))
    assert at_map.compute()["fg_iou"].item() != out["fg_iou"].item()


def test_foreground_mask_metrics_as_pdiscoformer_computes_it_on_cub():
    """Binary object masks (CUB's segmentations): the grid map upsampled to the mask, as eval_fg_bg.py."""
    g = torch.Generator().manual_seed(11)
    k = 3
    metric = ForegroundMaskMetrics(num_parts=k)
    grids, masks = [], []
    for batch in (4, 1, 3):  # uneven batches: the counts are pooled, not averaged per batch
        grid = torch.softmax(3 * torch.randn(batch, k + 1, 5, 5, generator=g), dim=1)
        mask = torch.rand(batch, 23, 23, generator=g) < 0.4
        mask[:, 8:15, 6:18] = True  # a bird in the middle
        metric.update(grid, mask if batch != 1 else mask.long()[:, None])  # bool, or 0/1 with a channel axis
        grids.append(grid)
        masks.append(mask)
    fg, bg = _pdiscoformer_fg_bg_iou(grids, masks, k)
    out = metric.compute()
    assert set(out) == {"fg_iou", "bg_iou"} and out["fg_iou"].dtype == torch.float64
    assert abs(out["fg_iou"].item() / 100 - fg) < 1e-5 and abs(out["bg_iou"].item() / 100 - bg) < 1e-5
    assert 0.05 < fg < 0.95 and 0.05 < bg < 0.95
    assert metric.contingency.sum() == sum(m.numel() for m in masks)
    with pytest.raises(ValueError, match=r"binary foreground mask \(0/1\), got values up to 255; threshold"):
        metric.update(grids[0], masks[0].long() * 255)
    with pytest.raises(ValueError, match=rf"part_probs has {k + 1} channels but num_parts={k + 1}"):
        ForegroundMaskMetrics(num_parts=k + 1).update(grids[0], masks[0])
    with pytest.raises(ValueError, match=r"`fg_mask` must have shape \(B, H, W\) with B=4"):
        metric.update(grids[0], masks[1])


def test_upsampled_foreground_uses_align_corners():
    probs = torch.zeros(1, 3, 2, 2)
    probs[0, 2] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])  # background at the top-left corner only
    probs[0, 0] = torch.tensor([[0.0, 2.5], [2.5, 2.5]])
    fg = upsampled_foreground(probs, (4, 4))
    # align_corners=True: output pixel 1 sits 1/3 of the way to the next map cell (background
    # 2/3 < part 2.5/3), so only the corner pixel is background; with align_corners=False it
    # would sit 1/4 of the way (background 3/4 > part 2.5/4) and three pixels would be.
    expected = torch.ones(1, 4, 4, dtype=torch.bool)
    expected[0, 0, 0] = False
    assert torch.equal(fg, expected)
    with pytest.raises(ValueError, match="fg_iou_protocol"):
        MaskPartMetrics(3, 2, fg_iou_protocol="pdiscoformer")


def test_part_count_on_hand_made_maps():
    labels = torch.full((3, 4, 4), 4)  # K=4 foreground parts + background (channel 4)
    labels[0, 0, 0], labels[0, 3, 3] = 0, 2  # parts {0, 2}
    labels[2, 0, :] = torch.tensor([0, 1, 2, 3])  # all four; image 1: background only
    probs = torch.nn.functional.one_hot(labels, 5).permute(0, 3, 1, 2).float()
    assert count_foreground_parts(probs).tolist() == [2, 0, 4]
    metric = PartCount()
    metric.update(probs[:2])
    metric.update(probs[2:])
    assert metric.compute().item() == 2.0
    metric.reset()
    metric.update(probs[2:])
    assert metric.compute().item() == 4.0


def test_keypoint_part_metrics_match_sklearn():
    g = torch.Generator().manual_seed(0)
    metric = KeypointPartMetrics(num_keypoints=15, num_parts=8)  # K=8: maps of K+1=9 channels
    all_labels = {"pred": [], "fg_pred": [], "target": []}
    for _ in range(5):
        probs = torch.rand(6, 9, 32, 32, generator=g)
        probs[:, -1] *= 1.5  # a dominant background, so fg-only predictions differ
        keypoints = torch.rand(6, 15, 2, generator=g) * 128
        visible = torch.rand(6, 15, generator=g) < 0.8
        metric.update(probs, keypoints, visible, 128)
        for key, value in keypoint_part_labels(probs, keypoints, visible, 128).items():
            all_labels[key].append(value)
    cat = {k: torch.cat(v) for k, v in all_labels.items()}
    nmi, ari = _sklearn(cat["pred"], cat["target"])
    fg_nmi, fg_ari = _sklearn(cat["fg_pred"], cat["target"])
    out = metric.compute()
    assert set(out) == {"nmi", "ari", "fg_nmi", "fg_ari", "parts_per_image"}
    for key, ref in (("nmi", nmi), ("ari", ari), ("fg_nmi", fg_nmi), ("fg_ari", fg_ari)):
        assert abs(out[key].item() - 100 * ref) < 1e-7, key
    assert out["nmi"].item() != out["fg_nmi"].item()
    assert out["parts_per_image"].item() == 8.0
    metric.reset()
    assert metric.contingency.sum() == 0 and metric.fg_contingency.sum() == 0
    with pytest.raises(ValueError, match=r"has 5 channels but num_parts=8 expects K\+1=9"):
        metric.update(torch.rand(1, 5, 8, 8), torch.zeros(1, 15, 2), None, 128)


def test_mask_part_metrics_match_sklearn():
    g = torch.Generator().manual_seed(1)
    # maps of K+1=5 channels; foreground IoU on the pixels NMI/ARI are computed on
    metric = MaskPartMetrics(num_mask_labels=6, num_parts=4, ignore_index=255, fg_iou_protocol="eval_map")
    preds, targets = [], []
    for _ in range(3):
        mask = torch.randint(0, 6, (4, 32, 32), generator=g)
        mask[:, :3] = 255
        probs = torch.rand(4, 5, 16, 16, generator=g)
        probs[:, 0] += (mask[:, ::2, ::2] % 3 == 0).float()  # structured
        metric.update(probs, mask)
        labels = mask_part_labels(probs, mask)
        keep = labels["target"] != 255
        preds.append(labels["pred"][keep])
        targets.append(labels["target"][keep])
    nmi, ari = _sklearn(torch.cat(preds), torch.cat(targets))
    out = metric.compute()
    assert abs(out["nmi"].item() - 100 * nmi) < 1e-7
    assert abs(out["ari"].item() - 100 * ari) < 1e-7
    # foreground: any of parts 0..3 (background 4) against any of labels 0..4 (background 5)
    pred, target = torch.cat(preds), torch.cat(targets)
    assert abs(out["fg_iou"].item() - 100 * jaccard_score(target < 5, pred < 4)) < 1e-7
    assert abs(out["bg_iou"].item() - 100 * jaccard_score(target == 5, pred == 4)) < 1e-7


def test_num_parts_is_k_and_a_wrong_k_names_both_values():
    """``num_parts`` is K (foreground parts), as ``MPAE(num_parts=K)``; the maps have K+1 channels."""
    g = torch.Generator().manual_seed(2)
    probs = torch.rand(2, 5, 8, 8, generator=g)  # K=4 parts + background
    keypoint, mask = KeypointPartMetrics(num_keypoints=3, num_parts=4), MaskPartMetrics(num_mask_labels=6, num_parts=4)
    keypoint.update(probs, torch.rand(2, 3, 2, generator=g) * 32, None, 32)
    mask.update(probs, torch.randint(0, 6, (2, 8, 8), generator=g))
    assert (keypoint.num_parts, keypoint.num_channels, mask.num_parts, mask.num_channels) == (4, 5, 4, 5)
    assert keypoint.contingency.shape == (3, 5) and keypoint.fg_contingency.shape == (3, 4)
    assert mask.contingency.shape == (6, 5) and mask.contingency.sum() == 2 * 64
    # K+1 passed as num_parts (the channel count): refused, with the value to pass instead
    refused = r"^part_probs has 5 channels but num_parts=5 expects K\+1=6 .*pass num_parts=4$"
    with pytest.raises(ValueError, match=refused):
        KeypointPartMetrics(3, 5).update(probs, torch.rand(2, 3, 2) * 32, None, 32)
    with pytest.raises(ValueError, match=refused):
        MaskPartMetrics(6, 5).update(probs, torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"^part_probs has 5 channels but num_parts=2 expects K\+1=3 \(K foreground"):
        MaskPartMetrics(6, 2).update(probs, torch.zeros(2, 8, 8, dtype=torch.long))
    for bad in (0, -1, True, 4.0):
        with pytest.raises(ValueError, match="num_parts"):
            KeypointPartMetrics(3, bad)
    with pytest.raises(ValueError, match=r"num_parts.*>= 1, got 0"):
        MaskPartMetrics(6, 0)


def test_metrics_take_the_models_num_parts(tiny_demo_args):
    """The model's own ``num_parts`` works unchanged for every metric; the old K+1 is refused by value."""
    from mpae_lightning.cli import MPAECLI
    from mpae_lightning.metrics import KeypointRegression

    cli = MPAECLI(args=tiny_demo_args, run=False)
    module, dm = cli.model.eval(), cli.datamodule
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        probs = module(batch["image"])
    k = module.model.num_parts
    assert probs.shape[1] == k + 1
    size = module.model.image_size
    keypoint = KeypointPartMetrics(dm.num_keypoints, k)
    keypoint.update(probs, batch["keypoints"], batch["visible"], size)
    labels = keypoint_part_labels(probs, batch["keypoints"], batch["visible"], size)
    nmi, ari = _sklearn(labels["pred"], labels["target"])
    out = keypoint.compute()
    assert abs(out["nmi"].item() - 100 * nmi) < 1e-7 and abs(out["ari"].item() - 100 * ari) < 1e-7
    mask = MaskPartMetrics(dm.num_mask_labels, k)
    mask.update(probs, batch["mask"])
    assert mask.contingency.sum() == probs.shape[0] * probs.shape[2] * probs.shape[3]
    kpr = KeypointRegression(k, dm.num_keypoints, normalization="image")
    kpr.update(probs, batch["keypoints"], batch["visible"], size, split="fit")
    assert kpr.fit_aa.shape[1] == 2 * k
    message = rf"part_probs has {k + 1} channels but num_parts={k + 1} expects K\+1={k + 2}.*num_parts={k}"
    with pytest.raises(ValueError, match=message):
        KeypointPartMetrics(dm.num_keypoints, k + 1).update(probs, batch["keypoints"], batch["visible"], size)
    with pytest.raises(ValueError, match=message):
        MaskPartMetrics(dm.num_mask_labels, k + 1).update(probs, batch["mask"])
    with pytest.raises(ValueError, match=message):
        KeypointRegression(k + 1, dm.num_keypoints, normalization="image").update(
            probs, batch["keypoints"], batch["visible"], size, split="fit"
        )


def test_foreground_iou_against_sklearn_and_edge_cases():
    g = torch.Generator().manual_seed(3)
    target = torch.randint(0, 4, (5000,), generator=g)
    preds = torch.where(torch.rand(5000, generator=g) < 0.7, target % 3, torch.randint(0, 3, (5000,), generator=g))
    target[:100] = 99  # ignored
    keep = target != 99
    expected = jaccard_score((target[keep] != 3).numpy(), (preds[keep] != 2).numpy())
    assert abs(foreground_iou(preds, target, 4, 3, ignore_index=99).item() - expected) < 1e-12
    metric = ForegroundIoU(4, 3, ignore_index=99)
    for p, t in zip(preds.split(700), target.split(700)):
        metric.update(p, t)
    assert abs(metric.compute().item() - expected) < 1e-12
    # a part map that is all background never overlaps: IoU 0, and an empty union gives 0 too
    assert foreground_iou(torch.full((6,), 2), torch.tensor([0, 1, 3, 3, 0, 3]), 4, 3).item() == 0.0
    empty = foreground_iou_from_contingency(torch.zeros(4, 3, dtype=torch.long))
    assert empty["fg_iou"].item() == 0.0 and empty["bg_iou"].item() == 0.0
    perfect = foreground_iou(torch.tensor([0, 1, 2, 2]), torch.tensor([2, 0, 3, 3]), 4, 3)
    assert perfect.item() == 1.0  # which part matches which label does not matter


def test_metrics_as_lightning_children():
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Conv2d(3, 5, 1)
            self.keypoint_metrics = KeypointPartMetrics(num_keypoints=4, num_parts=4)
            self.mask_metrics = MaskPartMetrics(num_mask_labels=3, num_parts=4)

        def validation_step(self, batch, batch_idx):
            image, keypoints, visible, mask = batch
            probs = self.net(image).softmax(1)
            self.keypoint_metrics.update(probs, keypoints, visible, image.shape[-1])
            self.mask_metrics.update(probs, mask)

        def on_validation_epoch_end(self):
            values = self.keypoint_metrics.compute()
            values.update({f"mask_{k}": v for k, v in self.mask_metrics.compute().items()})
            self.log_dict({k: v.float() for k, v in values.items()})
            self.keypoint_metrics.reset()
            self.mask_metrics.reset()

    g = torch.Generator().manual_seed(0)
    data = [
        (
            torch.randn(2, 3, 8, 8, generator=g),
            torch.rand(2, 4, 2, generator=g) * 8,
            torch.ones(2, 4, dtype=torch.bool),
            torch.randint(0, 3, (2, 8, 8), generator=g),
        )
        for _ in range(3)
    ]
    module = Module()
    assert {"keypoint_metrics", "mask_metrics"} <= dict(module.named_children()).keys()
    module = module.to(torch.device("cpu"))
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.validate(module, dataloaders=torch.utils.data.DataLoader(data, batch_size=None), verbose=False)
    logged = trainer.callback_metrics
    assert {"nmi", "ari", "fg_nmi", "fg_ari", "mask_nmi", "mask_ari"} <= logged.keys()

    with torch.no_grad():
        labels = [keypoint_part_labels(module.net(b[0]).softmax(1), b[1], b[2], 8) for b in data]
    nmi, _ = _sklearn(torch.cat([x["pred"] for x in labels]), torch.cat([x["target"] for x in labels]))
    assert logged["nmi"].item() == pytest.approx(100 * nmi, abs=1e-4)
    assert module.keypoint_metrics.contingency.sum() == 0  # reset after the epoch



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_in_deterministic_mode():
    device = torch.device("cuda")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)  # bincount without weights is allowed
    try:
        preds, target = _labels(1_000_000, 51, 41, seed=4)
        nmi_ref, ari_ref = _sklearn(preds, target)
        nmi, ari = PartNMI(51, 41).to(device), PartARI(51, 41).to(device)
        for p, t in zip(preds.split(100_000), target.split(100_000)):
            nmi.update(p.to(device), t.to(device))
            ari.update(p.to(device), t.to(device))
        assert nmi.contingency.device.type == "cuda"
        assert abs(nmi.compute().item() - nmi_ref) < TOL
        assert abs(ari.compute().item() - ari_ref) < TOL

        g = torch.Generator().manual_seed(0)
        probs = torch.rand(4, 9, 128, 128, generator=g)
        keypoints = torch.randint(0, 257, (4, 15, 2), generator=g).float()  # many exact ties
        visible = torch.rand(4, 15, generator=g) < 0.8
        mask = torch.randint(0, 7, (4, 256, 256), generator=g)
        cpu_kp = keypoint_part_labels(probs, keypoints, visible, 256)
        gpu_kp = keypoint_part_labels(probs.to(device), keypoints.to(device), visible.to(device), 256)
        for key in cpu_kp:
            assert torch.equal(cpu_kp[key], gpu_kp[key].cpu()), key
        kp_metric = KeypointPartMetrics(15, 8).to(device)
        kp_metric.update(probs.to(device).half(), keypoints.to(device), visible.to(device), 256)
        mask_metric = MaskPartMetrics(7, 8).to(device)
        mask_metric.update(probs.to(device), mask.to(device))
        cpu_mask = MaskPartMetrics(7, 8)
        cpu_mask.update(probs, mask)
        assert torch.equal(mask_metric.contingency.cpu(), cpu_mask.contingency)
        assert kp_metric.compute()["nmi"].device.type == "cuda"
    finally:
        torch.use_deterministic_algorithms(previous)
