"""`make demo`'s pipeline at a tiny size: the report's files and keys."""
from __future__ import annotations

import json

from PIL import Image

from conftest import DEMO_CONFIG, TINY_DEMO_ARGS
from mpae_lightning.demo import main


def test_demo_writes_report(tmp_path, capsys):
    out = tmp_path / "report"
    main(["--config", str(DEMO_CONFIG), "--out", str(out), *TINY_DEMO_ARGS])
    metrics = json.loads((out / "metrics.json").read_text())
    for run in ("trained", "untrained", "kmeans"):
        assert set(metrics[run]["keypoint"]) == {"nmi", "ari", "fg_nmi", "fg_ari"}
        assert set(metrics[run]["mask"]) == {"nmi", "ari"}
        for scores in (metrics[run]["keypoint"], metrics[run]["mask"]):
            assert all(-100.0 <= v <= 100.0 for v in scores.values()), scores
    # one epoch of training changes the model, so its scores differ from the untrained copy
    assert metrics["trained"] != metrics["untrained"]
    grid = Image.open(out / "parts.png")
    # image | overlay | part map | ground truth | restored, 256 px tiles with 2 px gaps, under a title,
    # headers and above a legend (8 test images)
    assert grid.width == 5 * 256 + 4 * 2 and grid.height > 8 * 256 + 7 * 2 + 40
    # the title names the checkpoint, the epoch and the test score printed in metrics.json
    nmi = metrics["trained"]["keypoint"]["nmi"]
    assert grid.text["Title"] == f"MPAE K=4  |  last.ckpt  |  epoch 0  |  test keypoint NMI {nmi:.2f}"
    untrained = Image.open(out / "parts_untrained.png").text["Title"]
    assert untrained.startswith("MPAE K=4  |  untrained  |  test keypoint NMI ")
    assert list(out.rglob("events.out.tfevents*")), "TensorBoard log missing"
    assert list(out.rglob("last.ckpt"))
    printed = capsys.readouterr().out
    assert "report written to" in printed and str(out.resolve()) in printed


def test_demo_stops_cleanly_on_sigterm_and_bad_settings(tmp_path, capsys):
    """The demo ends as the mpae commands do: a signal saves the checkpoint and exits 143 with one
    line, a bad setting is one `mpae: error:` line and exit 2, never a traceback."""
    import pytest

    out = tmp_path / "report"
    signal_at = '--trainer.callbacks+={"class_path": "signal_helpers.SignalAt", "init_args": {"step": 1}}'
    with pytest.raises(SystemExit) as stop:
        main(["--config", str(DEMO_CONFIG), "--out", str(out), *TINY_DEMO_ARGS, signal_at])
    assert stop.value.code == 143
    err = capsys.readouterr().err
    line = next(line for line in err.splitlines() if line.startswith("demo: stopped by SIGTERM"))
    assert "epoch 0, step 1" in line and "last.ckpt" in line and "Traceback" not in err
    assert list(out.rglob("last.ckpt"))

    with pytest.raises(SystemExit) as bad:
        main(["--config", str(DEMO_CONFIG), "--out", str(tmp_path / "bad"), *TINY_DEMO_ARGS,
              "--model.init_args.num_parts=0"])
    assert bad.value.code == 2
    err = capsys.readouterr().err
    assert "mpae: error:" in err and "num_parts" in err and "Traceback" not in err
