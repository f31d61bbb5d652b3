"""CUBDataModule on a tiny fake CUB_200_2011 folder in the real on-disk format."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mpae_lightning.data import CUBDataModule, DatasetFormatError

# (image id, relative path, is_train, class id (1-based), width, height)
_IMAGES = [
    (1, "001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", 0, 1, 40, 30),
    (2, "001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg", 1, 1, 50, 50),
    (3, "002.Laysan_Albatross/Laysan_Albatross_0002_1027.jpg", 1, 2, 64, 32),
    (4, "002.Laysan_Albatross/Laysan_Albatross_0003_1033.jpg", 0, 2, 20, 40),
    (5, "002.Laysan_Albatross/Laysan_Albatross_0082_524.jpg", 1, 2, 30, 30),
]


def _part(img_id, part_id):
    """Deterministic part location and visibility; every third part is invisible (0 0 as in CUB)."""
    visible = (img_id + part_id) % 3 != 0
    if not visible:
        return 0.0, 0.0, 0
    return float(part_id), float(img_id + 0.5), 1


def make_fake_cub(root, write_images=True):
    root.mkdir(parents=True, exist_ok=True)
    (root / "parts").mkdir(exist_ok=True)
    (root / "images.txt").write_text("".join(f"{i} {p}\n" for i, p, *_ in _IMAGES))
    (root / "train_test_split.txt").write_text("".join(f"{i} {t}\n" for i, _, t, *_ in _IMAGES))
    (root / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, _, c, *_ in _IMAGES))
    (root / "bounding_boxes.txt").write_text("".join(f"{i} {i}.0 2.0 10.0 {10 + i}.0\n" for i, *_ in _IMAGES))
    lines = []
    for i, *_ in _IMAGES:
        for p in range(1, 16):
            x, y, v = _part(i, p)
            lines.append(f"{i} {p} {x:.1f} {y:.1f} {v}\n")
    (root / "parts" / "part_locs.txt").write_text("".join(lines))
    if write_images:
        for i, rel, _, _, w, h in _IMAGES:
            path = root / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (w, h), (10 * i, 50, 90)).save(path, "JPEG")
    return root


@pytest.fixture
def data_cub_root(tmp_path):
    return make_fake_cub(tmp_path / "CUB_200_2011")


def _dm(root, **kw):
    kw.setdefault("image_size", 28)
    kw.setdefault("batch_size", 2)
    kw.setdefault("mini_group", 2)
    kw.setdefault("num_workers", 0)
    return CUBDataModule(root=str(root), **kw)


def test_split_counts_order_labels(data_cub_root):
    dm = _dm(data_cub_root)
    dm.setup()
    train, test = dm.train_dataset, dm.test_dataset
    assert len(train) == 3 and len(test) == 2
    assert dm.val_dataset is test and dm.predict_dataset is test
    # images.txt order within each split
    assert [os.path.basename(r.path) for r in test.records] == [
        "Black_Footed_Albatross_0046_18.jpg",
        "Laysan_Albatross_0003_1033.jpg",
    ]
    assert [r.label for r in train.records] == [0, 1, 1]


def test_test_items_keypoints_scaled_and_visibility(data_cub_root):
    dm = _dm(data_cub_root, image_size=28)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (2, 3, 28, 28)
    assert batch["index"].tolist() == [0, 1]
    assert batch["label"].tolist() == [0, 1]
    assert batch["path"][1].endswith("002.Laysan_Albatross/Laysan_Albatross_0003_1033.jpg")
    assert batch["keypoints"].shape == (2, 15, 2) and batch["keypoints"].dtype == torch.float32
    assert batch["visible"].dtype == torch.bool
    for b, (img_id, w, h) in enumerate([(1, 40, 30), (4, 20, 40)]):
        for p in range(1, 16):
            x, y, v = _part(img_id, p)
            assert batch["visible"][b, p - 1].item() == bool(v)
            expected = torch.tensor([x * 28 / w, y * 28 / h])
            assert torch.allclose(batch["keypoints"][b, p - 1], expected, atol=1e-5)
    # by hand: image 1 (40x30), part 3 at (3.0, 1.5) -> (3 * 28 / 40, 1.5 * 28 / 30) = (2.1, 1.4)
    assert torch.allclose(batch["keypoints"][0, 2], torch.tensor([2.1, 1.4]), atol=1e-5)
    # bounding boxes scale like keypoints: image 4 (20x40), box (4, 2, 10, 14) -> (5.6, 1.4, 14, 9.8)
    assert batch["box"].shape == (2, 4)
    assert torch.allclose(batch["box"][1], torch.tensor([5.6, 1.4, 14.0, 9.8]), atol=1e-5)


def test_boxes_are_optional(data_cub_root):
    os.remove(data_cub_root / "bounding_boxes.txt")
    dm = _dm(data_cub_root)
    dm.setup("test")
    assert "box" not in dm.test_dataset[0] and "keypoints" in dm.test_dataset[0]


def test_train_batch(data_cub_root):
    dm = _dm(data_cub_root)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (2, 3, 28, 28)
    assert set(batch) == {"image", "index", "path", "label", "mask_seed"}  # mask_seed: the image's masking seed


def test_root_may_be_the_parent_folder(data_cub_root):
    dm = _dm(data_cub_root.parent)
    dm.setup("test")
    assert len(dm.test_dataset) == 2


def test_missing_root(tmp_path):
    root = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"CUB root {root} .*CUB_200_2011"):
        _dm(root).setup("fit")


def test_missing_images_txt(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"CUB root {root} does not contain images.txt"):
        _dm(root).setup("fit")


@pytest.mark.parametrize("name", ["train_test_split.txt", os.path.join("parts", "part_locs.txt")])
def test_missing_annotation_file(data_cub_root, name):
    os.remove(data_cub_root / name)
    with pytest.raises(FileNotFoundError, match=str(data_cub_root / name)):
        _dm(data_cub_root).setup("test")


def test_missing_images_are_listed_eagerly(tmp_path):
    root = make_fake_cub(tmp_path / "CUB_200_2011")
    os.remove(root / "images" / _IMAGES[0][1])
    os.remove(root / "images" / _IMAGES[3][1])
    with pytest.raises(FileNotFoundError) as err:
        _dm(root).setup("test")
    msg = str(err.value)
    assert "2 of 2 images listed in" in msg and str(root / "images.txt") in msg
    assert str(root / "images" / _IMAGES[0][1]) in msg and str(root / "images" / _IMAGES[3][1]) in msg


def test_malformed_annotation_names_file_and_line(data_cub_root):
    with open(data_cub_root / "images.txt", "a") as fh:
        fh.write("6\n")
    with pytest.raises(DatasetFormatError, match=rf"{data_cub_root / 'images.txt'} line 6"):
        _dm(data_cub_root).setup("test")


def test_corrupt_image_names_path(data_cub_root):
    bad = data_cub_root / "images" / _IMAGES[0][1]
    bad.write_bytes(b"\xff\xd8garbage")
    dm = _dm(data_cub_root)
    dm.setup("test")
    with pytest.raises(OSError, match=str(bad)):
        dm.test_dataset[0]


def test_grayscale_and_cmyk_images_load_as_rgb(data_cub_root):
    Image.new("L", (40, 30), 128).save(data_cub_root / "images" / _IMAGES[0][1], "JPEG")
    Image.new("CMYK", (20, 40), (0, 50, 100, 0)).save(data_cub_root / "images" / _IMAGES[3][1], "JPEG")
    dm = _dm(data_cub_root)
    dm.setup("test")
    assert dm.test_dataset[0]["image"].shape == (3, 28, 28)
    assert dm.test_dataset[1]["image"].shape == (3, 28, 28)
    np.testing.assert_allclose(dm.test_dataset[0]["keypoints"][2].numpy(), [2.1, 1.4], atol=1e-5)


def test_input_antialias_false_squashes_every_split(data_cub_root):
    """Antialiased by default; ``input_antialias=False`` (a checkpoint trained that way) squashes train and test."""
    from mpae_lightning.data.base import load_rgb
    from mpae_lightning.data.transforms import input_transform

    assert _dm(data_cub_root).input_antialias is True
    dm = _dm(data_cub_root, input_antialias=False)
    dm.setup()
    assert dm.train_dataset.squash and dm.test_dataset.squash
    item = dm.test_dataset[0]
    assert torch.equal(item["image"], input_transform(28, antialias=False)(load_rgb(item["path"])))
