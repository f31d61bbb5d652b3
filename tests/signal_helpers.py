"""A callback that sends this process a signal at a chosen point, to test pre-emption in-process."""
from __future__ import annotations

import os
import signal
import time

from lightning.pytorch import Callback


class SignalAt(Callback):
    """Send ``signum`` to this process after training step ``step`` or at the start of validation of ``epoch``.

    Args:
        signum: Signal number (15 SIGTERM, 2 SIGINT).
        step: Global step after which to signal (None: not by step).
        validation_epoch: Epoch whose validation start signals (None: not by validation).
    """

    def __init__(self, signum: int = 15, step: int | None = None, validation_epoch: int | None = None) -> None:
        self.signum, self.step, self.validation_epoch = signum, step, validation_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_validation_start(self, trainer, pl_module) -> None:
        if self.validation_epoch == trainer.current_epoch and not trainer.sanity_checking:
            os.kill(os.getpid(), self.signum)


class MarkThenSlow(Callback):
    """Write ``marker`` once step ``step`` is done, then make each later step wait ``pause`` seconds.

    A test process waits for the marker and signals the run; the pause makes sure the signal lands
    inside the next step.
    """

    def __init__(self, marker: str, step: int = 1, pause: float = 3.0) -> None:
        self.marker, self.step, self.pause = marker, step, pause

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if os.path.exists(self.marker):
            time.sleep(self.pause)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(trainer.global_step))
