"""Annotation problems named with file and line, and `mpae check-data` listing every bad file at once."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mpae_lightning.cli import main
from mpae_lightning.data import DatasetFormatError
from test_data_celeba import _dm as celeba_dm
from test_data_celeba import make_fake_celeba
from test_data_cub import _dm as cub_dm
from test_data_cub import make_fake_cub
from test_data_partimagenet import _dm as pin_dm
from test_data_partimagenet import make_fake_seg


# ------------------------------------------------------------------------------------------- CUB
@pytest.mark.parametrize(
    "file, edit, words",
    [
        ("parts/part_locs.txt", lambda t: t.replace("\n", " 7\n", 3), ["part_locs.txt line 1", "expected 5 fields", "got 6"]),
        ("train_test_split.txt", lambda t: t.replace("2 1", "2 7"), ["train_test_split.txt line 2", "expected one of 0, 1", "'7'"]),
        ("train_test_split.txt", lambda t: t.replace("3 1", "3 yes"), ["train_test_split.txt line 3", "integer", "'yes'"]),
        ("parts/part_locs.txt", lambda t: t.replace("1 2 ", "1 99 ", 1), ["part_locs.txt line 2", "part id 99"]),
        ("parts/part_locs.txt", lambda t: t.replace("1 1 1.0", "1 1 nan", 1), ["part_locs.txt line 1", "finite"]),
        ("images.txt", lambda t: t.replace("4 ", "four ", 1), ["images.txt line 4", "'four'"]),
    ],
    ids=["extra-column", "is_train-7", "is_train-word", "part-id", "nan-coordinate", "image-id"],
)
def test_cub_annotation_errors_name_file_and_line(tmp_path, file, edit, words):
    root = make_fake_cub(tmp_path / "CUB_200_2011")
    path = root / file
    path.write_text(edit(path.read_text()))
    with pytest.raises(DatasetFormatError) as err:
        cub_dm(root).setup("fit")
    for word in words:
        assert word in str(err.value), (word, str(err.value))


def test_cub_binary_split_file_is_a_format_error(tmp_path):
    root = make_fake_cub(tmp_path / "CUB_200_2011")
    (root / "train_test_split.txt").write_bytes(b"1 0\n2 1\n\xff\xfe\x00binary")
    with pytest.raises(DatasetFormatError, match=r"train_test_split.txt line 3: not UTF-8 text"):
        cub_dm(root).setup("fit")


# ---------------------------------------------------------------------------------------- CelebA
def test_celeba_nan_landmark_is_refused_with_line(tmp_path):
    root = make_fake_celeba(tmp_path / "celeba")
    lines = (root / "test_lm.txt").read_text().splitlines()
    lines[1] = lines[1].split(",", 1)[0] + ",nan," + lines[1].split(",", 2)[2]
    (root / "test_lm.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetFormatError, match=r"test_lm.txt line 2: landmark coordinates must be finite"):
        celeba_dm(root).setup("test")


# ---------------------------------------------------------------------------------- PartImageNet
def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda d: d["annotations"][0].pop("segmentation"), ["annotation 1", "'segmentation'"]),
        (lambda d: d["images"][0].pop("height"), ["image n01440764_1.JPEG", "'height'"]),
        (lambda d: d["annotations"][0].update(segmentation=[["a", "b"]]), ["annotation 1", "lists of numbers"]),
        (lambda d: d["annotations"][0].update(segmentation=7), ["annotation 1", "list of polygons or an RLE"]),
        (lambda d: d["annotations"][0].update(segmentation={"counts": [1, 2]}), ["annotation 1", "'size'"]),
        (lambda d: d["images"][0].update(width="wide"), ["n01440764_1.JPEG", "integers"]),
    ],
    ids=["no-segmentation", "no-height", "non-numeric-polygon", "segmentation-int", "rle-without-size", "width-text"],
)
def test_partimagenet_annotation_errors_name_the_entry(tmp_path, edit, words):
    root = make_fake_seg(tmp_path / "seg")
    _edit_json(root / "annotations" / "test" / "test.json", edit)
    with pytest.raises(DatasetFormatError) as err:
        pin_dm(root, "seg").setup("test")
    for word in ["test.json", *words]:
        assert word in str(err.value), (word, str(err.value))


def test_partimagenet_size_mismatch_is_reported_for_the_image(tmp_path):
    root = make_fake_seg(tmp_path / "seg")
    _edit_json(root / "annotations" / "test" / "test.json", lambda d: d["images"][0].update(width=32))
    dm = pin_dm(root, "seg")
    dm.setup("test")
    with pytest.raises(DatasetFormatError, match=r"n01440764_1.JPEG is 16x16 pixels but annotated as 32x16"):
        dm.test_dataset[0]


# -------------------------------------------------------------------------------- mpae check-data
def _folder_args(root) -> list[str]:
    return ["check-data", "--data=mpae_lightning.data.ImageFolderDataModule", f"--data.init_args.root={root}",
            "--data.init_args.image_size=32", "--data.init_args.batch_size=2", "--data.init_args.mini_group=2",
            "--data.init_args.num_workers=2", "--no_progress"]


def test_check_data_lists_every_bad_file_at_once(tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    for i in range(5):
        Image.fromarray(np.full((20, 30, 3), 40 * i, np.uint8)).save(root / f"{i}.png")
    (root / "corrupt.png").write_bytes(b"not an image")
    good = (root / "0.png").read_bytes()
    (root / "truncated.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(SystemExit) as stop:
        main(_folder_args(root))
    assert stop.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "mpae: error:" in line]
    assert len(errors) == 1 and "2 problem(s) in 14 items" in errors[0], err
    assert "corrupt.png" in err and "truncated.png" in err and "Traceback" not in err


def test_check_data_passes_good_data_and_names_annotation_problems(tmp_path, capsys):
    root = make_fake_cub(tmp_path / "CUB_200_2011")
    args = ["check-data", "--data=mpae_lightning.data.CUBDataModule", f"--data.init_args.root={root}",
            "--data.init_args.image_size=28", "--data.init_args.batch_size=2", "--data.init_args.mini_group=2",
            "--data.init_args.num_workers=0", "--no_progress"]
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 0
    assert "all 5 items of splits train, val, test read fine" in capsys.readouterr().out
    (root / "parts" / "part_locs.txt").write_text("1 1 1.0 2.0\n")
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "part_locs.txt line 1" in err and len([x for x in err.splitlines() if "mpae: error:" in x]) == 1
