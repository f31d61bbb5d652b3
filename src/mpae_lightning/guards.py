"""Callbacks that make long runs safe: stop on a non-finite loss, resume exactly, survive pre-emption.

* :class:`NonFiniteGuard` stops at the first non-finite loss term or gradient (before the bad
  update, so no checkpoint ever holds it), or skips such steps and counts them.
* :class:`ExactResume` keeps the training step's random generators (torch CPU/CUDA, NumPy,
  Python) apart from Lightning's own bookkeeping and stores them in the checkpoint; with the
  resumable training loader (sampler position and per-batch augmentation seeds) a resumed run
  is bit-identical to the uninterrupted one.
* :class:`Preemption` turns SIGTERM/SIGINT into a resumable checkpoint of the current step and an
  :class:`~mpae_lightning.errors.Interrupted` exception (exit code 143/130 in the ``mpae`` command).
"""
from __future__ import annotations

import math
import os
import random
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_warn

from .errors import Interrupted, NonFiniteLossError

__all__ = ["ExactResume", "NonFiniteGuard", "Preemption", "capture_rng", "restore_rng", "stop_signals"]


# ------------------------------------------------------------------------------ non-finite guard
class NonFiniteGuard(Callback):
    """Stop (or skip the step) when a loss term or gradient is not finite.

    The check runs after backward and before the optimizer step, so a bad step never updates
    the weights: the last checkpoint written stays the last good one. It costs one small
    reduction and one host sync per optimizer step (loss and total gradient norm together).

    Args:
        action: ``"stop"`` raises :class:`~mpae_lightning.errors.NonFiniteLossError` naming the
            epoch, the step and every non-finite term; ``"skip"`` drops that optimizer step and
            logs the running count as ``train/skipped_steps``.
        check_gradients: Also check the gradients (not under a fp16 GradScaler, which skips
            overflowing steps itself).
    """

    def __init__(self, action: Literal["stop", "skip"] = "stop", check_gradients: bool = True) -> None:
        if action not in ("stop", "skip"):
            raise ValueError(f"non_finite.action must be 'stop' or 'skip', got {action!r}")
        self.action = action
        self.check_gradients = check_gradients
        self.skipped = 0
        self._loss_finite: torch.Tensor | None = None  # over the accumulated micro-batches, on the device

    def _where(self, trainer: Trainer) -> str:
        batch = trainer.fit_loop.epoch_loop.batch_progress.current.ready  # 1-based, the batch being trained on
        return f"epoch {trainer.current_epoch}, step {trainer.global_step} (batch {batch} of the epoch)"

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()  # no host sync here
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        loss_finite, self._loss_finite = self._loss_finite, None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        check_grads = self.check_gradients and scaler is None
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None] if check_grads else []
        finite = loss_finite if loss_finite is not None else torch.tensor(True, device=pl_module.device)
        if grads:
            finite = finite & torch.isfinite(torch.nn.utils.get_total_norm(grads)).to(finite.device)
        ok = bool(finite)  # the one sync per step
        if trainer.world_size > 1:  # every rank stops or skips together, or DDP would hang
            ok = not trainer.strategy.reduce_boolean_decision(not ok, all=False)
        if ok:
            return
        what = self._describe(pl_module, loss_finite, check_grads)
        if self.action == "stop":
            lr = getattr(pl_module, "hparams", {}).get("lr")
            lr_hint = f"lower model.init_args.lr (now {lr:g})" if isinstance(lr, (int, float)) else "lower the learning rate"
            last = _last_checkpoint(trainer)
            kept = f"the last good checkpoint is {last}" if last else "no checkpoint was written"
            raise NonFiniteLossError(
                f"non-finite {what} at {self._where(trainer)}; training stopped before this update ({kept}); "
                f"{lr_hint}, keep trainer.gradient_clip_val set, check the input images, or pass "
                "--non_finite.action=skip to skip such steps"
            )
        self.skipped += 1
        if self.skipped == 1:
            rank_zero_warn(f"skipping the step at {self._where(trainer)}: non-finite {what} (counted as train/skipped_steps)")
        if scaler is None:  # without gradients the optimizer leaves every parameter and its state alone
            optimizer.zero_grad(set_to_none=True)

    @staticmethod
    def _describe(pl_module: LightningModule, loss_finite: torch.Tensor | None, check_grads: bool) -> str:
        """Name what is not finite (slow path, only after a bad step)."""
        if loss_finite is not None and not bool(loss_finite):
            terms = getattr(pl_module, "last_train_losses", None) or {}
            bad = {k: float(v.detach().float().reshape(-1)[0]) for k, v in terms.items() if not torch.isfinite(v).all()}
            return "loss " + (", ".join(f"{k}={v}" for k, v in bad.items()) or "(total)")
        if check_grads:
            bad_params = [n for n, p in pl_module.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            if bad_params:
                more = f" and {len(bad_params) - 3} more" if len(bad_params) > 3 else ""
                return f"gradient of {', '.join(bad_params[:3])}{more}"
        return "loss or gradient on another process"

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.action == "skip":
            pl_module.log("train/skipped_steps", float(self.skipped), on_step=True, on_epoch=False, reduce_fx="max")

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


# -------------------------------------------------------------------------------- exact resume
#: The generator states as the libraries return them: (torch CPU, NumPy, Python, CUDA or None).
_RawRng = tuple[torch.Tensor, tuple, tuple, "list[torch.Tensor] | None"]


def _raw_rng() -> _RawRng:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), np.random.get_state(), random.getstate(), cuda


