"""Pictures: the validation callback's logger fallback, grids, colour matching, legends."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from mpae_lightning.callbacks import PartPredictionWriter, PartVisualization
from mpae_lightning.data.transforms import normalize
from mpae_lightning.visualize import (
    MIN_PANEL,
    label_grid,
    labelled_grid,
    main_score,
    match_parts,
    overlay,
    panel_size,
    part_colours,
    part_grid,
    part_palette,
    picture_title,
    save_grid,
)


def _trainer(tmp_path, loggers):
    """A stand-in Trainer whose log folder is what Lightning's would be: the first logger's, else
    ``default_root_dir``."""
    log_dir = loggers[0].log_dir if loggers else str(tmp_path)
    return SimpleNamespace(loggers=loggers, global_step=7, current_epoch=2, log_dir=log_dir,
                           default_root_dir=str(tmp_path))


def test_grid_goes_to_tensorboard_and_falls_back_to_files(tmp_path):
    grid = np.full((20, 30, 3), 200, dtype=np.uint8)
    callback = PartVisualization(num_images=2)

    tensorboard = TensorBoardLogger(str(tmp_path / "tb"))
    calls = []
    tensorboard.experiment.add_image = lambda *args, **kwargs: calls.append((args, kwargs))
    assert callback.log_grid(_trainer(tmp_path, [tensorboard]), grid) == ["TensorBoardLogger"]
    assert calls[0][0][0] == "val/parts" and calls[0][0][2] == 7 and calls[0][1]["dataformats"] == "HWC"
    assert not list(tmp_path.rglob("*.png")), "no file when a logger shows the picture"

    # CSVLogger cannot show images: the same grid lands as a PNG in the log folder
    csv = CSVLogger(str(tmp_path / "csv"))
    written = callback.log_grid(_trainer(tmp_path, [csv]), grid)
    assert len(written) == 1 and written[0].startswith(str(Path(csv.log_dir) / "images"))
    assert np.array_equal(np.asarray(Image.open(written[0])), grid)
    # without any logger it goes under default_root_dir ... unless a folder is given
    no_logger = _trainer(tmp_path, [])
    no_logger.log_dir = None
    assert callback.log_grid(no_logger, grid)[0].startswith(str(tmp_path / "images"))
    assert PartVisualization(dirpath=str(tmp_path / "pics")).log_grid(no_logger, grid)[0].startswith(
        str(tmp_path / "pics"))


def _blocks(batch=2, size=16, labels=5, seed=0):
    """Ground-truth maps made of 4x4 blocks of random labels (background = labels - 1)."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.randint(0, labels, (batch, size // 4, size // 4), generator=gen)
    return coarse.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)


def _tiles(grid, rows, cols, tile, header_h, pad=2):
    return [[grid[header_h + r * (tile + pad): header_h + r * (tile + pad) + tile, c * (tile + pad): c * (tile + pad) + tile]
             for c in range(cols)] for r in range(rows)]


def test_hungarian_colouring_maps_a_permuted_prediction_to_the_truth_colours():
    truth = _blocks(labels=5)
    perm = torch.tensor([2, 0, 3, 1, 4])  # truth label t is predicted as part perm[t]; background stays last
    pred = perm[truth]
    assert match_parts(pred, truth, 5, 5).tolist() == torch.argsort(perm).tolist()
    colours = part_colours(pred, 5, truth, 5, label_names=["a", "b", "c", "d"])
    for t in range(5):
        assert np.array_equal(colours.prediction[perm[t]], colours.truth[t]), t
    assert colours.legend[0] == (tuple(colours.truth[0].tolist()), "a = part 2")
    assert "Hungarian" in colours.note
    # so the part-map column of the grid is pixel-identical to the ground-truth column
    images = normalize(torch.zeros(2, 3, 16, 16))  # black
    probs = torch.nn.functional.one_hot(pred, 5).permute(0, 3, 1, 2).float()
    grid = part_grid(images, probs, ground_truth=truth, num_gt_labels=5, tile=32, min_tile=0)
    for row in _tiles(grid, 2, 4, 32, _header_height(grid)):
        assert np.array_equal(row[2], row[3])  # with same-id colours part 2 ("a") would look like label 2


def _header_height(grid):
    """Rows above the first tile: the image column is black in these tests."""
    return int(np.flatnonzero((grid[:, :8] == 0).all(axis=(1, 2)))[0])


