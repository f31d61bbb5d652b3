"""Callbacks that let tests pre-empt a run at a known state, never at a moment in time.

* :class:`SignalAt` sends this process a signal from inside a hook (in-process tests): the signal is
  handled before the hook returns, so where it lands follows from the hook alone.
* :class:`MarkThenWaitForSignal` lets another process do the sending (subprocess tests): it writes
  a marker file and holds the run until the signal has been handled, however slow the machine is.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer


class SignalAt(Callback):
    """Send ``signum`` to this process after training step ``step`` or at the start of validation of ``epoch``.

    ``os.kill`` on one's own process delivers the signal to the calling thread before it returns, and
    Python runs the handler before the next Python call; this callback runs before ``Preemption``
    (user callbacks come first), so the stop is decided by the step count, not by the clock.

    Args:
        signum: Signal number (15 SIGTERM, 2 SIGINT).
        step: Global step after which to signal (None: not by step).
        validation_epoch: Epoch whose validation start signals (None: not by validation).
    """

    def __init__(self, signum: int = 15, step: int | None = None, validation_epoch: int | None = None) -> None:
        self.signum, self.step, self.validation_epoch = signum, step, validation_epoch

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.step is not None and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.validation_epoch == trainer.current_epoch and not trainer.sanity_checking:
            os.kill(os.getpid(), self.signum)


class MarkThenWaitForSignal(Callback):
    """At the start of the training step after ``step`` steps, write ``marker`` and wait there for ``signum``.

    The test process waits for the marker, then signals this process. The step does not begin until
    the run's own handler (``Preemption``'s) has handled the signal, so the signal always lands inside
    a step whatever the load on the machine: the test needs no sleeps and no guess at how long a step
    takes. The run's handler is wrapped only to notice the signal; it still decides what happens.

    Args:
        marker: File to write (holding the global step) once the run waits for the signal.
        signum: The signal to wait for (15 SIGTERM, 2 SIGINT).
        step: Wait at the start of the step that begins after this many optimizer steps.
        give_up_after: Seconds to wait before failing the run, only so that a run whose test died
            does not wait forever; not a limit the test relies on.
    """

    def __init__(self, marker: str, signum: int = 15, step: int = 1, give_up_after: float = 1800.0) -> None:
        self.marker, self.signum, self.step, self.give_up_after = marker, signum, step, give_up_after
        self.received = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self.received or trainer.global_step != self.step:
            return
        previous = signal.getsignal(self.signum)

        def noticed(signum: int, frame: Any) -> None:
            try:
                if callable(previous):
                    previous(signum, frame)
            finally:
                self.received = True

        signal.signal(self.signum, noticed)
        try:
            with open(self.marker, "w") as f:
                f.write(str(trainer.global_step))
            give_up = time.monotonic() + self.give_up_after
            while not self.received:
                if time.monotonic() > give_up:
                    raise RuntimeError(f"no signal {self.signum} arrived after {self.marker} was written")
                time.sleep(0.05)  # the handler runs during the sleep; the loop only polls the flag
        finally:
            if previous is not None:  # None: a handler not set from Python, which cannot be put back
                signal.signal(self.signum, previous)


class RecordTrainStart(Callback):
    """Write ``path`` with the global step training starts from: shows that a resumed run continued, not restarted."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        with open(self.path, "w") as f:
            f.write(str(trainer.global_step))
