"""`mpae export`: the part predictor as ONNX (run in onnxruntime) and as a torch.export program."""
from __future__ import annotations

import contextlib
import glob
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mpae_lightning import MPAEModule
from mpae_lightning.cli import main
from mpae_lightning.export import PartsPredictor, export_parts_predictor
from mpae_lightning.models import MPAE
from model_utils import TINY_MODEL, tiny_images


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[str, MPAEModule]:
    """A briefly trained demo model: its checkpoint and the module read back from it."""
    from conftest import DEMO_CONFIG, TINY_DEMO_ARGS

    root = tmp_path_factory.mktemp("trained")
    main(["fit", "--config", str(DEMO_CONFIG), *TINY_DEMO_ARGS, f"--trainer.default_root_dir={root}",
          f"--trainer.logger.init_args.save_dir={root}", "--trainer.limit_train_batches=2",
          "--trainer.limit_val_batches=1"])
    found = glob.glob(str(root / "**" / "last.ckpt"), recursive=True)
    assert found, f"no last.ckpt under {root}"
    return found[0], MPAEModule.load_from_checkpoint(found[0]).eval()


def _export(argv: list[str]) -> str:
    """Run `mpae export ...`; return its last line of output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as stop:
        main(["export", *argv])
    assert stop.value.code == 0
    return out.getvalue().strip().splitlines()[-1]


@pytest.fixture(scope="module")
def onnx_export(trained, tmp_path_factory) -> tuple[Path, str]:
    pytest.importorskip("onnxscript")  # in the dev extra: installed wherever the tests are meant to run
    ckpt, _ = trained
    path = tmp_path_factory.mktemp("onnx") / "parts.onnx"
    return path, _export(["--ckpt_path", ckpt, "--format", "onnx", "--output", str(path)])


def _images(batch: int, size: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _inference_parameters(model: MPAE) -> dict[str, int]:
    """What predict_parts uses: the backbone, the descriptor ViT and the feature projection."""
    return {
        name: p.numel()
        for part in ("backbone", "descriptor_vit", "feature_proj")
        for name, p in getattr(model, part).named_parameters(prefix=part)
    }


# ------------------------------------------------------------------------------------ the wrapper
@pytest.mark.parametrize("scale_factor", [None, 2.0])
def test_predictor_is_predict_parts_bit_for_bit(trained, scale_factor):
    """The export wrapper computes exactly predict_parts (same submodules, same steps)."""
    _, module = trained
    predictor = PartsPredictor(module.model, scale_factor).eval()
    images = _images(3, module.model.image_size, seed=2)
    with torch.no_grad():
        parts, labels = predictor(images)
        expected = module.model.predict_parts(images, scale_factor=scale_factor)
    assert torch.equal(parts, expected)
    assert torch.equal(labels, expected.argmax(dim=1))
    assert dict((n, p.numel()) for n, p in predictor.named_parameters()) == _inference_parameters(module.model)


def test_predictor_follows_predict_parts_under_autocast():
    """Under bf16 autocast too: the backbone follows autocast, the part branch stays float32."""
    torch.manual_seed(0)
    model = MPAE(**TINY_MODEL).eval()
    images = tiny_images(2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        parts, _ = PartsPredictor(model)(images)
        expected = model.predict_parts(images)
    assert parts.dtype == torch.float32 and torch.equal(parts, expected)


def test_a_model_without_backbone_is_refused():
    model = MPAE(**{**TINY_MODEL, "backbone": None, "backbone_dim": 32, "patch_size": 14})
    with pytest.raises(ValueError, match="no backbone"):
        PartsPredictor(model)


# ------------------------------------------------------------------------------------ ONNX
def test_onnx_file_runs_in_onnxruntime_like_predict_parts(trained, onnx_export):
    ort = pytest.importorskip("onnxruntime")
    _, module = trained
    path, line = onnx_export
    assert line.startswith("mpae export: wrote the ONNX model") and line.endswith(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["parts", "labels"]
    assert isinstance(session.get_inputs()[0].shape[0], str)  # a named, dynamic batch dimension
    k1, s = module.model.num_parts + 1, module.model.image_size
    m = int(module.model.grid_size[0] * module.model.eval_scale_factor)
    for batch in (1, 3):
        images = _images(batch, s, seed=batch)
        parts, labels = session.run(None, {"images": images.numpy()})
        with torch.no_grad():
            expected = module.model.predict_parts(images).numpy()
        assert parts.shape == expected.shape == (batch, k1, m, m) and labels.shape == (batch, m, m)
        max_abs = float(np.abs(parts - expected).max())
        agreement = float((parts.argmax(1) == expected.argmax(1)).mean())
        print(f"onnxruntime batch {batch}: max abs diff {max_abs:.3g}, argmax agreement {agreement:.5%}")
        assert max_abs <= 1e-4
        assert agreement >= 0.999
        assert np.array_equal(labels, parts.argmax(1))
        np.testing.assert_allclose(parts.sum(1), 1.0, atol=1e-5)


def test_onnx_graph_holds_only_the_inference_weights(trained, onnx_export):
    onnx = pytest.importorskip("onnx")
    _, module = trained
    path, _ = onnx_export
    graph = onnx.load(str(path))
    initializers = {t.name: int(np.prod(t.dims)) for t in graph.graph.initializer}
    assert initializers == _inference_parameters(module.model)  # named as in the state dict, no others
    total = sum(initializers.values())
    assert total == sum(_inference_parameters(module.model).values())
    assert total < sum(p.numel() for p in module.parameters())  # the restorer and VGG-19 are not in it
    names = [*initializers, *(n.name for n in graph.graph.node)]
    for word in ("restor", "vgg", "loss"):
        assert not [n for n in names if word in n.lower()], word
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["mpae.num_parts"] == str(module.model.num_parts)
    assert meta["mpae.image_size"] == str(module.model.image_size)
    assert "bilinear with antialiasing" in meta["mpae.input_resize"]  # the module's input_antialias


def test_metadata_says_how_to_resize_for_a_model_trained_without_antialiasing(trained):
    _, module = trained
    meta = PartsPredictor(module.model, input_antialias=False).metadata()
    assert "without antialiasing" in meta["mpae.input_resize"]


# ------------------------------------------------------------------------------------ torch.export
def test_torch_export_round_trip(trained, tmp_path):
    ckpt, module = trained
    path = tmp_path / "parts.pt2"
    line = _export(["--ckpt_path", ckpt, "--output", str(path)])  # the format from the suffix
    assert line.startswith("mpae export: wrote the torch.export program") and line.endswith(str(path))
    extra = {"mpae.json": ""}
    program = torch.export.load(str(path), extra_files=extra)
    assert json.loads(extra["mpae.json"])["mpae.num_parts"] == str(module.model.num_parts)
    assert set(program.state_dict) == set(_inference_parameters(module.model))
    predictor = program.module()
    for batch in (1, 3):
        images = _images(batch, module.model.image_size, seed=10 + batch)
        parts, labels = predictor(images)
        with torch.no_grad():
            expected = module.model.predict_parts(images)
        torch.testing.assert_close(parts, expected, rtol=0, atol=1e-5)
        assert torch.equal(labels, parts.argmax(dim=1))


def test_python_api_exports_an_mpae_and_keeps_its_mode(tmp_path):
    torch.manual_seed(0)
    model = MPAE(**TINY_MODEL).train()
    path = export_parts_predictor(model, tmp_path / "sub" / "tiny.pt2", format="torch", scale_factor=1.0)
    assert model.training and model.descriptor_vit.training  # left as it was
    images = tiny_images(2)
    parts, _ = torch.export.load(str(path)).module()(images)
    with torch.no_grad():
        expected = model.eval().predict_parts(images, scale_factor=1.0)
    assert parts.shape == (2, TINY_MODEL["num_parts"] + 1, 4, 4)
    torch.testing.assert_close(parts, expected, rtol=0, atol=1e-5)
    assert [p.name for p in path.parent.iterdir()] == ["tiny.pt2"]  # no temporary file left


def test_untrained_export_takes_its_settings_from_a_config(tmp_path):
    import yaml

    from model_utils import TINY_MODULE

    settings = {k: v for k, v in TINY_MODULE.items() if k not in ("image_size", "num_parts")}
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"class_path": "mpae_lightning.MPAEModule", "init_args": {**settings, "num_parts": 5}},
        "data": {"init_args": {"image_size": 28}},  # the image size comes from the data section, as in `mpae fit`
    }))
    path = tmp_path / "untrained.pt2"
    line = _export(["--untrained", "--config", str(config), "--output", str(path), "--scale_factor", "1"])
    assert "initial (untrained) weights" in line and line.endswith(str(path))
    parts, labels = torch.export.load(str(path)).module()(_images(2, 28, seed=0))  # patch 14: a 2x2 grid
    assert parts.shape == (2, 6, 2, 2) and labels.shape == (2, 2, 2)


# ------------------------------------------------------------------------------------ user errors
def _error(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as stop:
        main(["export", *argv])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("mpae: error:")]
    assert stop.value.code == 2 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_export_without_weights_is_refused(capsys, tmp_path):
    line = _error(capsys, ["--output", str(tmp_path / "p.onnx")])
    assert "--ckpt_path" in line and "--untrained" in line
    assert not (tmp_path / "p.onnx").exists()


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--ckpt_path", "{tmp}/missing.ckpt", "--output", "{tmp}/p.onnx"], ["missing.ckpt", "does not exist"]),
        (["--ckpt_path", "{ckpt}"], ["--output"]),
        (["--ckpt_path", "{ckpt}", "--format", "tflite", "--output", "{tmp}/p.onnx"], ["format", "tflite"]),
        (["--ckpt_path", "{ckpt}", "--format", "torch", "--output", "{tmp}/p.onnx"], ["--output", "p.onnx", "--format"]),
        (["--ckpt_path", "{ckpt}", "--untrained", "--output", "{tmp}/p.onnx"], ["--ckpt_path", "--untrained"]),
        (["--ckpt_path", "{ckpt}", "--config", "x.yaml", "--output", "{tmp}/p.onnx"], ["--config", "drop"]),
        (["--untrained", "--config", "{tmp}/bad.yaml", "--output", "{tmp}/p.pt2"], ["bad.yaml", "num_partz"]),
        (["--ckpt_path", "{ckpt}", "--output", "{tmp}/p.onnx", "--scale_factor", "0"], ["scale_factor", "0"]),
    ],
)
def test_bad_input_is_one_line(capsys, tmp_path, trained, argv, words):
    (tmp_path / "bad.yaml").write_text("model:\n  init_args:\n    num_partz: 4\n")
    argv = [a.format(tmp=tmp_path, ckpt=trained[0]) for a in argv]
    line = _error(capsys, argv)
    for word in words:
        assert word in line, line
    assert not list(tmp_path.glob("p.*"))