def test_unmatched_parts_take_colours_no_label_uses():
    truth = _blocks(labels=4, seed=1)  # 3 foreground labels
    pred = truth.clone()
    pred[truth == 0] = 5  # label 0 is split between parts 0 and 5 ...
    pred[(truth == 0) & (torch.arange(16) < 8)] = 0
    pred[truth == 3] = 7  # ... and the background channel of K+1 = 8 is 7
    colours = part_colours(pred, 8, truth, 4)
    assignment = match_parts(pred, truth, 8, 4)
    assert assignment[7] == 3 and sorted(assignment[[0, 1, 2, 5]].tolist()).count(-1) == 1
    unmatched = int(np.flatnonzero(assignment[:7] < 0)[0]) if (assignment[[0, 5]] < 0).any() else 5
    used = {tuple(c) for c in colours.truth.tolist()}
    assert tuple(colours.prediction[unmatched].tolist()) not in used
    assert any(text == f"part {unmatched} (unmatched)" for _, text in colours.legend)
    # parts absent from every shown image are left out of the legend
    assert not any("part 6" in text for _, text in colours.legend)


def test_match_skips_ignored_truth_and_non_overlapping_pairs():
    truth = torch.tensor([[0, 0, 1, 255], [2, 2, 2, 255]])
    pred = torch.tensor([[1, 1, 1, 0], [2, 2, 2, 0]])
    assignment = match_parts(pred, truth, 4, 3)
    # part 0 lies only on ignored pixels, part 2 only on the truth's background (label 2);
    # the background channel (3) always goes with the background label
    assert assignment.tolist() == [-1, 0, -1, 2]


def test_grid_has_headers_and_a_legend_whose_colours_match(tmp_path):
    truth = _blocks(labels=5, seed=2)
    pred = torch.tensor([3, 1, 0, 2, 4])[truth]
    images = normalize(torch.zeros(2, 3, 16, 16))  # black
    probs = torch.nn.functional.one_hot(pred, 5).permute(0, 3, 1, 2).float()
    grid = part_grid(images, probs, restored=torch.zeros(2, 3, 8, 8), ground_truth=truth, num_gt_labels=5, tile=64,
                     min_tile=0)
    body_h, body_w = 2 * 64 + 2, 5 * 64 + 4 * 2
    assert grid.shape[1] == body_w and grid.shape[0] > body_h + 30  # header above, legend below
    header_h = _header_height(grid)
    assert header_h >= 10 and (grid[:header_h] < 128).any(), "no header text"
    legend = grid[header_h + body_h:]
    colours = part_colours(pred, 5, truth, 5)
    for colour, text in colours.legend:
        assert (legend == np.asarray(colour, dtype=np.uint8)).all(axis=2).sum() >= 20, (colour, text)
    without_truth = part_grid(images, probs, tile=64, min_tile=0)
    assert without_truth.shape[1] == 3 * 64 + 2 * 2
    for k in range(4):
        assert (without_truth[-40:] == part_palette(5)[k]).all(axis=2).sum() >= 20