def _set_raw_rng(raw: _RawRng) -> None:
    torch.set_rng_state(raw[0])
    np.random.set_state(raw[1])
    random.setstate(raw[2])
    if raw[3] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(raw[3])


def _checkpoint_safe(raw: _RawRng) -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = raw[1]
    version, internal, gauss_next = raw[2]
    state: dict[str, Any] = {
        "torch": raw[0],
        "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if raw[3] is not None:
        state["cuda"] = raw[3]
    return state


def _from_checkpoint(state: dict[str, Any]) -> _RawRng:
    n, p = state["numpy"], state["python"]
    return (
        state["torch"],
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]),
        (p["version"], tuple(p["internal"]), p["gauss_next"]),
        state.get("cuda"),
    )


def capture_rng() -> dict[str, Any]:
    """The global torch CPU/CUDA, NumPy and Python generator states, as checkpoint-safe types."""
    return _checkpoint_safe(_raw_rng())


def restore_rng(state: dict[str, Any]) -> None:
    """Set the global generators to ``state`` (from :func:`capture_rng`)."""
    _set_raw_rng(_from_checkpoint(state))


class ExactResume(Callback):
    """Give the training step its own random stream and save it in every checkpoint.

    Lightning draws from the global generators between steps (DataLoader seeds at every epoch,
    validation, sanity checks) in a different order when a run is resumed. So the step's stream is
    swapped in at ``on_train_batch_start`` and out at ``on_train_batch_end``: it then advances only
    with the steps themselves, and restoring it from the checkpoint makes the masking noise (and any
    other draw of the step) continue exactly. Under DDP every rank resumes with rank 0's stream;
    ranks are seeded alike, so their streams agree.
    """

    def __init__(self) -> None:
        # Raw generator states (converted to checkpoint-safe types only in state_dict): the swaps run
        # twice per step, and the conversion costs ~10x the swap itself.
        self._train_rng: _RawRng | None = None
        self._outer: _RawRng | None = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._train_rng is None:  # a fresh run: the stream starts where seed_everything left it
            self._train_rng = _raw_rng()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._swap_in()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._swap_out()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._swap_out()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._swap_out()

    def _swap_in(self) -> None:
        if self._outer is None:
            self._outer = _raw_rng()
            _set_raw_rng(self._train_rng if self._train_rng is not None else self._outer)

    def _swap_out(self) -> None:
        if self._outer is not None:
            self._train_rng = _raw_rng()
            _set_raw_rng(self._outer)
            self._outer = None

    def state_dict(self) -> dict[str, Any]:
        rng = _raw_rng() if self._outer is not None else self._train_rng
        return {"train_rng": _checkpoint_safe(rng)} if rng is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_rng" in state_dict:
            self._train_rng = _from_checkpoint(state_dict["train_rng"])


