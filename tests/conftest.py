"""Shared fixtures: tiny configurations that run the whole pipeline in seconds on the CPU."""
from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"

#: CLI overrides that shrink configs/demo.yaml to a few seconds.
TINY_DEMO_ARGS = [
    "--data.init_args.num_train=32",
    "--data.init_args.num_val=16",
    "--data.init_args.num_test=16",
    "--data.init_args.image_size=64",
    "--data.init_args.batch_size=8",
    "--data.init_args.eval_batch_size=16",
    "--model.init_args.num_parts=4",
    "--model.init_args.backbone_kwargs={embed_dim: 48, depth: 1, num_heads: 2}",
    "--model.init_args.descriptor_depth=1",
    "--model.init_args.restore_patch=2",
    "--visualization.num_images=2",
    "--trainer.max_epochs=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture
def tiny_demo_args(tmp_path) -> list[str]:
    return [
        "--config", str(DEMO_CONFIG),
        *TINY_DEMO_ARGS,
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
