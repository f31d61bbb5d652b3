"""Annotation problems named with file and line, and `mpae check-data` listing every bad file at once."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from mpae_lightning.cli import main
from mpae_lightning.data import DatasetFormatError
from test_data_celeba import _dm as celeba_dm
from test_data_celeba import _write_mafl as write_mafl
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


# ------------------------------------------------------------- mpae check-data: CelebA KPR fitting set
def _celeba_args(root, *extra) -> list[str]:
    return ["check-data", "--data=mpae_lightning.data.CelebADataModule", f"--data.init_args.root={root}",
            f"--data.init_args.train_list={root / 'train_lm.txt'}",
            f"--data.init_args.test_list={root / 'test_lm.txt'}",
            "--data.init_args.image_size=28", "--data.init_args.batch_size=4", "--data.init_args.mini_group=2",
            "--data.init_args.num_workers=0", "--no_progress", *extra]


def _run(args, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as stop:
        main(args)
    out, err = capsys.readouterr()
    return stop.value.code, out, err


def test_check_data_reads_the_celeba_mafl_fit_set_and_names_its_problems(tmp_path, capsys):
    root = make_fake_celeba(tmp_path / "celeba")
    # 000007.jpg (60x80) and 000016.jpg (40x60) have faces over 30 %; 000013.jpg (50x50) does not
    write_mafl(root, root / "Anno", {"000007.jpg": (10, 10, 40, 36), "000013.jpg": (0, 0, 30, 24),
                                     "000016.jpg": (5, 5, 30, 24)})
    code, out, err = _run(_celeba_args(root), capsys)
    assert code == 0, err
    assert "KPR fitting set (MAFL): 2 item(s) read as well" in out  # 4 train + 2 test + 2 fitting images
    assert "all 8 items of splits train, val, test read fine" in out and "not found" not in out
    # the fitting set is read at test time only
    code, out, _ = _run(_celeba_args(root, "--splits", "train"), capsys)
    assert code == 0 and "all 4 items" in out and "KPR" not in out

    # a malformed annotation line: file and line named
    bbox = root / "Anno" / "list_bbox_celeba.txt"
    good_bbox = bbox.read_text()
    bbox.write_text(good_bbox + "000020.jpg 1 2 three 4\n")
    code, _, err = _run(_celeba_args(root), capsys)
    assert code == 2 and "1 problem(s) in 6 items" in err, err
    assert "KPR fitting set (MAFL): " in err
    assert "list_bbox_celeba.txt line 6: expected an image name and 4 numbers" in err
    bbox.write_text(good_bbox)

    # an image the list selects is missing: file and image named
    (root / "MAFL_training.txt").write_text("000007.jpg\n000013.jpg\n000016.jpg\n000099.jpg\n")
    code, _, err = _run(_celeba_args(root), capsys)
    assert code == 2 and "1 of 4 images listed in" in err and "MAFL_training.txt" in err and "000099.jpg" in err, err
    (root / "MAFL_training.txt").write_text("000007.jpg\n000013.jpg\n000016.jpg\n")

    # a selected image whose data is cut (its header, hence its size, still reads) is listed with
    # every item that reads it; one whose header is cut already fails the face-box filter
    image = root / "img_celeba" / "000016.jpg"
    noise = np.random.default_rng(0).integers(0, 255, (60, 40, 3), dtype=np.uint8)
    Image.fromarray(noise).save(image, "JPEG")
    image.write_bytes(image.read_bytes()[: image.stat().st_size * 7 // 10])
    code, _, err = _run(_celeba_args(root), capsys)
    assert code == 2 and "1 problem(s) in 8 items" in err, err
    assert "000016.jpg" in err and "(train[2], KPR fitting set (MAFL)[1])" in err
    image.write_bytes(b"not an image")
    code, _, err = _run(_celeba_args(root), capsys)
    assert code == 2 and "2 problem(s) in 6 items" in err, err
    assert "KPR fitting set (MAFL): 1 of 3 images listed in" in err and "000016.jpg (UnidentifiedImageError)" in err


def test_check_data_notes_missing_mafl_files_without_failing(tmp_path, capsys):
    root = make_fake_celeba(tmp_path / "celeba")
    code, out, err = _run(_celeba_args(root), capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if "note:" in line]
    assert len(notes) == 1, out
    for word in ["MAFL_training.txt, list_landmarks_unalign_celeba.txt, list_bbox_celeba.txt not found in",
                 str(root), "Anno/ or MAFL/", f"training list {root / 'train_lm.txt'}", "fit_list"]:
        assert word in notes[0], (word, notes[0])
    assert "all 6 items" in out
    # partly there: CelebADataModule falls back the same way (a warning, not an error), and so does the note
    write_mafl(root, root / "MAFL", {"000007.jpg": (10, 10, 40, 36)})
    (root / "MAFL" / "list_landmarks_unalign_celeba.txt").unlink()
    code, out, err = _run(_celeba_args(root), capsys)
    assert code == 0, err
    notes = [line for line in out.splitlines() if "note:" in line]
    assert len(notes) == 1 and "list_landmarks_unalign_celeba.txt not found in" in notes[0], out
    assert "MAFL_training.txt, list_bbox_celeba.txt found" in notes[0] and "not an error" in notes[0]
    with pytest.warns(UserWarning, match="list_landmarks_unalign_celeba.txt not found"):
        assert len(celeba_dm(root).build_keypoint_fit_dataset()) == 4  # what the note says KPR will do


def test_check_data_reads_an_explicit_fit_list(tmp_path, capsys):
    root = make_fake_celeba(tmp_path / "celeba")
    fit = root / "fit_lm.txt"
    fit.write_text((root / "train_lm.txt").read_text().splitlines()[0] + "\n")
    code, out, err = _run(_celeba_args(root, f"--data.init_args.fit_list={fit}"), capsys)
    assert code == 0 and f"KPR fitting set {fit}: 1 item(s)" in out and "not found" not in out, err
    fit.write_text("000007.jpg,1,2\n")
    code, _, err = _run(_celeba_args(root, f"--data.init_args.fit_list={fit}"), capsys)
    assert code == 2 and "fit_lm.txt line 1: expected 'name,x1,y1,...,x5,y5'" in err, err
