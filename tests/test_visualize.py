"""Pictures: the validation callback's logger fallback, grids, colour matching, legends."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from mpae_lightning.callbacks import PartPredictionWriter, PartVisualization
from mpae_lightning.data.transforms import normalize
from mpae_lightning.visualize import match_parts, part_colours, part_grid, part_palette


def _trainer(tmp_path, loggers):
    return SimpleNamespace(loggers=loggers, global_step=7, current_epoch=2, log_dir=str(tmp_path / "logs"),
                           default_root_dir=str(tmp_path))


def test_grid_goes_to_tensorboard_and_falls_back_to_files(tmp_path):
    grid = np.full((20, 30, 3), 200, dtype=np.uint8)
    callback = PartVisualization(num_images=2)

    tensorboard = TensorBoardLogger(str(tmp_path / "tb"))
    calls = []
    tensorboard.experiment.add_image = lambda *args, **kwargs: calls.append((args, kwargs))
    assert callback.log_grid(_trainer(tmp_path, [tensorboard]), grid) == ["TensorBoardLogger"]
    assert calls[0][0][0] == "val/parts" and calls[0][0][2] == 7 and calls[0][1]["dataformats"] == "HWC"
    assert not (tmp_path / "logs").exists(), "no file when a logger shows the picture"

    # CSVLogger cannot show images: the same grid lands as a PNG in the log folder
    written = callback.log_grid(_trainer(tmp_path, [CSVLogger(str(tmp_path / "csv"))]), grid)
    assert len(written) == 1 and written[0].startswith(str(tmp_path / "logs" / "images"))
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
    grid = part_grid(images, probs, ground_truth=truth, num_gt_labels=5, tile=32)
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
    grid = part_grid(images, probs, restored=torch.zeros(2, 3, 8, 8), ground_truth=truth, num_gt_labels=5, tile=64)
    body_h, body_w = 2 * 64 + 2, 5 * 64 + 4 * 2
    assert grid.shape[1] == body_w and grid.shape[0] > body_h + 30  # header above, legend below
    header_h = _header_height(grid)
    assert header_h >= 10 and (grid[:header_h] < 128).any(), "no header text"
    legend = grid[header_h + body_h:]
    colours = part_colours(pred, 5, truth, 5)
    for colour, text in colours.legend:
        assert (legend == np.asarray(colour, dtype=np.uint8)).all(axis=2).sum() >= 20, (colour, text)
    without_truth = part_grid(images, probs, tile=64)
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
        tile_w = 40 if resolution == "original" else 16
        assert panel.shape[1] == 3 * tile_w + 4 and panel.shape[0] > (30 if resolution == "original" else 16)
    with pytest.raises(ValueError, match="resolution"):
        PartPredictionWriter(resolution="full")


def test_fit_with_a_csv_logger_writes_the_validation_picture_as_png(tmp_path, tiny_demo_args):
    from mpae_lightning.cli import main

    main(["fit", *tiny_demo_args, "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
          f"--trainer.logger.init_args.save_dir={tmp_path / 'csv'}"])
    pictures = sorted((tmp_path / "csv").rglob("images/val_parts_epoch=000_step=*.png"))
    assert len(pictures) == 1, "one picture per validation epoch, none for the sanity check"
    grid = Image.open(pictures[0])
    assert grid.width == 5 * 128 + 4 * 2 and grid.height > 2 * 128 + 2  # 2 images, headers and legend


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
    callback.on_validation_epoch_end(trainer, module)
    assert len(list((tmp_path / "logs" / "images").glob("val_parts_*.png"))) == 1
