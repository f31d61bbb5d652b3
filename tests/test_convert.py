"""``mpae convert`` (mpae_lightning/convert.py): an authors' .pth or our .ckpt becomes a pretrained folder that
``MPAEModule.from_pretrained`` loads to the same part maps; public backbones are left out; bad input is one line."""
from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from mpae_lightning import MPAEModule
from mpae_lightning.cli import main
from mpae_lightning.models import load_official_checkpoint
from mpae_lightning.models.backbone import dinov2_model_kwargs
from reference_utils import reference_dir

HEADS = dict(descriptor_heads=2, encoder_heads=2, decoder_heads=1)


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as caught:
        main(list(argv))
    out, err = capsys.readouterr()
    return caught.value.code, out, err


def _keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


def _parts(model, images: torch.Tensor) -> torch.Tensor:
    """An MPAE's part maps."""
    with torch.no_grad():
        return model.eval().predict_parts(images)


@pytest.fixture(scope="module")
def official(tmp_path_factory) -> dict:
    """An authors'-layout file (the reference fixture's keys, ``module.`` prefix) carrying a DINOv2 as
    ``backbone1.*`` in Meta's names, that DINOv2 alone as a file, and a config for what the .pth lacks."""
    folder = tmp_path_factory.mktemp("official")
    mpae = torch.load(reference_dir() / "mpae_reference_A.pt", map_location="cpu", weights_only=True)
    dino = torch.load(reference_dir() / "dinov2_reference_A.pt", map_location="cpu", weights_only=True)
    state = dict(mpae["state_dict"])
    generator = torch.Generator().manual_seed(0)
    width = state["compress_layer.weight"].shape[0]
    state["compress_layer.weight"] = torch.randn(width, dino["config"]["embed_dim"], 1, 1, generator=generator) * 0.1
    state.update({f"backbone1.{k}": v for k, v in dino["state_dict"].items()})
    pth = folder / "CUB_K4.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, pth)
    dino_file = folder / "dinov2_tiny.pth"
    torch.save(dino["state_dict"], dino_file)
    backbone_kwargs = dinov2_model_kwargs(dino["config"])
    config = folder / "official.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "mpae_lightning.MPAEModule", "init_args": {
        "backbone_kwargs": backbone_kwargs, "vgg_weights": "random", **HEADS}}}))
    expected = load_official_checkpoint(pth, backbone_kwargs=backbone_kwargs, **HEADS)
    images = mpae["inputs"]["image"][:2]
    return dict(pth=pth, dino_file=dino_file, config=config, expected=expected, images=images, state=state)


def test_official_pth_with_its_backbone_stored(official, tmp_path, capsys):
    out = tmp_path / "mpae-cub-k4"
    code, stdout, err = _run(capsys, "convert", str(official["pth"]), "--config", str(official["config"]),
                             "--out", str(out))
    assert code == 0, err
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("mpae convert: wrote ") and str(out / "model.safetensors") in last and "config.json" in last
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    # Its backbone came from the file, not from a recorded public source: it is stored.
    assert any(k.startswith("backbone.") for k in _keys(out))
    config = json.loads((out / "config.json").read_text())
    assert config["num_parts"] == 4 and config["image_size"] == 112 and config["weights"] is None
    card = (out / "README.md").read_text()
    assert "CUB-200-2011" in card and "K = 4" in card and "`CUB_K4.pth`" in card
    assert "No scores were measured" in card and "Jiahao Xia" in card

    loaded = MPAEModule.from_pretrained(out)
    expected = _parts(official["expected"], official["images"])
    assert torch.equal(_parts(loaded.model, official["images"]), expected)
    assert torch.equal(loaded.model.feature_proj.weight, official["state"]["compress_layer.weight"])


def test_the_config_data_section_decides_how_inputs_are_resized(official, tmp_path, capsys):
    """A CelebA config's data class reads images without antialiasing (its default), so the converted
    model records it and predicts that way (``input_antialias`` in config.json and the card)."""
    config = yaml.safe_load(official["config"].read_text())
    config["data"] = {"class_path": "mpae_lightning.data.CelebADataModule",
                      "init_args": {"root": str(tmp_path), "image_size": 112}}
    path = tmp_path / "celeba.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "celeba"
    code, _, err = _run(capsys, "convert", str(official["pth"]), "--config", str(path), "--out", str(out))
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["input_antialias"] is False
    assert "without antialiasing" in (out / "README.md").read_text()
    assert MPAEModule.from_pretrained(out).input_antialias is False


