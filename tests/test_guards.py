"""guards.py in-process, on a one-layer model: NonFiniteGuard, ExactResume's random streams, stop signals
and Preemption. The ``mpae`` command's behaviour (exit codes, bit-identical resumes) is in test_reliability.py."""
from __future__ import annotations

import os
import random
import signal

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from mpae_lightning.errors import Interrupted, NonFiniteLossError
from mpae_lightning.guards import ExactResume, NonFiniteGuard, Preemption, capture_rng, restore_rng, stop_signals
from signal_helpers import SignalAt


class OneLayer(LightningModule):
    """y = w x + b on 8 random rows, 2 per batch (4 steps an epoch); step ``bad_step`` goes wrong as told.

    Records the weight at the start of every step, so a test can tell which steps changed it.
    """

    def __init__(self, bad_step: int | None = None, bad: str = "loss") -> None:
        super().__init__()
        self.layer = nn.Linear(4, 1)
        self.bad_step, self.bad = bad_step, bad
        self.weights_seen: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.weights_seen.append(self.layer.weight.detach().clone())
        loss = self.layer(batch[0]).pow(2).mean()
        terms = {"fit": loss.detach()}
        if self.global_step == self.bad_step and self.bad == "loss":
            terms["broken"] = loss.detach() * float("nan")
            loss = loss + terms["broken"]
        if self.global_step == self.bad_step and self.bad == "grad":
            # value 0, gradient 0 * d sqrt(x)/dx at 0 = NaN: a finite loss with a non-finite gradient
            loss = loss + torch.sqrt(torch.zeros(1) + 0 * self.layer.bias).sum()
        self.last_train_losses = {**terms, "total": loss.detach()}  # what MPAEModule records for the guard
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        data = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(data), batch_size=2)


def _trainer(tmp_path, callbacks, **kwargs) -> Trainer:
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path, max_epochs=1)
    return Trainer(callbacks=callbacks, **{**options, **kwargs})


# --------------------------------------------------------------------------- NonFiniteGuard


def test_guard_refuses_an_unknown_action():
    with pytest.raises(ValueError, match="'stop' or 'skip'"):
        NonFiniteGuard(action="ignore")


def test_guard_stops_before_the_bad_update_and_names_the_term(tmp_path):
    torch.manual_seed(0)
    module = OneLayer(bad_step=2)
    with pytest.raises(NonFiniteLossError) as info:
        _trainer(tmp_path, [NonFiniteGuard()]).fit(module)
    message = str(info.value)
    assert "non-finite loss broken=nan" in message and "fit=" not in message  # only the bad terms
    step = module.bad_step  # a bad loss set by the data, not by the clock
    assert f"epoch 0, step {step} (batch {step + 1} of the epoch)" in message
    assert "stopped before this update" in message and "no checkpoint was written" in message
    assert "--non_finite.action=skip" in message
    assert len(module.weights_seen) == 3
    assert torch.equal(module.layer.weight, module.weights_seen[2])  # the bad step did not update
    assert not torch.equal(module.weights_seen[1], module.weights_seen[0])  # the good ones did


def test_guard_stops_on_a_non_finite_gradient_and_names_the_parameter(tmp_path):
    torch.manual_seed(0)
    module = OneLayer(bad_step=1, bad="grad")
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient of layer\.bias at epoch 0, step 1"):
        _trainer(tmp_path, [NonFiniteGuard()]).fit(module)
    assert torch.isfinite(module.layer.bias).all() and torch.isfinite(module.layer.weight).all()  # not updated with NaN
    # without the gradient check, the same step goes through (and poisons the bias)
    module = OneLayer(bad_step=1, bad="grad")
    _trainer(tmp_path, [NonFiniteGuard(check_gradients=False)], max_steps=2).fit(module)
    assert not torch.isfinite(module.layer.bias).all()


