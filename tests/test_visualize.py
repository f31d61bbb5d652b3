"""Pictures: the validation callback's logger fallback, grids, colour matching, legends."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from PIL import Image

from mpae_lightning.callbacks import PartVisualization


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
