"""Flowers102DataModule on a tiny fake Oxford Flowers-102 folder in torchvision's layout, and its
foreground masks against PDiscoFormer's Flowers102Seg rule re-typed."""

import os
import types

import numpy as np
import pytest
import scipy.io
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image
from torchvision import transforms

from mpae_lightning.check_data import check_datamodule
from mpae_lightning.data import DatasetFormatError, Flowers102DataModule, ImageReadError
from mpae_lightning.data.flowers import flowers102_foreground, read_flowers102
from mpae_lightning.errors import ConfigError

#: image id -> (width, height); ids 1..10 as image_00001.jpg ...
_SIZES = {1: (40, 30), 2: (30, 30), 3: (36, 44), 4: (41, 29), 5: (32, 32), 6: (48, 26), 7: (30, 40), 8: (27, 35),
          9: (35, 35), 10: (44, 38)}
#: setid.mat, deliberately not sorted: the split keeps this order (torchvision's)
_SPLITS = {"trnid": [3, 1, 7], "valid": [2, 9], "tstid": [10, 4, 6, 5, 8]}
#: imagelabels.mat, 1-based class of image id i at position i - 1
_LABELS = [5, 1, 2, 2, 7, 1, 3, 5, 9, 4]
#: segmim images saved as real JPEG (the rest as lossless PNG data under the .jpg name, to place exact values)
_JPEG = {6}


def _segmim(img_id, w, h):
    """A segmim image: pure-blue background with JPEG-like near-blue noise, a flower of random colours
    (some bluish pixels among them), isolated speckles and, in image 10, a 6x6 block whose G + R is
    256 (the uint8 sum of PDiscoFormer's rule wraps to 0 there: background)."""
    rng = np.random.default_rng(img_id)
    yy, xx = np.mgrid[:h, :w]
    flower = (yy - h / 2) ** 2 / (h / 3) ** 2 + (xx - w / 2.5) ** 2 / (w / 3) ** 2 < 1
    if img_id in _JPEG:  # saved as JPEG: one colour on pure blue, the compression makes the near-blue noise
        seg = np.zeros((h, w, 3), dtype=np.uint8)
        seg[..., 2] = 254
        seg[flower] = (230, 200, 40)
        return seg
    seg = np.zeros((h, w, 3), dtype=np.uint8)
    seg[..., :2] = rng.integers(0, 3, (h, w, 2))  # R, G: 0..2
    seg[..., 2] = rng.integers(248, 256, (h, w))  # B: 248..255
    seg[flower] = rng.integers(0, 256, (int(flower.sum()), 3))
    seg[flower & (xx % 7 == 0)] = (3, 2, 200)  # bluish petal: 200 / 5 = 40, not above 100 -> flower
    for y, x in rng.integers(0, (h, w), (4, 2)):
        seg[y, x] = (230, 40, 60) if not flower[y, x] else (0, 0, 255)  # speckles the median removes
    if img_id == 10:
        cy, cx = h // 2 - 3, int(w / 2.5) - 3
        seg[cy:cy + 6, cx:cx + 6] = (200, 56, 180)
    return seg


def make_fake_flowers(parent, with_segmim=True):
    """``parent/flowers-102/`` as torchvision's Flowers102 lays it out, plus ``segmim/``."""
    base = parent / "flowers-102"
    (base / "jpg").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(base / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in _SPLITS.items()})
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([_LABELS], dtype=np.uint8)})
    rng = np.random.default_rng(0)
    for img_id, (w, h) in _SIZES.items():  # textured, so a random model's parts vary over the image
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(base / "jpg" / f"image_{img_id:05d}.jpg")
    if with_segmim:
        (base / "segmim").mkdir(exist_ok=True)
        for img_id, (w, h) in _SIZES.items():
            path = base / "segmim" / f"segmim_{img_id:05d}.jpg"
            if img_id in _JPEG:
                Image.fromarray(_segmim(img_id, w, h)).save(path, "JPEG", quality=95, subsampling=0)
            else:
                Image.fromarray(_segmim(img_id, w, h)).save(path, "PNG")
    return parent


@pytest.fixture
def flowers_root(tmp_path):
    return make_fake_flowers(tmp_path / "flowers102")


def _dm(root, **kw):
    kw.setdefault("image_size", 28)
    kw.setdefault("batch_size", 2)
    kw.setdefault("mini_group", 2)
    kw.setdefault("eval_batch_size", 2)
    kw.setdefault("num_workers", 0)
    return Flowers102DataModule(root=str(root), **kw)


