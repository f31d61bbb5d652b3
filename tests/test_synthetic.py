import runpy
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mpae_lightning.data import NUM_PART_TYPES, SyntheticPartsDataModule, SyntheticPartsDataset
from mpae_lightning.data.synthetic import main


def test_deterministic_per_seed_split_and_index():
    a = SyntheticPartsDataset(8, split="test", seed=3)
    b = SyntheticPartsDataset(8, split="test", seed=3)
    for i in (0, 5):
        x, y = a[i], b[i]
        for key in ("image", "mask", "keypoints", "visible"):
            assert torch.equal(x[key], y[key]), key
    assert not torch.equal(a[0]["image"], SyntheticPartsDataset(8, split="test", seed=4)[0]["image"])
    assert not torch.equal(a[0]["image"], SyntheticPartsDataset(8, split="val", seed=3)[0]["image"])
    assert not torch.equal(a[0]["image"], a[3]["image"])  # same category, another object


def test_item_shapes_and_types():
    ds = SyntheticPartsDataset(4, split="val", image_size=64, mask_size=32, num_categories=3)
    item = ds[2]
    assert item["image"].shape == (3, 64, 64) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (32, 32) and item["mask"].dtype == torch.long
    assert item["keypoints"].shape == (NUM_PART_TYPES, 2) and item["keypoints"].dtype == torch.float32
    assert item["visible"].shape == (NUM_PART_TYPES,) and item["visible"].dtype == torch.bool
    assert item["index"] == 2 and item["label"] == 2 and item["path"] == "synthetic/val/2"
    assert 0 <= item["mask"].min() and item["mask"].max() <= NUM_PART_TYPES
    assert (item["mask"] == NUM_PART_TYPES).any()  # background present


def test_train_items_are_light():
    ds = SyntheticPartsDataset(4, train=True)
    assert set(ds[0]) == {"image", "index", "path", "label"}


@pytest.mark.parametrize("image_size,mask_size", [(128, 128), (112, 64), (96, 128)])
def test_keypoints_lie_on_their_part_in_the_mask(image_size, mask_size):
    ds = SyntheticPartsDataset(60, split="test", image_size=image_size, mask_size=mask_size, num_categories=4)
    seen_visible = np.zeros(NUM_PART_TYPES, dtype=int)
    for i in range(len(ds)):
        r = ds.render(i)
        mask, kp, vis = r["mask"], r["keypoints"], r["visible"]
        for t in range(NUM_PART_TYPES):
            if vis[t]:
                x, y = kp[t]
                assert 0 <= x < image_size and 0 <= y < image_size
                mx, my = int(x * mask_size / image_size), int(y * mask_size / image_size)
                assert mask[my, mx] == t, (i, t)
                seen_visible[t] += 1
            else:
                assert (kp[t] == 0).all()
        present = set(np.unique(mask).tolist()) - {NUM_PART_TYPES}
        assert set(np.flatnonzero(vis).tolist()) <= present
    assert (seen_visible > 0).all()


def test_keypoint_is_the_centroid_when_it_falls_on_the_part():
    ds = SyntheticPartsDataset(30, split="test")
    checked = 0
    for i in range(len(ds)):
        r = ds.render(i)
        for t in np.flatnonzero(r["visible"]):
            rows, cols = np.nonzero(r["mask"] == t)
            cx, cy = cols.mean() + 0.5, rows.mean() + 0.5
            if r["mask"][int(cy), int(cx)] == t:
                np.testing.assert_allclose(r["keypoints"][t], [cx, cy], atol=1e-3)
                checked += 1
    assert checked > 50


def test_parts_are_large_and_categories_share_part_types():
    ds = SyntheticPartsDataset(90, split="train", num_categories=3, occlusion_prob=0.0)
    areas = []
    types_per_category = {c: set() for c in range(3)}
    for i in range(len(ds)):
        r = ds.render(i)
        counts = np.bincount(r["mask"].ravel(), minlength=NUM_PART_TYPES + 1)
        fg = counts[:NUM_PART_TYPES]
        areas.extend(fg[fg > 0].tolist())
        types_per_category[r["category"]] |= set(np.flatnonzero(fg).tolist())
        assert 0.1 < fg.sum() / r["mask"].size < 0.6  # the object spans about 50-75 % of the side
    assert np.median(areas) >= 4 * 64  # several 8x8 patches per visible part at 128 px
    assert np.percentile(areas, 10) >= 2 * 64
    assert all(4 <= len(t) <= 5 for t in types_per_category.values())
    shared = set.intersection(*types_per_category.values())
    assert len(shared) >= 2
    assert set.union(*types_per_category.values()) == set(range(NUM_PART_TYPES))


def test_some_images_have_an_occluder():
    ds = SyntheticPartsDataset(40, split="train")
    assert 3 <= sum(ds._sample_params(i)["occluder"] is not None for i in range(40)) <= 25


def test_generation_is_fast():
    ds = SyntheticPartsDataset(50, split="train")
    ds[0]
    start = time.perf_counter()
    for i in range(50):
        ds[i]
    per_item = (time.perf_counter() - start) / 50
    assert per_item < 0.01  # about 1-2 ms on one core; generous for loaded CI machines


def test_datamodule_splits_and_batches():
    dm = SyntheticPartsDataModule(num_train=32, num_val=6, num_test=10, image_size=32, mask_size=16, batch_size=16, mini_group=8)
    dm.setup()
    assert (len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)) == (32, 6, 10)
    assert dm.predict_dataset is dm.test_dataset
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (10, 3, 32, 32)
    assert batch["mask"].shape == (10, 16, 16)
    assert batch["keypoints"].shape == (10, NUM_PART_TYPES, 2) and batch["visible"].shape == (10, NUM_PART_TYPES)
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (16, 3, 32, 32)


def test_group_by_class_on_synthetic():
    dm = SyntheticPartsDataModule(num_train=48, image_size=16, mask_size=16, batch_size=16, mini_group=8, group_by="class")
    dm.setup("fit")
    for batch in dm.train_dataloader():
        labels = batch["label"].view(-1, 8)
        assert (labels == labels[:, :1]).all()


def test_cli_writes_png(tmp_path):
    path = main(["--out", str(tmp_path / "a"), "--num", "6", "--columns", "3", "--image-size", "48"])
    img = Image.open(path)
    # 3 items per row, each image | ground truth (48 px tiles, 2 px gaps), 2 rows, header and legend
    assert img.format == "PNG" and img.size[0] == 6 * 48 + 5 * 2 and img.size[1] > 2 * 48 + 2 + 20


def test_python_m_entry_point(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["synthetic", "--out", str(tmp_path), "--num", "4"])
    sys.modules.pop("mpae_lightning.data.synthetic", None)
    try:
        runpy.run_module("mpae_lightning.data.synthetic", run_name="__main__")
    finally:
        sys.modules.pop("mpae_lightning.data.synthetic", None)
    out = capsys.readouterr().out.strip()
    assert out.endswith(".png") and Image.open(out).format == "PNG"
