"""CelebADataModule on a tiny fake unaligned CelebA folder with split lists in the real syntax."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from mpae_lightning.data import CelebADataModule, DatasetFormatError, ImageReadError
from mpae_lightning.data.celeba import default_celeba_list
from mpae_lightning.data.transforms import denormalize

# name, (width, height), five (x, y) landmarks in original pixels
_TRAIN = [
    ("000007.jpg", (60, 80), [(20, 30), (40, 30), (30, 45), (22, 60), (38, 60)]),
    ("000013.jpg", (50, 50), [(10, 12), (35, 13), (25, 30), (15, 40), (33, 41)]),
    ("000016.jpg", (40, 60), [(12, 20), (28, 21), (20, 30), (14, 45), (27, 44)]),
    ("000020.jpg", (64, 64), [(20, 20), (44, 20), (32, 32), (24, 48), (40, 48)]),
]
_TEST = [
    ("118950.jpg", (100, 50), [(25.0, 10.0), (75.0, 10.0), (50.0, 25.0), (30.0, 40.0), (70.0, 40.0)]),
    ("061733.jpg", (32, 32), [(8, 8), (24, 8), (16, 16), (10, 24), (22, 24)]),
]


def _write_list(path, entries):
    path.write_text(
        "".join(name + "," + ",".join(f"{v:.1f}" for xy in lm for v in xy) + "\n" for name, _, lm in entries)
    )


def make_fake_celeba(root):
    (root / "img_celeba").mkdir(parents=True)
    for name, (w, h), _ in _TRAIN + _TEST:
        Image.new("RGB", (w, h), (120, 80, 60)).save(root / "img_celeba" / name, "JPEG")
    _write_list(root / "train_lm.txt", _TRAIN)
    _write_list(root / "test_lm.txt", _TEST)
    return root


@pytest.fixture
def data_celeba_root(tmp_path):
    return make_fake_celeba(tmp_path / "celeba")


def _dm(root, **kw):
    kw.setdefault("train_list", str(root / "train_lm.txt"))
    kw.setdefault("test_list", str(root / "test_lm.txt"))
    return CelebADataModule(root=str(root), image_size=28, batch_size=4, mini_group=2, num_workers=0, **kw)


def test_counts_keypoints_visibility(data_celeba_root):
    dm = _dm(data_celeba_root)
    dm.setup()
    assert len(dm.train_dataset) == 4 and len(dm.test_dataset) == 2
    assert dm.val_dataset is dm.test_dataset
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (2, 3, 28, 28)
    assert batch["index"].tolist() == [0, 1]
    assert batch["label"].tolist() == [-1, -1]
    assert [os.path.basename(p) for p in batch["path"]] == ["118950.jpg", "061733.jpg"]
    assert batch["keypoints"].shape == (2, 5, 2)
    assert batch["visible"].all()
    # by hand: 100x50 image, (25, 10) -> (25 * 28 / 100, 10 * 28 / 50) = (7.0, 5.6)
    assert torch.allclose(batch["keypoints"][0, 0], torch.tensor([7.0, 5.6]), atol=1e-5)
    assert torch.allclose(batch["keypoints"][0, 2], torch.tensor([14.0, 14.0]), atol=1e-5)
    assert torch.allclose(batch["keypoints"][1], torch.tensor(_TEST[1][2], dtype=torch.float32) * 28 / 32, atol=1e-5)


def test_train_loader(data_celeba_root):
    dm = _dm(data_celeba_root)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 28, 28)
    assert sorted(batch["index"].tolist()) == [0, 1, 2, 3]


def test_shipped_lists_are_the_paper_split():
    train, test = default_celeba_list("train"), default_celeba_list("test")
    with open(train) as fh:
        lines = fh.read().splitlines()
    assert len(lines) == 45609
    assert lines[0].startswith("000007.jpg,") and len(lines[0].split(",")) == 11
    with open(test) as fh:
        assert len(fh.read().splitlines()) == 283


def test_shipped_list_used_by_default_and_missing_images_reported(data_celeba_root):
    dm = CelebADataModule(root=str(data_celeba_root), image_size=28, num_workers=0)
    with pytest.raises(FileNotFoundError) as err:
        dm.setup("test")
    msg = str(err.value)
    assert "of 283 images listed in" in msg and "MAFL_test_lm.txt" in msg
    assert str(data_celeba_root / "img_celeba") in msg and "... and" in msg


def test_missing_root(tmp_path):
    root = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=rf"CelebA root {root} .*img_celeba"):
        _dm(root).setup("fit")


def test_missing_img_celeba(tmp_path):
    root = tmp_path / "celeba"
    root.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"CelebA root {root} does not contain img_celeba/"):
        _dm(root, train_list=None, test_list=None).setup("test")


def test_missing_list_file(data_celeba_root):
    lst = data_celeba_root / "absent.txt"
    with pytest.raises(FileNotFoundError, match=rf"{lst} does not exist; expected a CelebA landmark list"):
        _dm(data_celeba_root, test_list=str(lst)).setup("test")


def test_missing_image(data_celeba_root):
    os.remove(data_celeba_root / "img_celeba" / "061733.jpg")
    with pytest.raises(FileNotFoundError, match=r"(?s)1 of 2 images listed in .*test_lm.txt.*061733.jpg"):
        _dm(data_celeba_root).setup("test")


def test_malformed_line(data_celeba_root):
    with open(data_celeba_root / "test_lm.txt", "a") as fh:
        fh.write("000001.jpg,1.0,2.0\n")
    with pytest.raises(DatasetFormatError, match=r"test_lm.txt line 3: expected 'name,x1,y1,...,x5,y5'"):
        _dm(data_celeba_root).setup("test")


def test_rgba_and_palette_images(data_celeba_root):
    Image.new("RGBA", (100, 50), (1, 2, 3, 0)).save(data_celeba_root / "img_celeba" / "118950.jpg", "PNG")
    Image.new("P", (32, 32)).save(data_celeba_root / "img_celeba" / "061733.jpg", "GIF")
    dm = _dm(data_celeba_root)
    dm.setup("test")
    assert dm.test_dataset[0]["image"].shape == (3, 28, 28)
    assert dm.test_dataset[1]["image"].shape == (3, 28, 28)


def _bilinear_reference(image: np.ndarray, size: int) -> np.ndarray:
    """cv2.resize(image, (size, size)) (INTER_LINEAR) if OpenCV is installed, else the same
    half-pixel-centre bilinear without antialiasing written out in float64 numpy."""
    try:
        import cv2
    except ImportError:
        cv2 = None
    if cv2 is not None:
        return cv2.resize(image, (size, size)).astype(np.float64)

    def taps(n_in):
        src = np.maximum((np.arange(size) + 0.5) * n_in / size - 0.5, 0.0)
        lo = np.minimum(np.floor(src).astype(int), n_in - 1)
        hi = np.minimum(lo + 1, n_in - 1)
        return lo, hi, src - lo

    img = image.astype(np.float64)
    lo, hi, w = taps(img.shape[0])
    img = img[lo] * (1 - w)[:, None, None] + img[hi] * w[:, None, None]
    lo, hi, w = taps(img.shape[1])
    img = img[:, lo] * (1 - w)[None, :, None] + img[:, hi] * w[None, :, None]
    return np.floor(img + 0.5)


def _to_pixels(item_image):
    return (denormalize(item_image) * 255).permute(1, 2, 0).double().numpy()


def test_images_squashed_like_the_authors_before_augmentation(tmp_path):
    # A portrait 300x500 image with distinctive bands in its top and bottom 10 %. The authors squash
    # CelebA images to SxS before the flip/affine, so both bands stay in every training sample; a
    # resize of the shorter side followed by a random SxS crop can never show both.
    root = tmp_path / "celeba"
    (root / "img_celeba").mkdir(parents=True)
    pixels = np.zeros((500, 300, 3), dtype=np.uint8)
    pixels[:] = (40, 200, 40)
    pixels[:50] = (230, 20, 20)
    pixels[450:] = (20, 20, 230)
    Image.fromarray(pixels).save(root / "img_celeba" / "000001.png")
    (root / "lm.txt").write_text("000001.png,100,100,200,100,150,250,110,400,190,400\n")
    dm = CelebADataModule(
        root=str(root), train_list=str(root / "lm.txt"), test_list=str(root / "lm.txt"), image_size=64,
        batch_size=1, mini_group=1, num_workers=0,
    )
    dm.setup()
    torch.manual_seed(0)
    both = 0
    for _ in range(200):
        img = denormalize(dm.train_dataset[0]["image"])
        red = ((img[0] > 0.7) & (img[1] < 0.3) & (img[2] < 0.3)).sum()
        blue = ((img[2] > 0.7) & (img[0] < 0.3) & (img[1] < 0.3)).sum()
        both += int(red >= 20 and blue >= 20)
    assert both == 200
    item = dm.test_dataset[0]
    assert np.abs(_to_pixels(item["image"]) - _bilinear_reference(pixels, 64)).max() <= 1.01
    assert torch.allclose(item["keypoints"][0], torch.tensor([100 * 64 / 300, 100 * 64 / 500]))


@pytest.mark.parametrize("shape", [(218, 178), (37, 91), (20, 30)])
def test_test_items_match_a_direct_squash_within_a_grey_level(tmp_path, shape):
    # Noise shows any antialiasing (the old evaluation resize was 0.4 normalised units away).
    root = tmp_path / "celeba"
    (root / "img_celeba").mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "img_celeba" / "000002.png")
    (root / "lm.txt").write_text("000002.png," + ",".join(["5.0"] * 10) + "\n")
    dm = _dm(root, train_list=str(root / "lm.txt"), test_list=str(root / "lm.txt"))
    dm.setup("test")
    got = _to_pixels(dm.test_dataset[0]["image"])
    assert np.abs(got - _bilinear_reference(pixels, 28)).max() <= 1.01


def test_input_antialias_true_reads_celeba_with_torchvisions_resize(tmp_path):
    """``input_antialias`` defaults to False (the authors' squash, above); True antialiases, on both splits."""
    from mpae_lightning.data.transforms import eval_transform

    root = tmp_path / "celeba"
    (root / "img_celeba").mkdir(parents=True)
    pixels = np.random.default_rng(0).integers(0, 256, (218, 178, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(root / "img_celeba" / "000002.png")
    (root / "lm.txt").write_text("000002.png," + ",".join(["5.0"] * 10) + "\n")
    assert _dm(root).input_antialias is False
    dm = _dm(root, train_list=str(root / "lm.txt"), test_list=str(root / "lm.txt"), input_antialias=True)
    dm.setup("fit")
    assert torch.equal(dm.test_dataset[0]["image"], eval_transform(28)(Image.fromarray(pixels)))
    assert np.abs(_to_pixels(dm.test_dataset[0]["image"]) - _bilinear_reference(pixels, 28)).max() > 20
    assert not dm.train_dataset.squash


def test_items_carry_the_isotropic_frame_and_squashed_leaves_it_out(data_celeba_root):
    batch = next(iter(_loader(_dm(data_celeba_root))))
    # 100x50 original: (W, H) / min(W, H) = (2, 1); 32x32: (1, 1)
    assert batch["isotropic_scale"].tolist() == [[2.0, 1.0], [1.0, 1.0]]
    # squashed (7.0, 5.6) in the 28x28 input -> isotropic (14.0, 5.6) = original (25, 10) * 28 / 50
    assert torch.allclose(batch["keypoints"][0, 0].double() * batch["isotropic_scale"][0],
                          torch.tensor([25.0, 10.0], dtype=torch.float64) * 28 / 50, atol=1e-5)
    assert "isotropic_scale" not in next(iter(_loader(_dm(data_celeba_root, kpr_coordinates="squashed"))))
    with pytest.raises(ValueError, match="kpr_coordinates must be 'isotropic' or 'squashed', got 'square'"):
        _dm(data_celeba_root, kpr_coordinates="square")


def _loader(dm):
    dm.setup("test")
    return dm.test_dataloader()


def _write_mafl(root, anno_dir, boxes):
    """MAFL_training.txt in root; CelebA's Anno files (count line, header line, rows) in anno_dir."""
    (root / "MAFL_training.txt").write_text("".join(f"{name}\n" for name in boxes))
    anno_dir.mkdir(exist_ok=True)
    entries = {name: lm for name, _, lm in _TRAIN}
    (anno_dir / "list_landmarks_unalign_celeba.txt").write_text(
        f"{len(boxes)}\nlefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
        "rightmouth_x rightmouth_y\n"
        + "".join(f"{name} " + " ".join(f"{v}" for xy in entries[name] for v in xy) + "\n" for name in boxes)
    )
    (anno_dir / "list_bbox_celeba.txt").write_text(
        f"{len(boxes)}\nimage_id x_1 y_1 width height\n"
        + "".join(f"{name}    {x} {y}  {w} {h}\n" for name, (x, y, w, h) in boxes.items())
    )


def test_kpr_fit_set_is_mafl_training_with_faces_over_30_percent(data_celeba_root):
    # 000007.jpg is 60x80 (4800 px), 000013.jpg 50x50 (2500), 000016.jpg 40x60 (2400)
    boxes = {"000007.jpg": (10, 10, 40, 36), "000013.jpg": (0, 0, 30, 24), "000016.jpg": (5, 5, 30, 24)}
    # face areas: 1440 >= 0.3 * 4800 (kept, exactly 30 %), 720 < 750 (dropped), 720 >= 720 (kept)
    _write_mafl(data_celeba_root, data_celeba_root / "Anno", boxes)
    dm = _dm(data_celeba_root)
    fit = dm.build_keypoint_fit_dataset()
    assert [os.path.basename(r.path) for r in fit.records] == ["000007.jpg", "000016.jpg"]
    item = fit[1]  # 40x60: landmarks squashed to 28x28, isotropic scale (1, 1.5)
    expected = torch.tensor(_TRAIN[2][2], dtype=torch.float32) * torch.tensor([28 / 40, 28 / 60])
    assert torch.allclose(item["keypoints"], expected, atol=1e-5)
    assert item["isotropic_scale"].tolist() == [1.0, 1.5]


def test_kpr_fit_set_absent_warns_and_uses_the_training_list(data_celeba_root):
    dm = _dm(data_celeba_root)
    with pytest.warns(UserWarning, match=r"MAFL_training.txt, list_landmarks_unalign_celeba.txt, list_bbox_celeba.txt "
                                         r"not found in .* fitted on the 4 training images .* not comparable"):
        fit = dm.build_keypoint_fit_dataset()
    assert len(fit) == 4
    # an explicit fitting list needs no MAFL files
    assert len(_dm(data_celeba_root, fit_list=str(data_celeba_root / "test_lm.txt")).build_keypoint_fit_dataset()) == 2


def test_kpr_fit_set_bad_annotation_is_named(data_celeba_root):
    _write_mafl(data_celeba_root, data_celeba_root, {"000007.jpg": (1, 1, 50, 50)})
    with open(data_celeba_root / "list_bbox_celeba.txt", "a") as fh:
        fh.write("000013.jpg 1 2 three 4\n")
    with pytest.raises(DatasetFormatError, match=r"list_bbox_celeba.txt line 4: expected an image name and 4 numbers"):
        _dm(data_celeba_root).build_keypoint_fit_dataset()
    (data_celeba_root / "MAFL_training.txt").write_text("000007.jpg\n000020.jpg\n")
    (data_celeba_root / "list_bbox_celeba.txt").write_text("1\nimage_id x_1 y_1 width height\n000007.jpg 1 1 50 50\n")
    with pytest.raises(DatasetFormatError, match=r"list_landmarks_unalign_celeba.txt has no line for 000020.jpg"):
        _dm(data_celeba_root).build_keypoint_fit_dataset()


def test_kpr_fit_set_names_the_line_and_every_unreadable_image(data_celeba_root):
    _write_mafl(data_celeba_root, data_celeba_root, {"000007.jpg": (1, 1, 50, 50), "000013.jpg": (1, 1, 40, 40),
                                                     "000016.jpg": (1, 1, 30, 40)})
    (data_celeba_root / "MAFL_training.txt").write_text("000007.jpg\n\n000020.jpg\n")
    with pytest.raises(DatasetFormatError, match=r"has no line for 000020.jpg, listed in .*MAFL_training.txt line 3$"):
        _dm(data_celeba_root).build_keypoint_fit_dataset()
    (data_celeba_root / "MAFL_training.txt").write_text("000007.jpg\n000013.jpg\n000016.jpg\n")
    for name in ("000007.jpg", "000016.jpg"):
        (data_celeba_root / "img_celeba" / name).write_bytes(b"not an image")
    with pytest.raises(ImageReadError, match=r"2 of 3 images listed in .*MAFL_training.txt cannot be read") as err:
        _dm(data_celeba_root).build_keypoint_fit_dataset()
    assert "000007.jpg (UnidentifiedImageError)" in str(err.value) and "000016.jpg" in str(err.value)
    assert "000013.jpg" not in str(err.value)