def _median_blur5(binary):
    """cv2.medianBlur(binary, 5) re-typed: the median of each 5x5 window, borders replicated."""
    windows = sliding_window_view(np.pad(binary, 2, mode="edge"), (5, 5))
    return np.median(windows, axis=(-2, -1)).astype(np.uint8)


def pdiscoformer_fg_mask(path, size):
    """PDiscoFormer's data_sets/flowers102seg.py (Flowers102Seg.__getitem__) re-typed, then its mask
    resize (torchvision Resize, NEAREST, on the float tensor) to size x size instead of resize + crop."""
    seg_image = np.array(Image.open(path).convert("RGB"))
    seg_image = seg_image[:, :, ::-1].copy()  # RGB -> BGR
    binary_mask = ((seg_image[:, :, 0] / (seg_image[:, :, 1] + seg_image[:, :, 2] + 1e-6)) > 100).astype(np.uint8)
    binary_mask = 1 - binary_mask
    if len(np.unique(binary_mask)) > 1:
        binary_mask = _median_blur5(binary_mask)
    seg = torch.as_tensor(binary_mask, dtype=torch.float32).unsqueeze(0)
    seg = transforms.Resize((size, size), interpolation=transforms.InterpolationMode.NEAREST)(seg)
    return seg.squeeze(0) == 1


def _segmim_path(root, img_id):
    return root / "flowers-102" / "segmim" / f"segmim_{img_id:05d}.jpg"


# --------------------------------------------------------------------------- splits
def test_splits_sizes_order_and_labels_follow_setid(flowers_root):
    for split, key in (("train", "trnid"), ("val", "valid"), ("test", "tstid")):
        records = read_flowers102(str(flowers_root), split)
        assert [os.path.basename(r.path) for r in records] == [f"image_{i:05d}.jpg" for i in _SPLITS[key]]
        assert [r.label for r in records] == [_LABELS[i - 1] - 1 for i in _SPLITS[key]]
    # the flowers-102 folder itself reads the same
    assert read_flowers102(str(flowers_root / "flowers-102"), "test") == read_flowers102(str(flowers_root), "test")
    dm = _dm(flowers_root)
    assert (dm.has_keypoints, dm.has_masks, dm.has_fg_masks) == (False, False, False)
    dm.setup()
    assert len(dm.train_dataset) == 3 and len(dm.test_dataset) == 5
    assert dm.val_dataset is dm.test_dataset and dm.predict_dataset is dm.test_dataset  # PDiscoFormer: eval on tstid
    assert dm.val_split == "test"
    assert dm.train_dataset.labels == [1, 4, 2]  # image 3 is class 2, image 1 class 5, image 7 class 3 (1-based)


def test_batches(flowers_root):
    dm = _dm(flowers_root)
    dm.setup()
    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (2, 3, 28, 28) and "fg_mask" not in train and "keypoints" not in train
    test = next(iter(dm.test_dataloader()))
    assert test["index"].tolist() == [0, 1] and test["label"].tolist() == [3, 1]
    assert test["path"][0].endswith(os.path.join("flowers-102", "jpg", "image_00010.jpg"))
    assert "fg_mask" not in test and "keypoints" not in test and "mask" not in test


# --------------------------------------------------------------------------- foreground masks
def test_foreground_rule_keeps_near_blue_noise_out_and_wraps_as_theirs():
    blue = np.zeros((9, 9, 3), dtype=np.uint8)
    blue[..., 2] = 254
    blue[0, 0] = (2, 1, 250)  # JPEG noise around pure blue: 250 / 3 > 100 -> background
    blue[3:8, 3:8] = (3, 2, 200)  # bluish flower: 200 / 5 = 40 -> foreground
    fg = flowers102_foreground(blue)
    assert fg.dtype == bool and fg.shape == (9, 9)
    assert not fg[0, 0] and fg[4:7, 4:7].all() and fg.sum() < 81
    # G + R summed in uint8 as theirs: 200 + 56 wraps to 0 and 200 + 57 to 1 (180 / 1 > 100), so those
    # bright pixels count as background; 200 + 59 wraps to 3 (180 / 3 = 60) and 100 + 56 does not wrap
    pixels = np.array([[[200, 56, 180], [200, 57, 180], [200, 59, 180], [100, 56, 180]]], dtype=np.uint8)
    assert [bool(flowers102_foreground(p[None, None])[0, 0]) for p in pixels[0]] == [False, False, True, True]


