"""Two CPU processes (gloo) by Trainer flags alone: training runs, and test scores equal one process's."""
from __future__ import annotations

import glob

import pytest

from mpae_lightning.cli import MPAECLI

DDP_FLAGS = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp_spawn"]
SCORES = ("test/keypoint_nmi", "test/keypoint_ari", "test/keypoint_fg_nmi", "test/keypoint_fg_ari", "test/mask_nmi",
          "test/mask_ari")


def test_ddp_fit_and_exact_test_scores(tmp_path, tiny_demo_args, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # two processes on two cores
    MPAECLI(args=["fit", *tiny_demo_args, *DDP_FLAGS])
    ckpt = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)
    assert ckpt, "DDP training wrote no checkpoint"

    single = MPAECLI(args=["test", *tiny_demo_args, f"--ckpt_path={ckpt[0]}"]).trainer.callback_metrics
    double = MPAECLI(args=["test", *tiny_demo_args, *DDP_FLAGS, f"--ckpt_path={ckpt[0]}"]).trainer.callback_metrics
    for key in SCORES:
        # each test image is counted exactly once across the two processes
        assert float(double[key]) == pytest.approx(float(single[key]), abs=1e-6), key
