"""Keypoint regression error (KPR) against a direct scikit-learn computation of PDiscoNet's protocol."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import StandardScaler

from mpae_lightning.metrics import KeypointRegression, keypoint_frame, keypoint_regression_error, part_centroids


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


def test_callback_reports_kpr_at_test_time(tiny_demo_args):
    """`mpae test` with the callback: fitted on the training images, scored on the test split."""
    from lightning.pytorch import Trainer

    from mpae_lightning.callbacks import KeypointRegressionEvaluation
    from mpae_lightning.cli import MPAECLI

    cli = MPAECLI(args=tiny_demo_args, run=False)
    module, dm = cli.model, cli.datamodule
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      enable_checkpointing=False, callbacks=[KeypointRegressionEvaluation(normalization="image")])
    logged = trainer.test(module, datamodule=dm, verbose=False)[0]

    module.eval()
    direct = {}
    with torch.no_grad():
        for split, dataset in (("fit", dm.build_train_eval_dataset()), ("eval", dm.test_dataset)):
            batch = torch.utils.data.default_collate([dataset[i] for i in range(len(dataset))])
            centroids, active = part_centroids(module(batch["image"]), 64)
            direct[split] = (centroids / 64, active, batch["keypoints"].double() / 64, batch["visible"])
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