def test_guard_skips_bad_steps_counts_them_and_keeps_the_count(tmp_path):
    torch.manual_seed(0)
    module = OneLayer(bad_step=1)
    guard = NonFiniteGuard(action="skip")
    trainer = _trainer(tmp_path, [guard])
    with pytest.warns(UserWarning, match=r"skipping the step at epoch 0, step 1 .*non-finite loss broken=nan"):
        trainer.fit(module)
    assert guard.skipped == 1
    seen = module.weights_seen
    assert len(seen) == 4  # every batch was trained on
    assert torch.equal(seen[2], seen[1])  # the skipped step left the weights alone
    assert not torch.equal(seen[1], seen[0]) and not torch.equal(seen[3], seen[2])
    assert torch.isfinite(module.layer.weight).all()
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 1.0
    assert guard.state_dict() == {"skipped": 1}
    restored = NonFiniteGuard(action="skip")
    restored.load_state_dict(guard.state_dict())
    assert restored.skipped == 1
    restored.load_state_dict({})  # a checkpoint written without the guard
    assert restored.skipped == 0


# --------------------------------------------------------------------------- random streams


def _draws() -> tuple[list[float], list[float], float]:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), random.random()


def test_capture_and_restore_rng_replay_every_generator_and_survive_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    _draws()  # somewhere in the streams, not at a seed
    np.random.standard_normal()  # NumPy's cached Gaussian is part of its state
    state = capture_rng()
    first = _draws()
    restore_rng(state)
    assert _draws() == first
    torch.save(state, tmp_path / "rng.pt")
    loaded = torch.load(tmp_path / "rng.pt", weights_only=True)  # plain tensors and numbers only
    _draws()
    restore_rng(loaded)
    assert _draws() == first


def test_exact_resume_keeps_the_step_stream_apart_and_resumes_it():
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    expected = [_draws() for _ in range(3)]  # what three steps draw, with nothing else drawing
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    callback = ExactResume()
    callback.on_train_start(None, None)

    def step() -> tuple:
        callback.on_train_batch_start(None, None, None, 0)
        try:
            return _draws()
        finally:
            callback.on_train_batch_end(None, None, None, None, 0)

    assert step() == expected[0]
    outside = _draws()  # Lightning's own draws between steps (loader seeds, validation ...)
    assert outside == expected[0]  # the outer stream did not see the step's draws
    assert step() == expected[1]  # ... nor the step the outer draws
    saved = callback.state_dict()

    resumed = ExactResume()
    resumed.load_state_dict(saved)
    torch.manual_seed(123)  # a resumed run: the global streams are elsewhere
    resumed.on_train_start(None, None)  # keeps the loaded stream
    resumed.on_train_batch_start(None, None, None, 0)
    assert _draws() == expected[2]
    resumed.on_exception(None, None, RuntimeError())  # an exception mid-step swaps the outer stream back
    torch.manual_seed(123)
    reference = torch.rand(2)
    torch.manual_seed(123)
    resumed.on_train_start(None, None)
    assert torch.equal(torch.rand(2), reference)
    assert ExactResume().state_dict() == {}  # nothing to save before training starts


# --------------------------------------------------------------------------- stop signals and pre-emption


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signals_raise_interrupted_outside_training_and_restore_the_handlers(signum, code):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with pytest.raises(Interrupted) as info:
        with stop_signals():
            assert signal.getsignal(signum) is not before[signum]
            os.kill(os.getpid(), signum)
            pytest.fail("the signal did not stop the block")
    assert info.value.signum == signum and info.value.exit_code == code and info.value.checkpoint is None
    assert "no checkpoint was written" in info.value.message()
    assert {s: signal.getsignal(s) for s in before} == before


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_preemption_finishes_the_step_saves_a_resumable_checkpoint_and_stops(tmp_path):
    torch.manual_seed(0)
    module = OneLayer()
    before = signal.getsignal(signal.SIGTERM)
    step = 2  # SignalAt signals its own process from inside this step's hook: no timing involved
    trainer = _trainer(tmp_path, [SignalAt(signal.SIGTERM, step=step), Preemption()])
    with pytest.raises(Interrupted) as info:
        trainer.fit(module)
    stop = info.value
    assert stop.signum == signal.SIGTERM and stop.exit_code == 143
    assert stop.where == f"epoch 0, step {step} (batch {step} of 4 done)"
    assert stop.checkpoint and os.path.isfile(stop.checkpoint) and stop.checkpoint.endswith("last.ckpt")
    assert "--ckpt_path last" in stop.message()
    checkpoint = torch.load(stop.checkpoint, map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2
    assert torch.equal(checkpoint["state_dict"]["layer.weight"], module.layer.weight)
    assert len(module.weights_seen) == 2  # the step in progress finished, no further one began
    assert signal.getsignal(signal.SIGTERM) == before  # handlers restored
