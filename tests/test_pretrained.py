"""Pretrained folders (mpae_lightning/pretrained.py): save_pretrained -> from_pretrained gives the same
model, public frozen weights are left out, the card holds real `mpae test` scores, and a damaged or
malicious folder is refused in one line without running code."""
from __future__ import annotations

import glob
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelHubMixin
from safetensors import safe_open
from safetensors.torch import save_file

from model_utils import TINY_MODULE, offline, tiny_images  # noqa: F401 - offline is a fixture
from mpae_lightning import MPAEModule
from mpae_lightning.cli import main
from mpae_lightning.errors import CheckpointError, ConfigError
from mpae_lightning.models.weights import WeightsUnavailableError
from mpae_lightning.pretrained import CITATION, FORMAT, PretrainedMixin


def _tiny(seed: int = 0, **overrides) -> MPAEModule:
    torch.manual_seed(seed)
    return MPAEModule(**{**TINY_MODULE, **overrides}).eval()


def _parts(module: MPAEModule, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return module.model.predict_parts(images)


def _keys(folder: Path) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        return set(handle.keys())


def _tiny_backbone_file(tmp_path: Path) -> str:
    """A local timm weight file for TINY_MODULE's backbone: a 'public' source, as a download would be."""
    import timm

    torch.manual_seed(123)
    vit = timm.create_model(TINY_MODULE["backbone"], pretrained=False, num_classes=0, **TINY_MODULE["backbone_kwargs"])
    path = tmp_path / "tiny_dinov2.pth"
    torch.save(vit.state_dict(), path)
    return str(path)


def test_save_then_load_gives_the_same_part_maps(tmp_path):
    module = _tiny(seed=0)
    folder = tmp_path / "mpae-tiny"
    module.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]

    config = json.loads((folder / "config.json").read_text())
    assert config["format"] == FORMAT and config["backbone_in_weights"] is True
    for name, value in TINY_MODULE.items():  # every setting, as given
        assert config[name] == value, name
    assert config["weights"] is None and "lr" in config and "eval_map_size" in config

    keys = _keys(folder)
    # The model's weights under MPAE's own names; the random backbone is stored (it cannot be rebuilt);
    # VGG (the loss's) never is.
    assert keys == set(module.model.state_dict())
    assert any(k.startswith("backbone.") for k in keys)
    assert not any(k.startswith(("loss.", "model.")) for k in keys)

    loaded = MPAEModule.from_pretrained(folder)
    assert isinstance(loaded, MPAEModule) and not loaded.training
    images = tiny_images()
    assert torch.equal(_parts(loaded, images), _parts(module, images))
    # The weights really come from the file: a fresh module of the same settings differs.
    assert not torch.equal(_parts(_tiny(seed=1), images), _parts(module, images))

    # Free settings may be changed when loading; the weights stay.
    coarse = MPAEModule.from_pretrained(folder, eval_map_size=32)
    assert _parts(coarse, images).shape[-1] == 32
    assert torch.equal(coarse.model.feature_proj.weight, module.model.feature_proj.weight)


def test_public_backbone_is_left_out_and_rebuilt_from_its_source(tmp_path):
    source = _tiny_backbone_file(tmp_path)
    module = _tiny(seed=2, backbone_weights=source)
    folder = tmp_path / "mpae-public-backbone"
    module.save_pretrained(folder)

    keys = _keys(folder)
    assert not any(k.startswith("backbone.") for k in keys)
    assert keys == {k for k in module.model.state_dict() if not k.startswith("backbone.")}
    config = json.loads((folder / "config.json").read_text())
    assert config["backbone_weights"] == source and config["backbone_in_weights"] is False
    assert "rebuilt from `backbone_weights=" in (folder / "README.md").read_text()

    loaded = MPAEModule.from_pretrained(folder)
    images = tiny_images()
    assert torch.equal(_parts(loaded, images), _parts(module, images))
    expected = torch.load(source, weights_only=True)["blocks.0.attn.qkv.weight"]
    assert torch.equal(loaded.model.backbone.vit.blocks[0].attn.qkv.weight, expected)
    loaded.save_pretrained(tmp_path / "again")  # a loaded folder saves the same way
    assert _keys(tmp_path / "again") == keys

    with pytest.raises(ConfigError, match="holds no backbone weights"):
        MPAEModule.from_pretrained(folder, backbone_weights="random")
    copy = shutil.copy(source, tmp_path / "copy.pth")
    os.remove(source)
    with pytest.raises(WeightsUnavailableError, match=r"does not exist here; pass backbone_weights="):
        MPAEModule.from_pretrained(folder)
    assert torch.equal(_parts(MPAEModule.from_pretrained(folder, backbone_weights=str(copy)), images),
                       _parts(module, images))


def test_card_holds_the_scores_of_a_real_mpae_test_run(tmp_path, tiny_demo_args):
    main(["fit", *tiny_demo_args])
    ckpt = glob.glob(str(tmp_path / "**" / "last.ckpt"), recursive=True)[0]
    main(["test", *tiny_demo_args, "--ckpt_path", ckpt])
    scores_file = Path(ckpt).parents[1] / "test_scores.yaml"
    scores = yaml.safe_load(scores_file.read_text())["scores"]
    assert "test/keypoint_nmi" in scores

    module = MPAEModule.load_from_checkpoint(ckpt)
    folder = tmp_path / "card"
    module.save_pretrained(folder, model_card_kwargs={"test_scores": str(scores_file)})
    card = (folder / "README.md").read_text()
    for name, value in scores.items():
        assert f"| `{name}` | {value:.2f} |" in card
    assert "Measured by `mpae test` on `" in card and "last.ckpt" in card
    assert "synthetic parts" in card  # the dataset the test ran on, from test_config.yaml
    assert "K = 4" in card and "vit_small_patch8_224" in card
    assert "keypoint mode" in card and "mask mode" in card
    assert CITATION in card and "Jiahao Xia" in card
    assert "No scores were measured" not in card

    # The card is rewritten at every save: without scores it says none were measured.
    module.save_pretrained(folder)
    card = (folder / "README.md").read_text()
    assert "No scores were measured" in card and "keypoint_nmi" not in card
    loaded = MPAEModule.from_pretrained(folder)
    images = torch.randn(2, 3, 64, 64)
    assert torch.equal(_parts(loaded, images), _parts(module.eval(), images))


