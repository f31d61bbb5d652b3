import os

import pytest
from PIL import Image

from mpae_lightning.data import ImageFolderDataModule, ImageReadError


def make_folder(root):
    files = [
        "b/2.png",
        "a/1.JPG",
        "a/deeper/3.jpeg",
        "c.bmp",
        "d.webp",
        "z/gray.jpg",
        "z/cmyk.jpg",
        "z/rgba.png",
    ]
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        img = Image.new("RGB", (20 + len(rel), 16), (100, 20, 200))
        if "gray" in rel:
            img = img.convert("L")
        if "cmyk" in rel:
            img = img.convert("CMYK")
        if "rgba" in rel:
            img = img.convert("RGBA")
        fmt = {".JPG": "JPEG", ".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".bmp": "BMP", ".webp": "WEBP"}
        img.save(p, fmt[os.path.splitext(rel)[1]])
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    Image.new("RGB", (8, 8)).save(root / ".hidden" / "x.png")
    return sorted(files)


@pytest.fixture
def data_folder(tmp_path):
    root = tmp_path / "imgs"
    return root, make_folder(root)


def _dm(root, **kw):
    return ImageFolderDataModule(
        root=str(root), image_size=28, batch_size=4, mini_group=2, eval_batch_size=4, num_workers=0, **kw
    )


def test_finds_images_recursively_sorted(data_folder):
    root, files = data_folder
    dm = _dm(root)
    assert [os.path.relpath(p, root) for p in dm.files()] == files
    assert not dm.has_keypoints and not dm.has_masks and dm.num_keypoints == 0 and dm.num_mask_labels == 0


def test_reuse_all_images_for_validation_and_predict(data_folder):
    root, files = data_folder
    dm = _dm(root)
    dm.setup()
    assert len(dm.train_dataset) == len(dm.val_dataset) == len(dm.predict_dataset) == len(files)
    batch = next(iter(dm.predict_dataloader()))
    assert batch["image"].shape == (4, 3, 28, 28)
    assert batch["index"].tolist() == [0, 1, 2, 3]
    assert batch["label"].tolist() == [-1] * 4
    assert set(batch) == {"image", "index", "path", "label"}
    # grayscale, CMYK and RGBA all load as RGB
    for i in range(len(files)):
        assert dm.predict_dataset[i]["image"].shape == (3, 28, 28)


def test_val_fraction_holds_out_a_seeded_subset(data_folder):
    root, files = data_folder
    dm = _dm(root, val_fraction=0.25, seed=1)
    dm.setup()
    train = [r.path for r in dm.train_dataset.records]
    val = [r.path for r in dm.val_dataset.records]
    assert len(val) == 2 and len(train) == 6
    assert sorted(train + val) == sorted(dm.files()) and not set(train) & set(val)
    assert val == sorted(val, key=lambda p: os.path.relpath(p, root))
    assert len(dm.predict_dataset) == len(files)
    other = _dm(root, val_fraction=0.25, seed=1)
    assert other.split_files("val") == val
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 28, 28)


def test_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope")):
        _dm(tmp_path / "nope").setup("fit")


def test_no_images(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.md").write_text("x")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'empty'} contains no images"):
        _dm(tmp_path / "empty").setup("predict")


def test_unreadable_image_names_path(data_folder):
    root, _ = data_folder
    bad = root / "a" / "1.JPG"
    bad.write_bytes(b"\x00" * 100)
    dm = _dm(root)
    dm.setup("predict")
    with pytest.raises(ImageReadError, match=str(bad)):
        dm.predict_dataset[0]
