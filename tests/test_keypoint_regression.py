"""Keypoint regression error (KPR) against a direct scikit-learn computation of PDiscoNet's protocol."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import StandardScaler

from mpae_lightning.metrics import (
    KeypointRegression,
    isotropic_scale,
    keypoint_frame,
    keypoint_regression_error,
    part_centroids,
)


def _sklearn_kpr(fit, ev) -> float:
    """PDiscoFormer's eval_kpr on normalised coordinates: one regression per keypoint."""
    error, n_valid = 0.0, 0
    num_keypoints = fit["keypoints"].shape[1]
    for i in range(num_keypoints):
        fs, es = fit["visible"][:, i].numpy(), ev["visible"][:, i].numpy()
        fx = fit["centroids"].reshape(len(fs), -1).numpy()[fs]
        ex = ev["centroids"].reshape(len(es), -1).numpy()[es]
        fy, ey = fit["keypoints"][:, i].numpy()[fs], ev["keypoints"][:, i].numpy()[es]
        fa = fit["active"].repeat_interleave(2, dim=1).numpy()[fs]
        ea = ev["active"].repeat_interleave(2, dim=1).numpy()[es]
        sx, sy = StandardScaler().fit(fx), StandardScaler().fit(fy)
        reg = LinearRegression(fit_intercept=False).fit(np.where(fa, sx.transform(fx), 0), sy.transform(fy))
        pred = sy.inverse_transform(reg.predict(np.where(ea, sx.transform(ex), 0)))
        error += np.sqrt(((pred - ey) ** 2).sum(axis=1)).mean() * len(ey)
        n_valid += len(ey)
    return 100 * error / n_valid


