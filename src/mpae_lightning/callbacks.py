"""Callbacks: write predicted part maps to disk."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image

from .visualize import denormalize, overlay, save_label_png


class PartPredictionWriter(BasePredictionWriter):
    """For every predicted image, write ``<name>_parts.png`` (palette PNG, pixel = part id,
    background = K), ``<name>_parts.npy`` (the same labels) and ``<name>_overlay.png``.

    Args:
        output_dir: folder for the files (created if missing).
    """

    def __init__(self, output_dir: str = "predictions") -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir

    def write_on_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        out = Path(self.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        labels, images = prediction["labels"], denormalize(batch["image"].detach().float().cpu())
        paths = prediction.get("path") or [None] * labels.shape[0]
        for i in range(labels.shape[0]):
            index = int(prediction["index"][i])
            stem = f"{index:06d}"
            if paths[i]:
                stem += "_" + Path(str(paths[i])).stem.replace(os.sep, "_")
            save_label_png(out / f"{stem}_parts.png", labels[i], prediction["num_parts"])
            np.save(out / f"{stem}_parts.npy", labels[i].numpy())
            Image.fromarray(overlay(images[i], labels[i].long(), prediction["num_parts"])).save(out / f"{stem}_overlay.png")
