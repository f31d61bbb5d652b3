"""Validation on the test split (the authors' protocol) or on a held-out slice of the training split."""
from __future__ import annotations

import torch

from mpae_lightning.data import CUBDataModule, PartImageNetDataModule, SyntheticPartsDataModule
from test_data_cub import make_fake_cub
from test_data_partimagenet import make_fake_seg


def test_synthetic_holdout_is_a_seeded_disjoint_slice_of_training():
    dm = SyntheticPartsDataModule(num_train=32, num_val=8, num_test=8, image_size=32, batch_size=8, mask_size=32,
                                  val_fraction=0.25, seed=3, group_by="class")
    dm.setup("fit")
    assert dm.val_split == "holdout" and SyntheticPartsDataModule(num_train=8).val_split == "val"
    train, val = dm.train_dataset, dm.val_dataset
    assert len(train) == 24 and len(val) == 8
    assert not set(train.indices) & set(val.indices)
    again = SyntheticPartsDataModule(num_train=32, image_size=32, batch_size=8, mask_size=32, val_fraction=0.25, seed=3)
    assert again.dataset("val").indices == val.indices
    item = val[0]
    # held-out items are evaluation items of training images: annotated, not augmented
    assert {"mask", "keypoints", "visible"} <= set(item) and item["path"].startswith("synthetic/train/")
    reference = dm.build_train_eval_dataset()[val.indices[0]]
    assert torch.equal(item["image"], reference["image"])
    # class-grouped mini-groups still see the labels through the subset
    assert len(next(iter(dm.train_dataloader()))["image"]) == 8
    # the test split is untouched
    assert dm.dataset("test")[0]["path"].startswith("synthetic/test/")


def test_cub_validates_on_test_split_unless_holding_out(tmp_path):
    root = make_fake_cub(tmp_path / "CUB_200_2011")
    plain = CUBDataModule(root=str(root), image_size=28, batch_size=2, mini_group=2, num_workers=0)
    plain.setup("fit")
    plain.setup("test")
    assert plain.val_split == "test" and plain.val_dataset is plain.test_dataset
    held = CUBDataModule(root=str(root), image_size=28, batch_size=2, mini_group=2, num_workers=0, val_fraction=0.4)
    held.setup("fit")
    held.setup("test")
    train_paths = {r.path for r in plain.train_dataset.records}
    val_paths = [r.path for r in held.val_dataset.records]
    assert held.val_split == "holdout" and set(val_paths) < train_paths
    assert not set(val_paths) & {r.path for r in held.train_dataset.records}
    assert len(held.train_dataset) + len(val_paths) == len(train_paths)
    assert [r.path for r in held.test_dataset.records] == [r.path for r in plain.test_dataset.records]
    assert "keypoints" in held.val_dataset[0]


def test_partimagenet_holdout_keeps_each_image_with_its_own_mask(tmp_path):
    root = make_fake_seg(tmp_path / "seg")
    kw = dict(root=str(root), variant="seg", image_size=28, batch_size=1, mini_group=1, num_workers=0, mask_size=16)
    full = PartImageNetDataModule(**kw).build_train_eval_dataset()
    dm = PartImageNetDataModule(**kw, val_fraction=0.34, seed=0)
    val = dm.dataset("val")
    assert len(val) == 1 and len(dm.dataset("train")) == 2
    position = [r.path for r in full.records].index(val.records[0].path)
    assert position == 2  # so a mask looked up by the subset's own index 0 would be another image's
    assert torch.equal(val[0]["mask"], full[position]["mask"])
    assert not torch.equal(val[0]["mask"], full[0]["mask"])