def _split(n, parts=4, keypoints=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centroids = torch.rand(n, parts, 2, generator=g, dtype=torch.float64)
    weights = torch.randn(parts * 2, keypoints * 2, generator=g, dtype=torch.float64)
    kp = (centroids.reshape(n, -1) @ weights * 0.3).reshape(n, keypoints, 2)
    kp = kp + 0.05 * torch.randn(kp.shape, generator=g, dtype=torch.float64)
    active = torch.rand(n, parts, generator=g) < 0.8
    visible = torch.rand(n, keypoints, generator=g) < 0.85
    return {"centroids": centroids, "active": active, "keypoints": kp, "visible": visible}


def test_functional_matches_sklearn_per_keypoint_regression():
    fit, ev = _split(80, seed=0), _split(50, seed=1)
    ev["centroids"][0, 1] = 7.0  # far from the fitting data: the linear map still applies
    ours = keypoint_regression_error(*fit.values(), *ev.values())
    assert abs(ours.item() - _sklearn_kpr(fit, ev)) < 1e-8 * max(1.0, _sklearn_kpr(fit, ev))


def test_part_never_active_and_constant_coordinate_match_sklearn():
    fit, ev = _split(40, seed=2), _split(30, seed=3)
    fit["active"][:, 2] = False  # a part never present while fitting: its weights are the min-norm 0
    fit["centroids"][:, 3, 0] = 0.5  # zero variance: StandardScaler keeps scale 1
    ev["centroids"][:, 3, 0] = 0.5
    ours = keypoint_regression_error(*fit.values(), *ev.values()).item()
    assert abs(ours - _sklearn_kpr(fit, ev)) < 1e-7 * max(1.0, ours)


def _probs_from_centroids(centroids: torch.Tensor, size: int = 16) -> torch.Tensor:
    """Part maps whose foreground channels are Gaussian bumps at the given (x, y) map positions."""
    n, k = centroids.shape[:2]
    grid = torch.arange(size, dtype=torch.float64)
    gx = torch.exp(-((grid - centroids[..., 0, None]) ** 2) / 2.0)
    gy = torch.exp(-((grid - centroids[..., 1, None]) ** 2) / 2.0)
    fg = gy[..., :, None] * gx[..., None, :]  # (n, k, size, size)
    return torch.cat([fg, torch.full((n, 1, size, size), 0.2, dtype=torch.float64)], dim=1)


def test_part_centroids_are_probability_weighted_pixel_indices():
    probs = torch.zeros(1, 3, 4, 8)
    probs[0, 0, 1, 2] = 1.0
    probs[0, 0, 3, 6] = 1.0  # centroid at map (x, y) = (4, 2)
    probs[0, 1] = 0.3  # uniform, never above 0.5
    probs[0, 2] = 0.1
    centroids, active = part_centroids(probs, (8, 32))  # input H=8, W=32: x scaled by 4, y by 2
    assert torch.allclose(centroids[0, 0], torch.tensor([16.0, 4.0], dtype=torch.float64))
    assert torch.allclose(centroids[0, 1], torch.tensor([3.5 * 4, 1.5 * 2], dtype=torch.float64))
    assert active.tolist() == [[True, False]]


def test_frames():
    kp = torch.tensor([[[10.0, 20.0], [13.0, 24.0], [0.0, 0.0]]])
    origin, scale = keypoint_frame(kp, 64, "interocular")
    assert origin.tolist() == [[0.0, 0.0]] and scale.tolist() == [[5.0, 5.0]]
    origin, scale = keypoint_frame(kp, (32, 64), "image")
    assert scale.tolist() == [[64.0, 32.0]]
    origin, scale = keypoint_frame(kp, 64, "bbox", boxes=torch.tensor([[4.0, 8.0, 20.0, 40.0]]))
    assert origin.tolist() == [[4.0, 8.0]] and scale.tolist() == [[20.0, 40.0]]
    with pytest.raises(ValueError, match="boxes"):
        keypoint_frame(kp, 64, "bbox")


def test_metric_in_batches_equals_the_direct_computation():
    g = torch.Generator().manual_seed(5)
    size, n_fit, n_eval, parts, kps = 16, 48, 36, 3, 2
    data = {}
    for split, n in (("fit", n_fit), ("eval", n_eval)):
        map_centroids = torch.rand(n, parts, 2, generator=g, dtype=torch.float64) * (size - 1)
        probs = _probs_from_centroids(map_centroids, size)
        probs[: n // 4, 1] *= 0.3  # part 1 absent from a quarter of the images
        boxes = torch.cat([torch.rand(n, 2, generator=g) * 10, 20 + torch.rand(n, 2, generator=g) * 20], 1).double()
        kp = map_centroids[:, :kps] * 4 + torch.randn(n, kps, 2, generator=g, dtype=torch.float64)
        data[split] = dict(probs=probs, kp=kp, visible=torch.rand(n, kps, generator=g) < 0.9, boxes=boxes)
    metric = KeypointRegression(num_parts=parts, num_keypoints=kps, normalization="bbox")
    for split in ("fit", "eval"):
        if split == "eval":
            metric.fit()
        d = data[split]
        for i in range(0, d["probs"].shape[0], 10):
            s = slice(i, i + 10)
            metric.update(d["probs"][s], d["kp"][s], d["visible"][s], 64, boxes=d["boxes"][s], split=split)
    direct = {}
    for split in ("fit", "eval"):
        d = data[split]
        centroids, active = part_centroids(d["probs"], 64)
        origin, scale = d["boxes"][:, None, :2], d["boxes"][:, None, 2:]
        direct[split] = {"centroids": (centroids - origin) / scale, "active": active,
                         "keypoints": (d["kp"] - origin) / scale, "visible": d["visible"]}
    expected = _sklearn_kpr(direct["fit"], direct["eval"])
    assert abs(metric.compute().item() - expected) < 1e-8 * expected
    assert not direct["fit"]["active"][: n_fit // 4, 1].any()
    metric.reset()  # forgets the fitted regression too
    with pytest.raises(RuntimeError, match="fit"), pytest.warns(UserWarning, match="before the ``update``"):
        metric.compute()


def test_misuse_is_reported():
    metric = KeypointRegression(num_parts=2, num_keypoints=2, normalization="image")
    probs, kp = torch.rand(2, 3, 8, 8), torch.rand(2, 2, 2) * 32  # K=2: 3 channels
    with pytest.raises(RuntimeError, match="fit"):
        metric.update(probs, kp, None, 32)
    with pytest.raises(ValueError, match="visible in no fitting image"):
        metric.update(probs, kp, torch.tensor([[True, False], [True, False]]), 32, split="fit")
        metric.fit()
    with pytest.raises(ValueError, match=r"has 3 channels but num_parts=5 expects K\+1=6"):
        KeypointRegression(num_parts=5, num_keypoints=2).update(probs, kp, None, 32, split="fit")
    with pytest.raises(ValueError, match=r"has 3 channels but num_parts=3 expects K\+1=4.*pass num_parts=2"):
        KeypointRegression(num_parts=3, num_keypoints=2).update(probs, kp, None, 32, split="fit")  # K+1 passed
    with pytest.raises(ValueError, match=r"num_parts.*>= 1, got 0"):
        KeypointRegression(num_parts=0, num_keypoints=2)
    with pytest.raises(ValueError, match="normalization"):
        KeypointRegression(num_parts=2, num_keypoints=2, normalization="box")


@pytest.mark.parametrize("centroids", ["grid", "eval_map"])
def test_callback_reports_kpr_at_test_time(tiny_demo_args, centroids):
    """`mpae test` with the callback: fitted on the training images, scored on the test split, with
    centroids from the native patch grid (default, as the peers) or from the evaluation map."""
    from lightning.pytorch import Trainer

    from mpae_lightning.callbacks import KeypointRegressionEvaluation
    from mpae_lightning.cli import MPAECLI

    cli = MPAECLI(args=tiny_demo_args, run=False)
    module, dm = cli.model, cli.datamodule
    callback = KeypointRegressionEvaluation(normalization="image", centroids=centroids)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=[callback])
    logged = trainer.test(module, datamodule=dm, verbose=False)[0]

    module.eval()
    direct = {}
    with torch.no_grad():
        for split, dataset in (("fit", dm.build_train_eval_dataset()), ("eval", dm.test_dataset)):
            batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
            grid_side = module.model.grid_size[1]
            if centroids == "grid":
                maps = module.model.predict_parts(batch["image"], scale_factor=1)
                assert maps.shape[-1] == grid_side
            else:
                maps = module(batch["image"])
                assert maps.shape[-1] == round(grid_side * module.model.eval_scale_factor)
            centroids_xy, active = part_centroids(maps, 64)
            direct[split] = (centroids_xy / 64, active, batch["keypoints"].double() / 64, batch["visible"])
    expected = keypoint_regression_error(*direct["fit"], *direct["eval"]).item()
    assert abs(logged["test/keypoint_regression_error"] - expected) < 1e-6 * expected
    assert {"test/keypoint_nmi", "test/nmi"} & set(logged)  # the usual scores are still there


def test_callback_is_opted_in_from_the_command_line(tiny_demo_args):
    from mpae_lightning.callbacks import KeypointRegressionEvaluation
    from mpae_lightning.cli import MPAECLI

    cli = MPAECLI(args=[*tiny_demo_args, "--trainer.callbacks+=mpae_lightning.callbacks.KeypointRegressionEvaluation",
                        "--trainer.callbacks.normalization=image"], run=False)
    found = [c for c in cli.trainer.callbacks if isinstance(c, KeypointRegressionEvaluation)]
    assert len(found) == 1 and found[0].normalization == "image"


def test_callback_picks_the_papers_normalisation():
    from types import SimpleNamespace

    from mpae_lightning.callbacks import KeypointRegressionEvaluation
    from mpae_lightning.data import CelebADataModule

    auto = KeypointRegressionEvaluation()
    with_boxes, without = [{"box": torch.zeros(4)}], [{"keypoints": torch.zeros(15, 2)}]
    assert auto._normalization(SimpleNamespace(), with_boxes) == "bbox"  # CUB with bounding_boxes.txt
    assert auto._normalization(SimpleNamespace(), without) == "image"
    assert auto._normalization(CelebADataModule(root="nowhere"), without) == "interocular"
    assert KeypointRegressionEvaluation("image")._normalization(SimpleNamespace(), with_boxes) == "image"


def _pdisconet_celeba_kpr(fit, ev, image_size) -> float:
    """Re-typed from PDiscoNet's evaluate_celeba.py (create_centers, eval_kpr) and datasets.py
    (CelebA with evaluate=True), for a model whose map covers the isotropically resized image:
    landmarks scaled by S / shorter side, centroids = probability-weighted (row, col) map indices
    times image size / map size, both divided by the inter-ocular distance; one StandardScaler and
    one LinearRegression without intercept over all five landmarks; mean L2 error x 100."""

    def centers(split):
        maps = split["maps"][:, :-1]
        maxes = maps.max(-1)[0].max(-1)[0]
        active = torch.where(maxes > 0.5, 1, 0).unsqueeze(-1).expand(-1, -1, 2)
        grid_x, grid_y = torch.meshgrid(torch.arange(maps.shape[2]), torch.arange(maps.shape[3]), indexing="ij")
        map_sums = maps.sum(3).sum(2)
        loc_x = (grid_x * maps).sum(3).sum(2) / map_sums  # row index
        loc_y = (grid_y * maps).sum(3).sum(2) / map_sums  # column index
        rows, cols = [], []
        landmarks = []
        for i, (width, height) in enumerate(split["sizes"]):
            factor = image_size / min(width, height)  # datasets.py: resize factor of the shorter side
            h_iso, w_iso = height * factor, width * factor  # the isotropically resized input
            rows.append(loc_x[i] * h_iso / maps.shape[-2])
            cols.append(loc_y[i] * w_iso / maps.shape[-1])
            landmarks.append(split["landmarks"][i] * factor)
        centers = torch.stack((torch.stack(rows), torch.stack(cols)), dim=-1).reshape(len(rows), -1)
        annos = torch.stack(landmarks)
        eye = ((annos[:, 1, 0] - annos[:, 0, 0]) ** 2 + (annos[:, 1, 1] - annos[:, 0, 1]) ** 2).sqrt().unsqueeze(1)
        return centers / eye, annos.reshape(len(rows), -1) / eye, active.reshape(len(rows), -1)

    fit_centers, fit_annos, fit_active = (t.numpy().astype(np.float64) for t in centers(fit))
    eval_centers, eval_annos, eval_active = (t.numpy().astype(np.float64) for t in centers(ev))
    scaler_centers, scaler_landmarks = StandardScaler().fit(fit_centers), StandardScaler().fit(fit_annos)
    fit_centers_std = np.where(fit_active, scaler_centers.transform(fit_centers), 0)
    regressor = LinearRegression(fit_intercept=False).fit(fit_centers_std, scaler_landmarks.transform(fit_annos))
    eval_centers_std = np.where(eval_active, scaler_centers.transform(eval_centers), 0)
    eval_pred = scaler_landmarks.inverse_transform(regressor.predict(eval_centers_std)).reshape(len(eval_annos), 5, 2)
    diff_sq = (eval_pred - eval_annos.reshape(len(eval_annos), 5, 2)) ** 2
    return float(np.mean(np.sqrt(np.sum(diff_sq, axis=2))) * 100)


def _celeba_split(n, parts, seed, grid=8):
    """Non-square originals (W, H), five landmarks in original pixels, patch-grid part maps."""
    g = torch.Generator().manual_seed(seed)
    sizes = [(int(w), int(h)) for w, h in torch.randint(120, 400, (n, 2), generator=g).tolist()]
    rel = torch.rand(n, parts, 2, generator=g, dtype=torch.float64)  # part positions, relative to the image
    probs = _probs_from_centroids(rel * (grid - 1), grid).float()
    probs[: n // 5, 2] *= 0.4  # part 2 never above 0.5 in a fifth of the images
    probs = probs / probs.sum(dim=1, keepdim=True)
    weights = torch.randn(parts * 2, 10, generator=g, dtype=torch.float64)
    landmarks = (rel.reshape(n, -1) @ weights * 0.2).reshape(n, 5, 2) + 0.02 * torch.randn(n, 5, 2, generator=g,
                                                                                         dtype=torch.float64)
    landmarks[:, 1, 0] += 0.3  # eyes apart
    landmarks = landmarks.clamp(0, 1) * torch.tensor(sizes, dtype=torch.float64)[:, None, :]  # original pixels
    return {"maps": probs, "sizes": sizes, "landmarks": landmarks}


def test_celeba_kpr_in_isotropic_coordinates_matches_pdisconet():
    image_size, parts = 64, 4
    fit, ev = _celeba_split(60, parts, seed=11), _celeba_split(25, parts, seed=12)
    expected = _pdisconet_celeba_kpr(fit, ev, image_size)

    def batches(split):
        sizes = torch.tensor(split["sizes"], dtype=torch.float64)  # (W, H)
        squashed = split["landmarks"] * image_size / sizes[:, None, :]  # keypoints of the S x S input
        scale = torch.stack([isotropic_scale(w, h) for w, h in split["sizes"]])
        for i in range(0, len(sizes), 7):
            s = slice(i, i + 7)
            yield split["maps"][s], squashed[s].float(), scale[s]

    metric = KeypointRegression(num_parts=parts, num_keypoints=5, normalization="interocular")
    for probs, kp, scale in batches(fit):
        metric.update(probs, kp, None, image_size, split="fit", coordinate_scale=scale)
    metric.fit()
    for probs, kp, scale in batches(ev):
        metric.update(probs, kp, None, image_size, coordinate_scale=scale)
    assert abs(metric.compute().item() - expected) < 1e-5
    # in the squashed S x S frame the vertical error is weighted by W/H: another number
    squashed = KeypointRegression(num_parts=parts, num_keypoints=5, normalization="interocular")
    for split, data in (("fit", fit), ("eval", ev)):
        if split == "eval":
            squashed.fit()
        for probs, kp, _ in batches(data):
            squashed.update(probs, kp, None, image_size, split=split)
    assert abs(squashed.compute().item() - expected) > 1e-3
    assert torch.equal(isotropic_scale(300, 200), torch.tensor([1.5, 1.0], dtype=torch.float64))