def test_official_backbone_left_out_when_it_is_the_public_one(official, tmp_path, capsys):
    out = tmp_path / "public"
    code, stdout, err = _run(capsys, "convert", str(official["pth"]), "--config", str(official["config"]),
                             "--backbone_weights", str(official["dino_file"]), "--out", str(out))
    assert code == 0, err
    assert not any(k.startswith("backbone.") for k in _keys(out))
    config = json.loads((out / "config.json").read_text())
    assert config["backbone_weights"] == str(official["dino_file"]) and config["backbone_in_weights"] is False
    loaded = MPAEModule.from_pretrained(out)
    assert torch.equal(_parts(loaded.model, official["images"]), _parts(official["expected"], official["images"]))

    # A backbone that is not the one the source gives is not left out.
    other = {k: v + 1 for k, v in torch.load(official["dino_file"], weights_only=True).items()}
    other_file = tmp_path / "other_dinov2.pth"
    torch.save(other, other_file)
    code, _, err = _run(capsys, "convert", str(official["pth"]), "--config", str(official["config"]),
                        "--backbone_weights", str(other_file), "--out", str(tmp_path / "x"))
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("mpae: error: --backbone_weights") and "differs" in err


def _tiny_backbone_file(tmp_path: Path) -> str:
    """The tiny demo's backbone as a local timm weight file: a public source, as timm's download would be."""
    import timm

    vit = timm.create_model("vit_small_patch8_224", pretrained=False, num_classes=0, embed_dim=48, depth=1, num_heads=2)
    path = tmp_path / "tiny_vit.pth"
    torch.save(vit.state_dict(), path)
    return str(path)


def test_checkpoint_of_a_run_with_its_test_scores(tmp_path, tiny_demo_args, official, capsys):
    backbone_file = _tiny_backbone_file(tmp_path)
    args = [*tiny_demo_args, f"--model.init_args.backbone_weights={backbone_file}"]
    main(["fit", *args])
    ckpt = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)[0]
    main(["test", *args, "--ckpt_path", ckpt])
    scores_file = Path(ckpt).parents[1] / "test_scores.yaml"
    scores = yaml.safe_load(scores_file.read_text())["scores"]
    capsys.readouterr()

    out = tmp_path / "from-ckpt"
    code, stdout, err = _run(capsys, "convert", ckpt, "--out", str(out))
    assert code == 0, err
    assert f"scores from {scores_file}" in stdout
    assert stdout.strip().splitlines()[-1].startswith(f"mpae convert: wrote {out / 'model.safetensors'}")
    card = (out / "README.md").read_text()
    for name, value in scores.items():  # found beside the checkpoint, never typed in
        assert f"| `{name}` | {value:.2f} |" in card
    assert "synthetic parts" in card and "K = 4" in card
    # Trained from a public backbone source: left out, and recorded.
    assert not any(k.startswith("backbone.") for k in _keys(out))
    assert json.loads((out / "config.json").read_text())["backbone_weights"] == backbone_file

    loaded = MPAEModule.from_pretrained(out)
    module = MPAEModule.load_from_checkpoint(ckpt)
    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(_parts(loaded.model, images), _parts(module.model, images))

    # A checkpoint rewritten after its test (more training) has no scores yet.
    later = os.path.getmtime(scores_file) + 10
    os.utime(ckpt, (later, later))
    code, stdout, err = _run(capsys, "convert", ckpt, "--out", str(out))
    assert code == 0 and "older than" in stdout, err
    assert "No scores were measured" in (out / "README.md").read_text()

    # Scores of another checkpoint are refused.
    code, _, err = _run(capsys, "convert", str(official["pth"]), "--config", str(official["config"]),
                        "--test_scores", str(scores_file), "--out", str(tmp_path / "wrong-scores"))
    assert code == 2 and err.strip().count("\n") == 0
    assert "holds the scores of" in err and "last.ckpt" in err and not (tmp_path / "wrong-scores").exists()


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_bad_input_is_one_line_and_exit_2(tmp_path, official, capsys):
    junk = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(2, 3, 1, 1)}, junk)
    evil = tmp_path / "evil.pth"
    marker = tmp_path / "PWNED"
    torch.save({"compress_layer.weight": torch.zeros(1), "x": _Payload(marker)}, evil)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    wrong_k = tmp_path / "k16.yaml"
    wrong_k.write_text(yaml.safe_dump({"model": {"init_args": {"num_parts": 16}}}))
    cases = {
        "missing source": (["convert", str(tmp_path / "CUB_K16.pth"), "--out", str(tmp_path / "o")], "does not exist"),
        "not MPAE": (["convert", str(junk), "--out", str(tmp_path / "o")], "neither an authors' MPAE checkpoint"),
        "malicious pickle": (["convert", str(evil), "--out", str(tmp_path / "o")], "could run code"),
        "out is a file": (["convert", str(official["pth"]), "--out", str(a_file)], "is a file"),
        "no --out": (["convert", str(official["pth"])], "out"),
        "config fights the weights": (["convert", str(official["pth"]), "--config", str(wrong_k), "--out",
                                       str(tmp_path / "o")], "holds weights for num_parts=4"),
    }
    for name, (argv, message) in cases.items():
        code, _, err = _run(capsys, *argv)
        assert code == 2, name
        assert err.startswith("mpae: error: ") and err.strip().count("\n") == 0, (name, err)
        assert message in err, (name, err)
    assert not marker.exists()
    assert not (tmp_path / "o").exists()
