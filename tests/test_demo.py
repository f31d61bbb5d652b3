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
    # image | overlay | part map | ground truth | restored, 128 px tiles with 2 px gaps, under headers
    # and above a legend (8 test images)
    assert grid.width == 5 * 128 + 4 * 2 and grid.height > 8 * 128 + 7 * 2 + 40
    assert (out / "parts_untrained.png").exists()
    assert list(out.rglob("events.out.tfevents*")), "TensorBoard log missing"
    assert list(out.rglob("last.ckpt"))
    printed = capsys.readouterr().out
    assert "report written to" in printed and str(out.resolve()) in printed