# --------------------------------------------------------------------------------- pre-emption
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class _SignalState:
    """Which stop signal arrived, and whether training is at a point where it can checkpoint."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.pending: int | None = None
        self.training = False

    def handler(self, signum: int, frame: Any) -> None:
        if os.getpid() != self.pid:  # a DataLoader worker: the main process decides
            return
        if self.training and self.pending is None:
            self.pending = signum  # checkpoint at the end of the current step
            return
        raise Interrupted(signum)  # nothing resumable yet, or a second signal: stop now


_STATE = _SignalState()


@contextmanager
def stop_signals() -> Iterator[None]:
    """Route SIGTERM/SIGINT through :class:`Interrupted` (or a checkpoint during training); restore after."""
    if os.name == "nt" or not _in_main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in _STOP_SIGNALS}
    _STATE.pid, _STATE.pending, _STATE.training = os.getpid(), None, False
    for s in _STOP_SIGNALS:
        signal.signal(s, _STATE.handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _last_checkpoint(trainer: Trainer) -> str | None:
    """The newest checkpoint this run has written, if any."""
    paths = [cb.last_model_path or cb.best_model_path for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint)]
    paths = [p for p in paths if p and os.path.isfile(p)]
    return max(paths, key=os.path.getmtime) if paths else None


def resume_checkpoint_path(trainer: Trainer) -> Path:
    """Where a pre-empted run writes its checkpoint: ``last.ckpt`` in the run's checkpoint folder."""
    for cb in trainer.checkpoint_callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.dirpath:
            return Path(cb.dirpath) / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"
    root = trainer.log_dir or trainer.default_root_dir
    return Path(root) / "checkpoints" / f"{ModelCheckpoint.CHECKPOINT_NAME_LAST}{ModelCheckpoint.FILE_EXTENSION}"


class Preemption(Callback):
    """On SIGTERM or SIGINT, finish the current step, save a resumable checkpoint and stop.

    The checkpoint is the run's ``last.ckpt`` (so ``--ckpt_path last`` finds it); it holds the
    mid-epoch loop position, the training loader's position and the random streams. Training
    then raises :class:`~mpae_lightning.errors.Interrupted` (``mpae`` exits with 128 + signal:
    143 for SIGTERM, 130 for SIGINT). A second signal stops at once without a checkpoint. Under
    DDP the ranks agree (any rank's signal stops all) before saving together. A signal during
    the last step of an epoch or its validation checkpoints at the end of the epoch instead.
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if os.name == "nt" or not _in_main_thread():
            return
        self._previous = {s: signal.getsignal(s) for s in _STOP_SIGNALS}
        if not any(h == _STATE.handler for h in self._previous.values()):
            _STATE.pid, _STATE.pending = os.getpid(), None
        # Replaces Lightning's SIGTERM handler, which would stop mid-validation without a checkpoint.
        for s in _STOP_SIGNALS:
            signal.signal(s, _STATE.handler)
        _STATE.training = True

    def _restore(self) -> None:
        _STATE.training = False
        for s, h in getattr(self, "_previous", {}).items():
            signal.signal(s, h)
        self._previous = {}

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._restore()

    def _check(self, trainer: Trainer, where: str) -> None:
        pending = _STATE.pending if _STATE.training else None
        if trainer.world_size > 1:
            signum = torch.tensor(float(pending or 0), device=trainer.strategy.root_device)
            pending = int(trainer.strategy.reduce(signum, reduce_op="max").item()) or None
        if not pending:
            return
        path = resume_checkpoint_path(trainer)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.save_last:
                # Recorded in the checkpoint, so the resumed ModelCheckpoint overwrites this file
                # instead of writing last-v1.ckpt beside it.
                cb.last_model_path = str(path)
        trainer.save_checkpoint(path)
        raise Interrupted(pending, str(path), where)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        batches = trainer.num_training_batches
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch or batch_idx + 1 >= batches:
            return  # the epoch's last step: checkpoint after its validation, at the epoch boundary
        total = "" if math.isinf(batches) else f" of {int(batches)}"
        self._check(trainer, f"epoch {trainer.current_epoch}, step {trainer.global_step} (batch {batch_idx + 1}{total} done)")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Where ModelCheckpoint saves at the end of an epoch: a state Lightning resumes from cleanly.
        self._check(trainer, f"the end of epoch {trainer.current_epoch} (step {trainer.global_step})")