def test_scores_that_are_not_a_test_scores_file_are_refused(tmp_path):
    bad = tmp_path / "test_scores.yaml"
    bad.write_text("nmi: 50\n")
    with pytest.raises(ConfigError, match="not a test_scores.yaml written by `mpae test`"):
        _tiny().save_pretrained(tmp_path / "out", model_card_kwargs={"test_scores": str(bad)})
    with pytest.raises(ConfigError, match="writes config.json from its own settings"):
        _tiny().save_pretrained(tmp_path / "out", config={"num_parts": 9})


def test_push_to_hub_is_the_mixins():
    assert issubclass(MPAEModule, ModelHubMixin) and issubclass(MPAEModule, PretrainedMixin)
    assert MPAEModule.push_to_hub is ModelHubMixin.push_to_hub


# ------------------------------------------------------------------------------ refusals
class _Payload:
    """Unpickling this creates ``marker``: what a malicious weight file would do (harmlessly)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _breakers(marker: Path) -> dict:
    def evil_weights(folder):
        torch.save({"feature_proj.weight": torch.zeros(1), "x": _Payload(marker)}, folder / "model.safetensors")

    def pickle_only(folder):
        (folder / "model.safetensors").unlink()
        torch.save({"x": _Payload(marker)}, folder / "pytorch_model.bin")

    def other_k(folder):
        state = _tiny(num_parts=5).model.state_dict()
        save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))

    def extra_tensor(folder):
        with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
            state = {k: handle.get_tensor(k) for k in handle.keys()}
        state["evil.weight"] = torch.zeros(2)
        save_file(state, str(folder / "model.safetensors"))

    return {
        "config is not JSON": (lambda f: (f / "config.json").write_text("{not json"), "is not valid JSON"),
        "config is a list": (lambda f: (f / "config.json").write_text("[1, 2]"), "not an object of settings"),
        "config of another library": (lambda f: _edit_config(f, format="something-else"), "is not an MPAE config"),
        "newer format": (lambda f: _edit_config(f, format_version=99), "upgrade mpae-lightning"),
        "unknown setting": (lambda f: _edit_config(f, class_path="os.system"), "does not know: \\['class_path'\\]"),
        "weights file named": (lambda f: _edit_config(f, weights="/etc/evil.pth"), "weights must be null"),
        "wrong type": (lambda f: _edit_config(f, num_parts="three"), "cannot build MPAEModule from its settings"),
        "config lost": (lambda f: (f / "config.json").unlink(), "config.json missing"),
        "pickle as safetensors": (evil_weights, "not a readable safetensors file"),
        "only a pickle": (pickle_only, "pytorch_model.bin is a pickle, which is never loaded"),
        "weights of another K": (other_k, "does not fit the model config.json describes"),
        "unexpected tensor": (extra_tensor, "unexpected \\['evil.weight'\\]"),
        "backbone flag lies": (lambda f: _edit_config(f, backbone_in_weights=False), "inconsistent"),
    }


@pytest.mark.parametrize("case", list(_breakers(Path("unused"))))
def test_a_damaged_or_malicious_folder_is_refused_clearly(tmp_path, case):
    folder = tmp_path / "folder"
    _tiny().save_pretrained(folder)
    marker = tmp_path / "PWNED"
    damage, message = _breakers(marker)[case]
    damage(folder)
    with pytest.raises(CheckpointError, match=message) as caught:
        MPAEModule.from_pretrained(folder)
    assert "\n" not in str(caught.value)
    assert not marker.exists(), "loading ran code from the folder"


def test_wrong_paths_settings_and_unreachable_hub_ids_are_refused(tmp_path, offline):  # noqa: F811
    folder = tmp_path / "folder"
    _tiny().save_pretrained(folder)
    with pytest.raises(ConfigError, match="num_parts=7 was given, but .* holds weights for num_parts=3"):
        MPAEModule.from_pretrained(folder, num_parts=7)
    with pytest.raises(ConfigError, match="unknown setting"):
        MPAEModule.from_pretrained(folder, num_partz=3)
    with pytest.raises(FileNotFoundError, match="the folder does not exist"):
        MPAEModule.from_pretrained(tmp_path / "nowhere" / "mpae")
    with pytest.raises(CheckpointError, match="is a file.*mpae convert"):
        MPAEModule.from_pretrained(folder / "model.safetensors")
    with pytest.raises(WeightsUnavailableError, match="neither a local folder nor a Hub model") as caught:
        MPAEModule.from_pretrained("someone/mpae-nothing-here", local_files_only=True)
    assert "\n" not in str(caught.value)


def test_card_explains_the_object_mask_iou_of_a_cub_run():
    lines = "\n".join(PretrainedMixin._score_lines({"scores": {"test/keypoint_nmi": 50.0, "test/fg_iou": 61.5,
                                                                "test/bg_iou": 90.0}}))
    assert "| `test/fg_iou` | 61.50 |" in lines
    assert "keypoint mode" in lines and "binary object masks (CUB's segmentations)" in lines
    assert "mask mode" not in lines  # no part masks were scored
