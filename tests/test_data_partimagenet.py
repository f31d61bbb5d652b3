"""PartImageNetDataModule on tiny fake OOD and Seg folders with COCO polygon annotations."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mpae_lightning.data import DatasetFormatError, PartImageNetDataModule
from mpae_lightning.data.partimagenet import part_label_map

NUM_PARTS = 40
CATEGORIES = [{"id": i, "name": f"Super{i // 4} Part{i % 4}", "supercategory": f"Super{i // 4}"} for i in range(NUM_PARTS)]


def rect(x0, y0, x1, y1):
    """COCO polygon of the pixel block x0..x1-1, y0..y1-1 (as pycocotools rasterises it)."""
    return [float(x0), float(y0), float(x1), float(y0), float(x1), float(y1), float(x0), float(y1)]


def ann(ann_id, image_id, cat, polys, area=10.0, iscrowd=0, bbox=None):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "segmentation": polys,
        "area": area,
        "iscrowd": iscrowd,
        "bbox": bbox or [0.0, 0.0, 1.0, 1.0],
    }


def _test_split(prefix=""):
    """Test images: two overlapping rectangles, a 20x10 image, and one unannotated image (left out)."""
    images = [
        {"id": 11, "file_name": prefix + "n01440764_1.JPEG", "width": 16, "height": 16},
        {"id": 12, "file_name": prefix.replace("n01440764", "n02085620") + "n02085620_7.JPEG", "width": 20, "height": 10},
        {"id": 13, "file_name": prefix + "n01440764_99.JPEG", "width": 16, "height": 16},
    ]
    anns = [
        ann(1, 11, 1, [rect(2, 2, 12, 8)]),
        ann(2, 11, 0, [rect(8, 4, 14, 12)]),
        ann(3, 11, 1, [rect(0, 12, 4, 16)]),  # second instance of part 1: union
        ann(4, 11, 5, [rect(0, 0, 16, 16)], iscrowd=1),  # crowd: skipped
        ann(5, 11, 6, [rect(0, 0, 16, 16)], area=0),  # zero area: skipped
        ann(6, 12, 39, [rect(0, 0, 10, 10)]),
        ann(7, 12, 2, [[15.0, 1.0, 19.0, 5.0]], bbox=[15.0, 1.0, 4.0, 4.0]),  # 2-point polygon -> its bbox
    ]
    return images, anns


def _train_split(prefix=""):
    images = [
        {"id": 1, "file_name": prefix + "n01440764_3.JPEG", "width": 24, "height": 16},
        {"id": 2, "file_name": prefix.replace("n01440764", "n03000134") + "n03000134_5.JPEG", "width": 16, "height": 16},
        {"id": 3, "file_name": prefix + "n01440764_4.JPEG", "width": 16, "height": 24},
    ]
    anns = [ann(10 + i, i, i, [rect(1, 1, 8, 8)]) for i in (1, 2, 3)]
    return images, anns


def _write(json_path, image_dir, images, anns, categories=CATEGORIES, write=True):
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    if write:
        for img in images:
            p = image_dir / img["file_name"]
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (img["width"], img["height"]), (30, 60, 90)).save(p, "JPEG")


def make_fake_seg(root, **kw):
    for split, (images, anns) in (("train", _train_split()), ("test", _test_split())):
        _write(root / "annotations" / split / f"{split}.json", root / "images" / split, images, anns, **kw)
    return root


def make_fake_ood(root, **kw):
    for split, (images, anns) in (("train", _train_split("n01440764/")), ("test", _test_split("n01440764/"))):
        _write(root / f"train_{split}.json", root / "train", images, anns, **kw)
    return root


def expected_first_mask():
    m = np.full((16, 16), NUM_PARTS)
    m[2:8, 2:12] = 1
    m[12:16, 0:4] = 1
    m[4:12, 8:14] = 0  # overlap with part 1: argmax takes the lower id
    return m


def expected_second_mask():
    m = np.full((10, 20), NUM_PARTS)
    m[0:10, 0:10] = 39
    m[1:5, 15:19] = 2
    return m


def _dm(root, variant, **kw):
    kw.setdefault("mask_size", 16)
    return PartImageNetDataModule(
        root=str(root), variant=variant, image_size=28, batch_size=2, mini_group=2, num_workers=0, **kw
    )


@pytest.fixture(params=["seg", "ood"])
def data_partimagenet(request, tmp_path):
    root = tmp_path / request.param
    (make_fake_seg if request.param == "seg" else make_fake_ood)(root)
    return root, request.param


def test_counts_labels_masks(data_partimagenet):
    root, variant = data_partimagenet
    dm = _dm(root, variant)
    dm.setup()
    assert len(dm.train_dataset) == 3 and len(dm.test_dataset) == 2  # unannotated image left out
    assert dm.num_mask_labels == NUM_PARTS + 1 and dm.has_masks and not dm.has_keypoints
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (2, 3, 28, 28)
    assert batch["mask"].shape == (2, 16, 16) and batch["mask"].dtype == torch.long
    assert batch["index"].tolist() == [0, 1]
    assert os.path.basename(batch["path"][0]) == "n01440764_1.JPEG"
    # classes: sorted WordNet ids of both files: n01440764, n02085620, n03000134
    assert batch["label"].tolist() == [0, 1]
    assert [r.label for r in dm.train_dataset.records] == [0, 2, 0]
    np.testing.assert_array_equal(batch["mask"][0].numpy(), expected_first_mask())
    # 20x10 -> 16x16 nearest: source index floor(dst * in / out)
    rows = np.floor(np.arange(16) * 10 / 16).astype(int)
    cols = np.floor(np.arange(16) * 20 / 16).astype(int)
    np.testing.assert_array_equal(batch["mask"][1].numpy(), expected_second_mask()[rows][:, cols])


def test_mask_downsampling(data_partimagenet):
    root, variant = data_partimagenet
    dm = _dm(root, variant, mask_size=8)
    dm.setup("test")
    np.testing.assert_array_equal(dm.test_dataset[0]["mask"].numpy(), expected_first_mask()[::2, ::2])


def test_label_map_background_channel_argmax():
    # two overlapping squares and nothing else: background (0.1) wins only where no part covers
    anns = [(3, [rect(0, 0, 3, 3)], None), (1, [rect(2, 2, 4, 4)], None)]
    out = part_label_map(anns, 4, 4, num_parts=5).numpy()
    expected = np.array([[3, 3, 3, 5], [3, 3, 3, 5], [3, 3, 1, 1], [5, 5, 1, 1]])
    np.testing.assert_array_equal(out, expected)


def test_label_map_sums_instances_of_a_category_like_the_authors():
    # Two overlapping part-1 instances over one part-0 instance: the authors add masks per category
    # (mask[cat] += m), so part 1 counts 2 where its instances overlap and beats part 0 (count 1);
    # where only one part-1 instance covers part 0 the tie goes to the lower id, 0.
    anns = [
        (0, [rect(0, 0, 6, 6)], None),
        (1, [rect(0, 0, 4, 6)], None),
        (1, [rect(2, 0, 6, 6)], None),
    ]
    out = part_label_map(anns, 6, 8, num_parts=3).numpy()
    expected = np.full((6, 8), 3)
    expected[:, 0:6] = 0
    expected[:, 2:4] = 1
    np.testing.assert_array_equal(out, expected)


def test_train_items(data_partimagenet):
    root, variant = data_partimagenet
    dm = _dm(root, variant)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 28, 28) and "mask" not in batch


def test_seg_images_in_wnid_subfolders(tmp_path):
    root = make_fake_seg(tmp_path / "seg", write=True)
    src = root / "images" / "test" / "n01440764_1.JPEG"
    (root / "images" / "test" / "n01440764").mkdir()
    os.rename(src, root / "images" / "test" / "n01440764" / "n01440764_1.JPEG")
    dm = _dm(root, "seg")
    dm.setup("test")
    assert dm.test_dataset[0]["path"].endswith(os.path.join("n01440764", "n01440764_1.JPEG"))


def test_missing_root(tmp_path):
    root = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"PartImageNet-OOD root {root} .*train_train.json"):
        _dm(root, "ood").setup("test")


@pytest.mark.parametrize("variant", ["seg", "ood"])
def test_missing_annotation_file(tmp_path, variant):
    root = tmp_path / variant
    root.mkdir()
    expected = root / ("annotations/test/test.json" if variant == "seg" else "train_test.json")
    with pytest.raises(FileNotFoundError, match=rf"{expected} does not exist; expected the test annotations"):
        _dm(root, variant).setup("test")


def test_missing_image_listed(tmp_path):
    root = make_fake_ood(tmp_path / "ood")
    missing = root / "train" / "n01440764" / "n01440764_1.JPEG"
    os.remove(missing)
    with pytest.raises(FileNotFoundError) as err:
        _dm(root, "ood").setup("test")
    assert "1 of 2 images listed in" in str(err.value) and str(missing) in str(err.value)
    assert str(root / "train_test.json") in str(err.value)


def test_malformed_json(tmp_path):
    root = make_fake_seg(tmp_path / "seg")
    bad = root / "annotations" / "test" / "test.json"
    bad.write_text('{"images": []')
    with pytest.raises(DatasetFormatError, match=rf"{bad} is not a COCO annotation file"):
        _dm(root, "seg").setup("test")


def test_other_number_of_categories_updates_num_mask_labels(tmp_path):
    root = tmp_path / "seg"
    cats = CATEGORIES[:3]
    images, anns = _test_split()
    anns = [a for a in anns if a["category_id"] < 3]
    _write(root / "annotations" / "test" / "test.json", root / "images" / "test", images, anns, categories=cats)
    dm = _dm(root, "seg")
    with pytest.warns(UserWarning, match="3 part categories"):
        dm.setup("test")
    assert dm.num_mask_labels == 4
    assert dm.test_dataset[0]["mask"].max().item() == 3


def test_input_antialias_false_squashes_every_split(data_partimagenet):
    root, variant = data_partimagenet
    assert _dm(root, variant).input_antialias is True
    dm = _dm(root, variant, input_antialias=False)
    dm.setup()
    assert dm.train_dataset.squash and dm.test_dataset.squash