def test_eval_items_carry_pdiscoformers_foreground_mask(flowers_root):
    plain = _dm(flowers_root)
    dm = _dm(flowers_root, segmentations=str(flowers_root / "flowers-102" / "segmim"))
    assert dm.has_fg_masks is True and dm.has_keypoints is False and dm.has_masks is False
    dm.setup("test")
    plain.setup("test")
    batch = next(iter(dm.test_dataloader()))
    reference = next(iter(plain.test_dataloader()))
    assert set(batch) == set(reference) | {"fg_mask"}
    for key in ("image", "index", "label"):
        assert torch.equal(batch[key], reference[key]), key
    assert batch["fg_mask"].shape == (2, 28, 28) and batch["fg_mask"].dtype == torch.bool
    for index, img_id in enumerate(_SPLITS["tstid"]):
        fg = dm.test_dataset[index]["fg_mask"]
        expected = pdiscoformer_fg_mask(_segmim_path(flowers_root, img_id), 28)
        assert torch.equal(fg, expected), img_id
        assert 0.05 < expected.float().mean() < 0.95
    # The rule matters on this data: exact pure blue alone, or no median, would give other masks.
    rgb = np.array(Image.open(_segmim_path(flowers_root, 10)).convert("RGB"))
    no_tolerance = ~(rgb == (0, 0, 255)).all(-1)
    ours = flowers102_foreground(rgb)
    assert (no_tolerance & ~ours).sum() > 0.3 * (~ours).sum()  # most background pixels are near-blue noise
    no_wrap = ~(rgb[..., 2] / (rgb[..., 1].astype(np.int64) + rgb[..., 0] + 1e-6) > 100)
    assert (no_wrap & ~ours).sum() >= 4  # the wrapped block stays background after the median
    # every folder that contains segmim/ reads the same: flowers-102/ and torchvision's root
    for folder in (flowers_root / "flowers-102", flowers_root):
        other = _dm(flowers_root, segmentations=str(folder))
        other.setup("test")
        assert torch.equal(other.test_dataset[1]["fg_mask"], batch["fg_mask"][1])
    squashed = _dm(flowers_root, segmentations=str(flowers_root), input_antialias=False)
    squashed.setup("test")
    assert torch.equal(squashed.test_dataset[0]["fg_mask"], batch["fg_mask"][0])  # same geometry either way


def test_median_is_opencvs_on_binary_images():
    from mpae_lightning.data.flowers import _median5

    rng = np.random.default_rng(3)
    for _ in range(20):
        h, w = rng.integers(1, 20, 2)
        binary = (rng.random((h, w)) < rng.random()).astype(np.uint8)
        assert np.array_equal(_median5(binary), _median_blur5(binary).astype(bool))


def test_held_out_validation_images_carry_their_masks(flowers_root):
    dm = _dm(flowers_root, segmentations=str(flowers_root), val_fraction=0.34)
    dm.setup("fit")
    assert len(dm.train_dataset) == 2 and len(dm.val_dataset) == 1 and dm.val_split == "holdout"
    item = dm.val_dataset[0]
    img_id = int(os.path.basename(item["path"])[6:11])
    assert img_id in _SPLITS["trnid"]
    assert torch.equal(item["fg_mask"], pdiscoformer_fg_mask(_segmim_path(flowers_root, img_id), 28))
    assert "fg_mask" not in dm.train_dataset[0]  # training items carry the image only


def test_check_data_reads_every_item_and_names_a_bad_segmentation(flowers_root):
    dm = _dm(flowers_root, segmentations=str(flowers_root))
    total, problems = check_datamodule(dm, ["train", "val", "test", "predict"], progress=False)
    assert (total, problems) == (3 + 5, [])  # val and predict are the test split, read once
    Image.new("RGB", (5, 5), (0, 0, 255)).save(_segmim_path(flowers_root, 4))
    (flowers_root / "flowers-102" / "segmim" / "segmim_00006.jpg").write_bytes(b"not a jpeg")
    total, problems = check_datamodule(_dm(flowers_root, segmentations=str(flowers_root)), ["test"], progress=False)
    assert total == 5 and len(problems) == 2, problems
    assert any("segmim_00004.jpg is 5x5 but its image is 41x29" in p and "test[1]" in p for p in problems)
    assert any("cannot read segmentation image" in p and "segmim_00006.jpg" in p for p in problems)


