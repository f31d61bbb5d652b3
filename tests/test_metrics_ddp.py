"""Two CPU processes (gloo), each updating with its share of the data: every rank's
``compute()`` must equal scikit-learn on all the data."""

from __future__ import annotations

import json
import multiprocessing
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mpae_lightning.metrics import (
    KeypointPartMetrics,
    KeypointRegression,
    MaskPartMetrics,
    PartARI,
    PartCount,
    PartNMI,
    count_foreground_parts,
    keypoint_part_labels,
    keypoint_regression_error,
    mask_part_labels,
    part_centroids,
)

WORLD_SIZE = 2
TIMEOUT_S = 120
NUM_TRUE, NUM_PRED = 51, 41
NUM_KEYPOINTS, NUM_PARTS, NUM_MASK_LABELS = 15, 8, 7  # NUM_PARTS = K; maps have K+1 channels


def _data() -> dict[str, torch.Tensor]:
    """The whole evaluation set, identical in every process."""
    g = torch.Generator().manual_seed(0)
    n = 200_000  # beyond the int64 pair-product overflow of torchmetrics' ARI
    target = torch.randint(0, NUM_TRUE, (n,), generator=g)
    preds = torch.where(
        torch.rand(n, generator=g) < 0.6,
        (target * 7) % NUM_PRED,
        torch.randint(0, NUM_PRED, (n,), generator=g),
    )
    images = 24
    probs = torch.rand(images, NUM_PARTS + 1, 16, 16, generator=g)
    probs[:, -1] *= 1.3
    keypoints = torch.rand(images, NUM_KEYPOINTS, 2, generator=g) * 64
    visible = torch.rand(images, NUM_KEYPOINTS, generator=g) < 0.8
    mask = torch.randint(0, NUM_MASK_LABELS, (images, 32, 32), generator=g)
    mask[:, :2] = 255
    return dict(preds=preds, target=target, probs=probs, keypoints=keypoints, visible=visible, mask=mask)


def _shard(x: torch.Tensor, rank: int) -> torch.Tensor:
    # Uneven shares (60% / 40%): every sample is seen by exactly one rank.
    cut = int(0.6 * x.shape[0])
    return x[:cut] if rank == 0 else x[cut:]


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        data = {k: _shard(v, rank) for k, v in _data().items()}
        nmi, ari = PartNMI(NUM_TRUE, NUM_PRED), PartARI(NUM_TRUE, NUM_PRED)
        for p, t in zip(data["preds"].split(7_000), data["target"].split(7_000)):
            nmi.update(p, t)
            ari.update(p, t)
        keypoint = KeypointPartMetrics(NUM_KEYPOINTS, NUM_PARTS)
        mask = MaskPartMetrics(NUM_MASK_LABELS, NUM_PARTS, ignore_index=255)
        count = PartCount()
        for i in range(0, data["probs"].shape[0], 5):
            probs = data["probs"][i : i + 5]
            keypoint.update(probs, data["keypoints"][i : i + 5], data["visible"][i : i + 5], 64)
            mask.update(probs, data["mask"][i : i + 5])
            count.update(probs)
        # KPR: fitted on each rank's share of the images, scored on each rank's share
        kpr = KeypointRegression(NUM_PARTS, NUM_KEYPOINTS, normalization="image")
        for split in ("fit", "eval"):
            if split == "eval":
                kpr.fit()
            for i in range(0, data["probs"].shape[0], 5):
                s = slice(i, i + 5)
                kpr.update(data["probs"][s], data["keypoints"][s], data["visible"][s], 64, split=split)
        result = {"nmi": nmi.compute().item(), "ari": ari.compute().item(), "count": count.compute().item(),
                  "kpr": kpr.compute().item()}
        result.update({f"kp_{k}": v.item() for k, v in keypoint.compute().items()})
        result.update({f"mask_{k}": v.item() for k, v in mask.compute().items()})
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _expected() -> dict[str, float]:
    from sklearn.metrics import adjusted_rand_score, jaccard_score, normalized_mutual_info_score

    data = _data()

    def scores(preds: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
        t, p = target.numpy(), preds.numpy()
        return normalized_mutual_info_score(t, p), adjusted_rand_score(t, p)

    nmi, ari = scores(data["preds"], data["target"])
    kp = keypoint_part_labels(data["probs"], data["keypoints"], data["visible"], 64)
    kp_nmi, kp_ari = scores(kp["pred"], kp["target"])
    kp_fg_nmi, kp_fg_ari = scores(kp["fg_pred"], kp["target"])
    px = mask_part_labels(data["probs"], data["mask"])
    keep = px["target"] != 255
    mask_nmi, mask_ari = scores(px["pred"][keep], px["target"][keep])
    # foreground IoU as PDiscoFormer: the map upsampled bilinearly (align_corners=True) to the mask, argmax
    up = torch.nn.functional.interpolate(data["probs"], size=(32, 32), mode="bilinear", align_corners=True)
    in_mask = data["mask"] != 255
    pred_fg, true_fg = up.argmax(1)[in_mask] != NUM_PARTS, data["mask"][in_mask] != NUM_MASK_LABELS - 1
    fg_iou = jaccard_score(true_fg.numpy(), pred_fg.numpy())
    bg_iou = jaccard_score((~true_fg).numpy(), (~pred_fg).numpy())
    count = count_foreground_parts(data["probs"]).double().mean().item()
    centroids, active = part_centroids(data["probs"], 64)
    normalised = (centroids / 64, active, data["keypoints"].double() / 64, data["visible"])
    kpr = keypoint_regression_error(*normalised, *normalised).item()
    return {
        "nmi": nmi,
        "ari": ari,
        "count": count,
        "kpr": kpr,
        "kp_nmi": 100 * kp_nmi,
        "kp_ari": 100 * kp_ari,
        "kp_fg_nmi": 100 * kp_fg_nmi,
        "kp_fg_ari": 100 * kp_fg_ari,
        "kp_parts_per_image": count,
        "mask_nmi": 100 * mask_nmi,
        "mask_ari": 100 * mask_ari,
        "mask_fg_iou": 100 * fg_iou,
        "mask_bg_iou": 100 * bg_iou,
        "mask_parts_per_image": count,
    }


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gloo_equals_sklearn_on_all_data(tmp_path):
    # A fork server imports torch/torchmetrics once and forks both workers from a
    # process that has run no OpenMP code (fork-safe, unlike forking pytest).
    start_method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if start_method == "forkserver":
        multiprocessing.get_context("forkserver").set_forkserver_preload([_worker.__module__])
    context = mp.start_processes(
        _worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD_SIZE, join=False, start_method=start_method
    )
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not context.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                pytest.fail(f"DDP workers did not finish within {TIMEOUT_S} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)

    expected = _expected()
    for rank in range(WORLD_SIZE):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result.keys() == expected.keys()
        for key, ref in expected.items():
            tol = 1e-7 if key.startswith(("kp_", "mask_", "kpr")) else 1e-9  # percent scores: 1e-9 x 100
            assert abs(result[key] - ref) < tol, (rank, key, result[key], ref)
