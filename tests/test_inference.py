"""MPAEModule.predict_images (mpae_lightning/inference.py): files, folders, PIL images and arrays of any size
and mode in, the part maps of the evaluation input out; untrained weights refused unless asked."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from inference_utils import MIXED_IMAGES, TINY_PREDICTOR, make_mixed_images, save_tiny_checkpoint
from mpae_lightning import MPAEModule
from mpae_lightning.data import ImageFolderDataModule
from mpae_lightning.data.base import load_rgb
from mpae_lightning.inference import PartMaps


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> MPAEModule:
    ckpt = save_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.ckpt")
    return MPAEModule.load_from_checkpoint(ckpt)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    return root, make_mixed_images(root)


def _evaluation_batch(root, image_size: int) -> torch.Tensor:
    """The images exactly as `mpae predict` / `mpae test` feed an ImageFolderDataModule's to the network."""
    dm = ImageFolderDataModule(str(root), image_size=image_size, eval_batch_size=64, num_workers=0)
    dm.setup("predict")
    return torch.stack([dm.predict_dataset[i]["image"] for i in range(len(dm.predict_dataset))])


def test_predict_images_equals_predict_parts_on_the_evaluation_input(loaded, folder):
    root, paths = folder
    loaded.train()  # predict_images switches to eval mode and back
    maps = loaded.predict_images(root, batch_size=len(paths))
    assert loaded.training
    assert [m.source for m in maps] == [str(p) for p in paths]  # the folder, in the data module's order
    with torch.no_grad():
        expected = loaded.model.eval().predict_parts(_evaluation_batch(root, loaded.model.image_size))
    assert all(isinstance(m, PartMaps) for m in maps)
    probs = torch.stack([m.probabilities for m in maps])
    assert torch.equal(probs, expected)
    k = loaded.model.num_parts
    for m, p in zip(maps, expected):
        assert m.labels.dtype == torch.int64 and m.labels.shape == p.shape[-2:] == (128, 128)  # eval_map_size
        assert torch.equal(m.labels, p.argmax(0)) and m.num_parts == m.background == k
        assert torch.equal(m.foreground, m.labels != k)
    sizes = {name.split("/")[-1]: hw[:2] for name, hw in MIXED_IMAGES.items()}
    assert [m.image_size for m in maps] == [sizes[p.name] for p in paths]

    # PIL images (any mode, opened by the user) and uint8 arrays give the same maps as their files
    pil = [Image.open(p) for p in paths]
    arrays = [np.asarray(load_rgb(str(p))) for p in paths]
    for inputs in (pil, arrays):
        other = loaded.predict_images(inputs, batch_size=len(paths))
        assert torch.equal(torch.stack([m.probabilities for m in other]), expected)
        assert all(m.source is None for m in other)
    # batches of 3 give the same maps (every image resized on its own, not padded to its batch)
    in_threes = loaded.predict_images(paths, batch_size=3)
    assert all(torch.allclose(a.probabilities, b.probabilities, atol=1e-5) for a, b in zip(in_threes, maps))


def test_original_resolution_resizes_the_labels_to_each_image(loaded, folder):
    root, paths = folder
    at_map = loaded.predict_images(paths[:3])
    original = loaded.predict_images(paths[:3], resolution="original", probabilities=False)
    for small, big, path in zip(at_map, original, paths):
        width, height = Image.open(path).size
        assert big.labels.shape == (height, width) == big.image_size and big.probabilities is None
        nearest = F.interpolate(small.labels[None, None].float(), size=(height, width), mode="nearest")[0, 0].long()
        assert torch.equal(big.labels, nearest)
    with pytest.raises(ValueError, match="resolution must be 'map' or 'original'"):
        loaded.predict_images(paths[:1], resolution="full")


def test_untrained_weights_are_refused_unless_asked_and_loaded_ones_are_not(tmp_path, folder):
    _, paths = folder
    torch.manual_seed(0)
    fresh = MPAEModule(**TINY_PREDICTOR)
    assert not fresh.has_trained_weights
    with pytest.raises(ValueError, match=r"untrained weights.*load_from_checkpoint\(CKPT\).*from_pretrained\(DIR\)"
                                          r".*untrained=True") as err:
        fresh.predict_images(paths[:1])
    assert "\n" not in str(err.value)
    ours = fresh.predict_images(paths[:2], untrained=True)

    # a pretrained folder and a state dict count as trained, and predict what the module predicted
    fresh.save_pretrained(tmp_path / "pretrained")
    reloaded = MPAEModule.from_pretrained(tmp_path / "pretrained")
    assert reloaded.has_trained_weights
    assert all(torch.equal(a.probabilities, b.probabilities) for a, b in zip(reloaded.predict_images(paths[:2]), ours))
    torch.manual_seed(1)
    other = MPAEModule(**TINY_PREDICTOR)
    other.load_state_dict(fresh.state_dict())
    assert other.has_trained_weights
    # weights= (a checkpoint file) too
    ckpt = save_tiny_checkpoint(tmp_path / "tiny.ckpt")
    assert MPAEModule(**{**TINY_PREDICTOR, "weights": str(ckpt)}).has_trained_weights


def test_bad_inputs_are_named(loaded, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"image {tmp_path / 'nope.png'} does not exist"):
        loaded.predict_images([tmp_path / "nope.png"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'} is a folder without images"):
        loaded.predict_images(tmp_path / "empty")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(OSError, match=f"cannot read image {tmp_path / 'broken.png'}"):
        loaded.predict_images(str(tmp_path / "broken.png"))
    with pytest.raises(ValueError, match=r"uint8.*got shape \(8, 8, 3\) dtype float32"):
        loaded.predict_images(np.zeros((8, 8, 3), np.float32))
    with pytest.raises(TypeError, match="predict_parts"):
        loaded.predict_images(torch.zeros(1, 3, 56, 56))


def test_images_are_resized_as_the_checkpoints_training_data(tmp_path):
    """A module trained on squashed, not antialiased, inputs (``input_antialias=False``, CelebA) predicts on
    inputs resized the same way; the setting travels in the checkpoint."""
    from mpae_lightning.data.transforms import input_transform

    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (150, 110, 3), dtype=np.uint8))
    module = MPAEModule.load_from_checkpoint(save_tiny_checkpoint(tmp_path / "plain.ckpt", input_antialias=False))
    assert module.input_antialias is False
    size = module.model.image_size
    got = module.predict_images(image)[0].probabilities
    with torch.no_grad():
        module.eval()
        squashed = module.model.predict_parts(input_transform(size, antialias=False)(image)[None])[0]
        smoothed = module.model.predict_parts(input_transform(size)(image)[None])[0]
    assert torch.equal(got, squashed)
    assert not torch.allclose(squashed, smoothed, atol=1e-4)
    assert MPAEModule(**TINY_PREDICTOR).input_antialias is True  # the default: torchvision's resize
