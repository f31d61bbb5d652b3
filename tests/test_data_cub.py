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


def _segmentation(img_id, w, h):
    """Soft 0-255 values, as several annotators' votes: many pixels at 1 or 2 (foreground: > 0)."""
    rng = np.random.default_rng(img_id)
    return rng.choice(np.array([0, 0, 0, 1, 2, 51, 128, 255], dtype=np.uint8), size=(h, w))


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
    # the separate segmentations download: segmentations/<images.txt path>.png, 8-bit grey
    for i, rel, _, _, w, h in _IMAGES:
        path = root / "segmentations" / rel.replace(".jpg", ".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(_segmentation(i, w, h)).save(path)  # uint8 2-D: mode L
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


# --------------------------------------------------------------------------- foreground masks
def _expected_fg_mask(img_id, w, h, size):
    """PDiscoFormer's CUB mask (value > 0 at the original size, ifam data_sets/cub_dataset_seg.py), then
    a nearest squash to size x size with OpenCV's INTER_NEAREST rule (resizeNN: floor(i * (1 / scale)),
    in double, clipped), re-typed pixel by pixel."""
    seg = _segmentation(img_id, w, h)
    out = np.zeros((size, size), dtype=bool)
    for i in range(size):
        sy = min(int(np.floor(i * (1.0 / (size / h)))), h - 1)
        for j in range(size):
            sx = min(int(np.floor(j * (1.0 / (size / w)))), w - 1)
            out[i, j] = seg[sy, sx] > 0
    return out


def test_nearest_indices_follow_opencv():
    from mpae_lightning.data.cub import nearest_indices

    # 30 -> 28: i * 30 / 28 passes 15 exactly at i = 14, so source row 14 is skipped
    assert nearest_indices(30, 28).tolist() == list(range(14)) + list(range(15, 29))
    assert nearest_indices(2, 4).tolist() == [0, 0, 1, 1] and nearest_indices(5, 5).tolist() == [0, 1, 2, 3, 4]


def test_eval_items_carry_the_foreground_mask(data_cub_root):
    """``segmentations``: fg_mask (S, S) bool, value > 0 (not >= 128), squashed like the image; the rest unchanged."""
    plain = _dm(data_cub_root)
    assert plain.has_fg_masks is False
    dm = _dm(data_cub_root, segmentations=str(data_cub_root / "segmentations"))
    assert dm.has_fg_masks is True
    dm.setup("test")
    plain.setup("test")
    batch = next(iter(dm.test_dataloader()))
    reference = next(iter(plain.test_dataloader()))
    assert "fg_mask" not in reference and "mask" not in batch
    assert set(batch) == set(reference) | {"fg_mask"}
    for key in ("image", "keypoints", "visible", "box", "index", "label"):
        assert torch.equal(batch[key], reference[key]), key
    assert batch["fg_mask"].shape == (2, 28, 28) and batch["fg_mask"].dtype == torch.bool
    for b, (img_id, w, h) in enumerate([(1, 40, 30), (4, 20, 40)]):
        expected = _expected_fg_mask(img_id, w, h, 28)
        assert np.array_equal(batch["fg_mask"][b].numpy(), expected)
        seg = _segmentation(img_id, w, h)
        assert 0 < expected.mean() < 1 and (0 < seg).sum() > (seg >= 128).sum()  # the threshold matters here
    # the folder that contains segmentations/ (e.g. the CUB root) is read the same
    nested = _dm(data_cub_root, segmentations=str(data_cub_root))
    nested.setup("test")
    assert torch.equal(nested.test_dataset[1]["fg_mask"], batch["fg_mask"][1])
    squashed = _dm(data_cub_root, segmentations=str(data_cub_root / "segmentations"), input_antialias=False)
    squashed.setup("test")
    assert torch.equal(squashed.test_dataset[0]["fg_mask"], batch["fg_mask"][0])  # same geometry either way


def test_held_out_validation_images_carry_their_masks(data_cub_root):
    dm = _dm(data_cub_root, segmentations=str(data_cub_root / "segmentations"), val_fraction=0.4)
    dm.setup("fit")
    sizes = {rel: (i, w, h) for i, rel, _, _, w, h in _IMAGES}
    assert len(dm.val_dataset) == 1
    item = dm.val_dataset[0]
    img_id, w, h = next(v for rel, v in sizes.items() if item["path"].endswith(rel))
    assert np.array_equal(item["fg_mask"].numpy(), _expected_fg_mask(img_id, w, h, 28))
    assert "fg_mask" not in dm.train_dataset[0]  # training items carry the image only


def test_missing_segmentation_names_the_file_in_one_line(data_cub_root):
    missing = data_cub_root / "segmentations" / _IMAGES[3][1].replace(".jpg", ".png")
    os.remove(missing)
    with pytest.raises(FileNotFoundError) as err:
        _dm(data_cub_root, segmentations=str(data_cub_root / "segmentations")).setup("test")
    message = str(err.value)
    assert "\n" not in message and str(missing) in message and message.startswith("1 of 2 segmentation masks")
    _dm(data_cub_root).setup("test")  # without the setting nothing is looked for
    nowhere = data_cub_root / "no_such_folder"
    with pytest.raises(FileNotFoundError, match=rf"CUB segmentations folder {nowhere} does not exist"):
        _dm(data_cub_root, segmentations=str(nowhere)).setup("test")


def test_unreadable_or_mismatched_segmentation_names_the_file(data_cub_root):
    from mpae_lightning.data import ImageReadError

    folder = data_cub_root / "segmentations"
    bad = folder / _IMAGES[0][1].replace(".jpg", ".png")
    bad.write_bytes(b"\x89PNG garbage")
    other = folder / _IMAGES[3][1].replace(".jpg", ".png")
    Image.new("L", (21, 40)).save(other)  # the image is 20x40
    dm = _dm(data_cub_root, segmentations=str(folder))
    dm.setup("test")
    with pytest.raises(ImageReadError, match=rf"cannot read segmentation mask {bad}"):
        dm.test_dataset[0]
    with pytest.raises(DatasetFormatError, match=rf"segmentation mask {other} is 21x40 but its image is 20x40"):
        dm.test_dataset[1]