def test_mpae_test_accepts_data_with_only_foreground_masks(flowers_root):
    from mpae_lightning.cli import MPAECLI

    MPAECLI.before_test(types.SimpleNamespace(datamodule=_dm(flowers_root, segmentations=str(flowers_root))))
    with pytest.raises(ConfigError, match="Flowers102DataModule .* has no keypoints or masks to score.*segmentations"):
        MPAECLI.before_test(types.SimpleNamespace(datamodule=_dm(flowers_root)))


# --------------------------------------------------------------------------- missing or bad files
def test_missing_files_are_named(flowers_root, tmp_path):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=rf"Flowers-102 root {nowhere} does not exist"):
        _dm(nowhere).setup("test")
    base = flowers_root / "flowers-102"
    os.rename(base / "imagelabels.mat", tmp_path / "labels.mat")
    with pytest.raises(FileNotFoundError, match=rf"{base / 'imagelabels.mat'} does not exist; expected"):
        _dm(flowers_root).setup("test")
    os.rename(tmp_path / "labels.mat", base / "imagelabels.mat")
    os.rename(base / "setid.mat", tmp_path / "setid.mat")
    with pytest.raises(FileNotFoundError, match=rf"Flowers-102 root {flowers_root} does not contain setid.mat"):
        _dm(flowers_root).setup("test")
    os.rename(tmp_path / "setid.mat", base / "setid.mat")
    os.remove(base / "jpg" / "image_00005.jpg")
    with pytest.raises(FileNotFoundError, match=r"1 of 5 images listed in .*setid.mat do not exist") as err:
        _dm(flowers_root).setup("test")
    assert str(base / "jpg" / "image_00005.jpg") in str(err.value)


def test_missing_segmentations_are_named_in_one_line(flowers_root):
    missing = _segmim_path(flowers_root, 5)
    os.remove(missing)
    with pytest.raises(FileNotFoundError) as err:
        _dm(flowers_root, segmentations=str(flowers_root)).setup("test")
    message = str(err.value)
    assert "\n" not in message and str(missing) in message and message.startswith("1 of 5 segmentation images")
    _dm(flowers_root).setup("test")  # without the setting nothing is looked for
    _dm(flowers_root, segmentations=str(flowers_root)).dataset("train")  # training images need none
    nowhere = flowers_root / "no_such_folder"
    with pytest.raises(FileNotFoundError, match=rf"Flowers-102 segmentations folder {nowhere} does not exist"):
        _dm(flowers_root, segmentations=str(nowhere)).setup("test")


def test_bad_mat_files_are_named(flowers_root):
    base = flowers_root / "flowers-102"
    scipy.io.savemat(base / "setid.mat", {"trnid": np.array([[1, 2]], dtype=np.uint16)})
    with pytest.raises(DatasetFormatError, match=r"setid.mat has no array 'tstid' \(found: trnid\)"):
        _dm(flowers_root).setup("test")
    scipy.io.savemat(base / "setid.mat", {"tstid": np.array([[4, 11]], dtype=np.uint16)})
    with pytest.raises(DatasetFormatError, match=r"image id 11 of 'tstid' has no class in .*imagelabels.mat"):
        _dm(flowers_root).setup("test")
    scipy.io.savemat(base / "setid.mat", {"tstid": np.array([[4, 0]], dtype=np.int32)})
    with pytest.raises(DatasetFormatError, match=r"'tstid' must be a vector of positive integers"):
        _dm(flowers_root).setup("test")
    (base / "imagelabels.mat").write_bytes(b"not a MATLAB file at all, just text")
    scipy.io.savemat(base / "setid.mat", {"tstid": np.array([[4]], dtype=np.uint16)})
    with pytest.raises(DatasetFormatError, match=r"cannot read .*imagelabels.mat as a MATLAB file"):
        _dm(flowers_root).setup("test")


def test_unreadable_segmentation_names_the_file(flowers_root):
    path = _segmim_path(flowers_root, 10)
    path.write_bytes(b"\xff\xd8 truncated")
    dm = _dm(flowers_root, segmentations=str(flowers_root))
    dm.setup("test")
    with pytest.raises(ImageReadError, match=rf"cannot read segmentation image {path}"):
        dm.test_dataset[0]
