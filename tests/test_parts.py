"""`mpae parts IMAGES_OR_DIR --ckpt_path X | --pretrained DIR`: the part files of every image, one last line,
bad input named in one line (exit 2)."""
from __future__ import annotations

import contextlib
import io

import numpy as np
import pytest
import torch
from PIL import Image

from inference_utils import make_mixed_images, save_tiny_checkpoint
from mpae_lightning import MPAEModule
from mpae_lightning.cli import main


def _parts(argv: list[str]) -> tuple[int, str, str]:
    """Run `mpae parts ...`: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as stop:
        main(["parts", *argv])
    return stop.value.code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("parts")
    images = make_mixed_images(root / "images")
    return root, images, save_tiny_checkpoint(root / "tiny.ckpt")


def test_parts_writes_the_files_of_every_image_and_says_where(setup, tmp_path, monkeypatch):
    root, images, ckpt = setup
    out = tmp_path / "maps"
    code, stdout, _ = _parts([str(root / "images"), f"--ckpt_path={ckpt}", "--out", str(out)])
    assert code == 0
    n = len(images)
    assert stdout.strip().splitlines()[-1] == f"mpae parts: wrote {3 * n} files for {n} images to {out}"
    stems = [f"{i:06d}_{p.stem}" for i, p in enumerate(images)]  # as mpae predict names them
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{s}{end}" for s in stems
                                                           for end in ("_parts.png", "_parts.npy", "_overlay.png"))
    # the labels are predict_images' (background = K = 3), in the palette PNG and the .npy alike
    module = MPAEModule.load_from_checkpoint(ckpt)
    expected = module.predict_images(images)
    for stem, maps in zip(stems, expected):
        labels = np.load(out / f"{stem}_parts.npy")
        assert labels.dtype == np.uint8 and np.array_equal(labels, maps.labels.numpy())
        assert np.array_equal(np.asarray(Image.open(out / f"{stem}_parts.png")), labels)

    # files and folders mixed, original resolution, a pretrained folder; default folder ./parts
    module.save_pretrained(tmp_path / "pretrained")
    monkeypatch.chdir(tmp_path)
    code, stdout, _ = _parts([str(images[0]), str(root / "images" / "nested"),
                              "--pretrained", str(tmp_path / "pretrained"), "--resolution", "original"])
    assert code == 0 and stdout.strip().splitlines()[-1] == "mpae parts: wrote 6 files for 2 images to parts"
    first = np.load(tmp_path / "parts" / f"000000_{images[0].stem}_parts.npy")
    assert first.shape == Image.open(images[0]).size[::-1]
    expected = module.predict_images(images[0], resolution="original")[0].labels
    assert torch.equal(torch.from_numpy(first).long(), expected)


@pytest.mark.parametrize("case", ["missing file", "unreadable image", "folder without images", "no weights",
                                  "two weight sources"])
def test_bad_input_is_one_line_naming_it(setup, tmp_path, capsys, case):
    root, images, ckpt = setup
    bad = {"missing file": tmp_path / "nope.jpg", "unreadable image": tmp_path / "broken.png",
           "folder without images": tmp_path / "empty"}.get(case)
    if case == "unreadable image":
        bad.write_bytes(b"\x89PNG but not really")
    if case == "folder without images":
        bad.mkdir()
    weights = {"no weights": [], "two weight sources": [f"--ckpt_path={ckpt}", "--pretrained", str(tmp_path)]}.get(
        case, [f"--ckpt_path={ckpt}"])
    inputs = [str(images[0])] + ([str(bad)] if bad is not None else [])
    with pytest.raises(SystemExit) as stop:
        main(["parts", *inputs, *weights, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mpae: error:")]
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    expected = {"no weights": "--ckpt_path", "two weight sources": "exclude each other"}.get(case, str(bad))
    assert expected in lines[0], lines[0]
    assert not (tmp_path / "out").exists()  # nothing written


def test_precision_bf16_predicts_as_the_module_setting_does(setup, tmp_path):
    root, images, ckpt = setup
    out = tmp_path / "bf16"
    code, _, _ = _parts([str(images[0]), f"--ckpt_path={ckpt}", "--out", str(out), "--precision", "bf16"])
    assert code == 0
    expected = MPAEModule.load_from_checkpoint(ckpt, predict_precision="bf16").predict_images(images[0])[0].labels
    written = np.load(out / f"000000_{images[0].stem}_parts.npy")
    assert torch.equal(torch.from_numpy(written).long(), expected)
    code, _, stderr = _parts([str(images[0]), f"--ckpt_path={ckpt}", "--out", str(out), "--precision", "16"])
    assert code == 2 and "--precision 16" in stderr and "bf16" in stderr