def test_prediction_writer_original_resolution(tmp_path):
    image_file = tmp_path / "bird.png"
    Image.fromarray(np.full((30, 40, 3), 120, dtype=np.uint8)).save(image_file)  # W=40, H=30
    labels = torch.zeros(1, 8, 8, dtype=torch.uint8)
    labels[0, :, 4:] = 2
    prediction = {"labels": labels, "index": torch.tensor([3]), "path": [str(image_file)], "num_parts": 3}
    batch = {"image": torch.zeros(1, 3, 16, 16)}
    for resolution, size in (("map", (8, 8)), ("original", (30, 40))):
        out = tmp_path / resolution
        PartPredictionWriter(str(out), resolution=resolution).write_on_batch_end(None, None, prediction, None, batch, 0)
        parts = np.asarray(Image.open(out / "000003_bird_parts.png"))
        assert parts.shape == size and np.array_equal(parts, np.load(out / "000003_bird_parts.npy"))
        assert (parts[:, : size[1] // 2] == 0).all() and (parts[:, size[1] // 2:] == 2).all()
        panel = np.asarray(Image.open(out / "000003_bird_overlay.png"))
        # panels upscaled by an integer factor to >= 256 px a side: 30x40 -> 270x360, 8x8 -> 256x256
        tile_w = 360 if resolution == "original" else 256
        assert panel.shape[1] == 3 * tile_w + 4 and panel.shape[0] > (270 if resolution == "original" else 256)
    with pytest.raises(ValueError, match="resolution"):
        PartPredictionWriter(resolution="full")


def test_fit_with_a_csv_logger_writes_the_validation_picture_as_png(tmp_path, tiny_demo_args):
    from mpae_lightning.cli import main

    main(["fit", *tiny_demo_args, "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
          f"--trainer.logger.init_args.save_dir={tmp_path / 'csv'}"])
    pictures = sorted((tmp_path / "csv").rglob("images/val_parts_epoch=000_step=*.png"))
    assert len(pictures) == 1, "one picture per validation epoch, none for the sanity check"
    grid = Image.open(pictures[0])
    assert grid.width == 5 * 256 + 4 * 2 and grid.height > 2 * 256 + 2  # 2 images, headers and legend
    # the title names the run, the epoch and the validation score the module logged this epoch
    title = grid.text["Title"]
    assert title.startswith("MPAE K=4  |  run ") and "epoch 0" in title
    assert " val keypoint NMI " in title and "score unknown" not in title


def test_validation_picture_reuses_the_validation_steps_forward(tmp_path):
    # The picture is drawn from the logits and restored images the validation step already made.
    callback = PartVisualization(num_images=2, tile=16)
    batch = {"image": torch.randn(3, 3, 16, 16), "index": torch.arange(3)}
    outputs = SimpleNamespace(logits=torch.randn(3, 5, 4, 4), restored=torch.rand(3, 3, 8, 8))

    def second_forward(*args, **kwargs):
        raise AssertionError("the picture ran the model a second time")

    module = SimpleNamespace(validation_outputs=second_forward, log_prefix=lambda stage: stage,
                             model=SimpleNamespace(part_probabilities=lambda logits: logits.softmax(dim=1)))
    trainer = _trainer(tmp_path, [])
    trainer.__dict__.update(sanity_checking=False, is_global_zero=True, datamodule=None)
    callback.on_validation_batch_end(trainer, module, outputs, batch, 0)
    callback.on_validation_end(trainer, module)
    assert len(list((tmp_path / "images").glob("val_parts_*.png"))) == 1


# --------------------------------------------------------------------------- size, title, legend


def test_panels_are_at_least_256_px_with_nearest_upscaled_labels():
    assert panel_size(64, 64) == (256, 256) and panel_size(30, 40) == (270, 360) and panel_size(300, 500) == (300, 500)
    labels = torch.tensor([[0, 1], [2, 0]])  # a 2x2 map on a 16x16 image
    images = normalize(torch.zeros(1, 3, 16, 16))
    grid = label_grid(images, labels[None], 3, tile=16)  # columns: image | overlay | part map
    assert grid.shape[1] == 3 * MIN_PANEL + 2 * 2
    header_h = _header_height(grid)
    part_map = grid[header_h: header_h + MIN_PANEL, 2 * (MIN_PANEL + 2): 3 * MIN_PANEL + 4]
    palette = part_palette(3)
    # nearest: every label is one uniform 128x128 block, no blended edge colours
    for (r, c), k in {(0, 0): 0, (0, 1): 1, (1, 0): 2, (1, 1): 0}.items():
        block = part_map[r * 128: (r + 1) * 128, c * 128: (c + 1) * 128]
        assert (block == palette[k]).all(), (r, c)
    assert overlay(torch.zeros(3, 16, 16), labels, 3).shape == (256, 256, 3)
    assert overlay(torch.zeros(3, 16, 16), labels, 3, min_size=0).shape == (16, 16, 3)


def test_legend_lists_exactly_the_parts_in_the_shown_maps():
    labels = torch.full((2, 8, 8), 1)  # K+1 = 6: parts 1 and 4 appear, background (5) does not
    labels[1, :4] = 4
    colours = part_colours(labels, 6)
    assert [text for _, text in colours.legend] == ["part 1", "part 4"]
    labels[0, 0, 0] = 5
    assert [text for _, text in part_colours(labels, 6).legend] == ["part 1", "part 4", "background"]
    # label_grid lists what its tiles show: a part only in a pixel the tile drops is left out
    big = torch.full((1, 512, 512), 2)
    big[0, 1, 1] = 3  # nearest 512 -> 256 keeps even rows/columns only
    shown = part_colours(big, 6, shown_parts=[2])
    assert [text for _, text in shown.legend] == ["part 2"]
    grid = label_grid(normalize(torch.zeros(1, 3, 64, 64)), big, 6, tile=256)
    assert not (grid == part_palette(6)[3]).all(axis=2).any(), "part 3 is neither drawn nor in the legend"
    assert (grid == part_palette(6)[2]).all(axis=2).sum() > 256 * 256  # part map tile + legend swatch
    # with ground truth: matched labels, truth labels without a part, unmatched parts - only those shown
    truth = torch.tensor([[0, 0, 1, 3], [0, 0, 1, 3]])  # labels 0, 1 (foreground), 3 background; label 2 absent
    pred = torch.tensor([[2, 2, 5, 5], [2, 2, 4, 5]])
    texts = [text for _, text in part_colours(pred, 6, truth, 4, label_names=["a", "b", "c"]).legend]
    assert texts == ["a = part 2", "b = part 4", "background"]  # no label c, no parts 0, 1, 3


def test_title_line_is_drawn_and_stored_in_the_png(tmp_path):
    title = picture_title("last.ckpt", 12, ("test keypoint NMI", 45.678), num_parts=4)
    assert title == "MPAE K=4  |  last.ckpt  |  epoch 12  |  test keypoint NMI 45.68"
    assert picture_title("untrained") == "MPAE  |  untrained  |  score unknown"
    tiles = [[np.full((256, 256, 3), 255, dtype=np.uint8)]]
    plain = labelled_grid(tiles, ["image"])
    titled = labelled_grid(tiles, ["image"], title=title)
    assert titled.shape[1] == plain.shape[1] and titled.shape[0] > plain.shape[0]
    extra = titled.shape[0] - plain.shape[0]
    assert (titled[:extra] < 128).any(), "title text above the headers"
    assert np.array_equal(titled[extra:], plain), "everything below the title is unchanged"
    save_grid(tmp_path / "p.png", titled, title=title)
    assert Image.open(tmp_path / "p.png").text["Title"] == title
    # the main score: keypoint NMI first, mask NMI when there are no keypoints
    assert main_score({"val/mask_nmi": 30.0, "val/keypoint_nmi": 40.0}, "val") == ("val keypoint NMI", 40.0)
    assert main_score({"val_on_test/mask_nmi": torch.tensor(30.0)}, "val_on_test") == ("val_on_test mask NMI", 30.0)
    assert main_score({}, "val") is None


def test_prediction_overlay_title_names_the_checkpoint_epoch_and_score(tmp_path):
    from mpae_lightning.callbacks import describe_model

    module = SimpleNamespace(checkpoint_summary={"name": "epoch=3-step=40.ckpt", "epoch": 3,
                                                "score": ("val_on_test keypoint NMI", 51.5)}, hparams={})
    trainer = SimpleNamespace(ckpt_path=None, state=SimpleNamespace(fn=None))
    assert describe_model(trainer, module) == ("epoch=3-step=40.ckpt", 3, ("val_on_test keypoint NMI", 51.5))
    assert describe_model(trainer, SimpleNamespace(hparams={}))[0] == "untrained"
    assert describe_model(trainer, SimpleNamespace(hparams={"weights": "/w/CUB_K16.pth"}))[0] == "CUB_K16.pth"
    prediction = {"labels": torch.zeros(1, 8, 8, dtype=torch.uint8), "index": torch.tensor([0]), "path": None,
                  "num_parts": 3}
    PartPredictionWriter(str(tmp_path)).write_on_batch_end(trainer, module, prediction, None,
                                                           {"image": torch.zeros(1, 3, 16, 16)}, 0)
    panel = Image.open(tmp_path / "000000_overlay.png")
    assert panel.text["Title"] == "MPAE K=2  |  epoch=3-step=40.ckpt  |  epoch 3  |  val_on_test keypoint NMI 51.50"
    assert min(panel.size) >= MIN_PANEL


def test_checkpoint_summary_reads_the_epoch_and_a_monitored_main_score():
    from mpae_lightning.lightning_module import checkpoint_summary

    monitored = {"ModelCheckpoint{'monitor': 'val_on_test/keypoint_nmi'}": {
        "monitor": "val_on_test/keypoint_nmi", "current_score": torch.tensor(51.5), "best_model_score": None}}
    assert checkpoint_summary({"epoch": 3, "callbacks": monitored}) == {
        "epoch": 3, "score": ("val_on_test keypoint NMI", 51.5)}
    # no monitor (the configs' last.ckpt), or a monitored loss: the epoch only
    unmonitored = {"ModelCheckpoint": {"monitor": None, "current_score": None}}
    assert checkpoint_summary({"epoch": 0, "callbacks": unmonitored}) == {"epoch": 0, "score": None}
    loss = {"ModelCheckpoint": {"monitor": "val/total", "current_score": torch.tensor(0.3)}}
    assert checkpoint_summary({"epoch": 1, "callbacks": loss})["score"] is None
