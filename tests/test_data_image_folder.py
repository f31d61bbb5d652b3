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


def test_reads_every_format_pillow_opens(tmp_path):
    """TIFF (8 and 16 bit), GIF (first frame), WebP and the rest of Pillow's formats are found and read; files
    that look like images but that Pillow cannot open are skipped with one warning naming them."""
    import numpy as np
    import torch

    from mpae_lightning.data.image_folder import image_extensions
    from mpae_lightning.data.transforms import eval_transform

    root = tmp_path / "formats"
    root.mkdir()
    red, blue = Image.new("RGB", (24, 18), (220, 10, 10)), Image.new("RGB", (24, 18), (10, 10, 220))
    red.save(root / "rgb.tif")
    Image.fromarray((np.arange(18 * 24, dtype=np.uint16).reshape(18, 24) * 150)).save(root / "gray16.tiff")
    red.save(root / "animated.gif", save_all=True, append_images=[blue])  # first frame red, second blue
    red.save(root / "still.webp")
    red.save(root / "plain.ppm")
    (root / "photo.heic").write_bytes(b"not decodable without a plugin")
    (root / "drawing.svg").write_text("<svg/>")
    (root / "paper.pdf").write_bytes(b"%PDF-1.4")  # Pillow writes PDFs but cannot read them: ignored
    (root / "notes.txt").write_text("not an image")
    assert {".tif", ".tiff", ".gif", ".webp", ".ppm"} <= set(image_extensions()) and ".pdf" not in image_extensions()

    dm = _dm(root)
    with pytest.warns(UserWarning, match=r"skipped 2 file\(s\) that Pillow cannot open: drawing.svg, photo.heic"):
        files = dm.files()
    assert [os.path.basename(p) for p in files] == ["animated.gif", "gray16.tiff", "plain.ppm", "rgb.tif", "still.webp"]
    dm.setup("predict")
    items = {os.path.basename(dm.predict_dataset[i]["path"]): dm.predict_dataset[i]["image"] for i in range(len(files))}
    expected_red = eval_transform(28)(red)
    for name in ("animated.gif", "rgb.tif", "plain.ppm"):
        assert torch.allclose(items[name], expected_red, atol=0.05), name  # the GIF's first frame, not the blue one
    assert items["still.webp"][0].mean() > items["still.webp"][2].mean()  # lossy, but red
    gray = items["gray16.tiff"] * torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1) + torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    assert torch.allclose(gray[0], gray[2], atol=1e-5)  # gray
    assert gray[0].min() < 0.05 and gray[0].max() > 0.95  # the 16-bit ramp scaled to 0..255, not clipped to white


def test_a_folder_of_only_unopenable_images_names_them(tmp_path):
    root = tmp_path / "heic"
    root.mkdir()
    (root / "a.heic").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match=r"contains no images.*skipped 1 file\(s\) that Pillow cannot open: a.heic"):
        _dm(root).files()


def test_input_antialias_false_reads_images_as_the_authors_celeba_loader(tmp_path):
    """``input_antialias=False`` squashes every split without antialiasing; the default antialiases."""
    import numpy as np
    import torch

    from mpae_lightning.data.transforms import input_transform

    root = tmp_path / "noise"
    root.mkdir()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    image.save(root / "a.png")
    for antialias in (False, True):
        dm = ImageFolderDataModule(str(root), image_size=28, batch_size=1, mini_group=1, num_workers=0,
                                   input_antialias=antialias)
        dm.setup("predict")
        assert dm.input_antialias is antialias
        assert torch.equal(dm.predict_dataset[0]["image"], input_transform(28, antialias)(image))
