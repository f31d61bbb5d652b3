"""Every file the package reads is read without running code: a malicious pickle through every
public entry point (Python and the ``mpae`` command) creates no marker and gets one clear line."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from conftest import DEMO_CONFIG, TINY_DEMO_ARGS
from mpae_lightning import MPAEModule
from mpae_lightning.cli import main
from mpae_lightning.losses import MPAELoss
from mpae_lightning.models import MPAE, WeightsUnavailableError, load_official_checkpoint
from mpae_lightning.runs import read_checkpoint


class _Payload:
    """Unpickling this creates ``marker``: what an attacker's checkpoint would do (here, harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


@pytest.fixture
def evil(tmp_path) -> tuple[Path, Path]:
    """A checkpoint-shaped file whose unpickling would run code, and the marker that code would create."""
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.feature_proj.weight": torch.zeros(1)}, "hyper_parameters": {},
                "payload": _Payload(marker)}, path)
    return path, marker


TINY = dict(num_parts=2, image_size=16, feature_dim=16, backbone="vit_small_patch8_224", backbone_weights="random",
            backbone_kwargs={"embed_dim": 16, "depth": 1, "num_heads": 1}, descriptor_width=16, descriptor_depth=1,
            descriptor_heads=1, encoder_width=16, encoder_heads=1, decoder_heads=1, vgg_weights="random")

PYTHON_ENTRY_POINTS = {
    "MPAEModule.load_from_checkpoint": lambda p: MPAEModule.load_from_checkpoint(p),
    "MPAEModule(weights=...)": lambda p: MPAEModule(**{**TINY, "weights": str(p)}),
    "MPAE(backbone_weights=...)": lambda p: MPAE(**{k: v for k, v in TINY.items() if k != "vgg_weights"}
                                               | {"backbone_weights": str(p)}),
    "MPAELoss(vgg_weights=...).resolve()": lambda p: MPAELoss(vgg_weights=str(p)).resolve(),
    "load_official_checkpoint": lambda p: load_official_checkpoint(p),
    "runs.read_checkpoint": lambda p: read_checkpoint(str(p)),
}


@pytest.mark.parametrize("entry", list(PYTHON_ENTRY_POINTS))
def test_python_entry_points_refuse_a_malicious_pickle(evil, entry):
    path, marker = evil
    with pytest.raises((WeightsUnavailableError, ValueError)) as caught:
        PYTHON_ENTRY_POINTS[entry](path)
    assert not marker.exists(), f"{entry} ran code from {path}"
    message = str(caught.value)
    assert "\n" not in message.strip() and str(path.name) in message, message
    assert "run code" in message or "refused" in message or "cannot read" in message, message


@pytest.mark.parametrize(
    "subcommand, argument",
    [("test", "--ckpt_path={}"), ("fit", "--ckpt_path={}"), ("fit", "--model.init_args.weights={}"),
     ("fit", "--model.init_args.backbone_weights={}"), ("fit", "--model.init_args.vgg_weights={}")],
    ids=["test-ckpt", "fit-ckpt", "weights", "backbone-weights", "vgg-weights"],
)
def test_mpae_command_refuses_a_malicious_pickle_in_one_line(evil, tmp_path, capsys, subcommand, argument):
    path, marker = evil
    args = [subcommand, "--config", str(DEMO_CONFIG), *TINY_DEMO_ARGS, f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", argument.format(path)]
    with pytest.raises(SystemExit) as stop:
        main(args)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err[-2000:]
    assert not marker.exists()
    lines = [line for line in err.splitlines() if line.startswith("mpae: error:")]
    assert len(lines) == 1 and "Traceback" not in err and path.name in lines[0], err[-2000:]
