"""baselines.py: KMeansParts, k-means on the frozen backbone's patch tokens with the border cluster as background."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mpae_lightning.baselines import KMeansParts

COLOURS = {"border": (1.0, 0.0, 0.0), "a": (0.0, 1.0, 0.0), "b": (0.0, 0.0, 1.0)}


class PatchColour(nn.Module):
    """A stand-in backbone whose token is the mean colour of each 14x14 patch: (B, h*w, 3). Counts images seen."""

    def __init__(self) -> None:
        super().__init__()
        self.images_seen = 0

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.images_seen += images.shape[0]
        return F.avg_pool2d(images, 14).flatten(2).transpose(1, 2)


def _image(centre: str, noise_seed: int) -> torch.Tensor:
    """A 4x4-patch image: border patches red, the 2x2 centre ``centre``'s colour, plus a little noise."""
    image = torch.tensor(COLOURS["border"])[:, None, None].expand(3, 56, 56).clone()
    image[:, 14:42, 14:42] = torch.tensor(COLOURS[centre])[:, None, None]
    return image + 0.01 * torch.randn(3, 56, 56, generator=torch.Generator().manual_seed(noise_seed))


def _batches(n: int = 6, batch: int = 2) -> list[dict]:
    images = torch.stack([_image("a" if i % 2 else "b", i) for i in range(n)])
    return [{"image": images[i : i + batch]} for i in range(0, n, batch)]


def test_background_is_the_border_cluster_and_comes_last():
    model = KMeansParts(PatchColour(), num_clusters=3, grid_size=(4, 4), seed=0).fit(_batches())
    assert model.centroids.shape == (3, 3)
    # centroids of L2-normalised tokens: the background one is red, the parts green and blue (some order)
    assert torch.allclose(model.centroids[-1], torch.tensor([1.0, 0.0, 0.0]), atol=0.05)
    foreground = {tuple(c.round().tolist()) for c in model.centroids[:-1]}
    assert foreground == {(0.0, 1.0, 0.0), (0.0, 0.0, 1.0)}
    images = torch.stack([_image("a", 100), _image("b", 101)])
    scores = model.predict_parts(images, map_size=8)
    assert scores.shape == (2, 3, 8, 8)
    labels = scores.argmax(dim=1)
    assert (labels[:, :2] == 2).all() and (labels[:, -2:] == 2).all() and (labels[:, :, :2] == 2).all()
    centre = labels[:, 2:6, 2:6]
    assert (centre[0] == centre[0, 0]).all() and (centre[1] == centre[1, 0]).all()
    assert {int(centre[0, 0, 0]), int(centre[1, 0, 0])} == {0, 1}  # two different foreground parts


def test_scores_are_negative_squared_distances_upsampled_nearest():
    backbone = PatchColour()
    model = KMeansParts(backbone, num_clusters=3, grid_size=(4, 4), seed=0).fit(_batches())
    images = torch.stack([_image("a", 7)])
    tokens = F.normalize(backbone(images), dim=-1)[0]  # (16, 3)
    expected = -((tokens[:, None, :] - model.centroids[None]) ** 2).sum(-1)  # (16, K+1)
    grid = expected.t().reshape(1, 3, 4, 4)
    scores = model.predict_parts(images, map_size=12)
    assert torch.allclose(scores, grid.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3), atol=1e-5)
    assert (scores <= 1e-6).all()
    # as probabilities: a softmax over the channels (what the NMI/ARI metrics take after an argmax anyway)
    probs = scores.softmax(dim=1)
    assert torch.allclose(probs.sum(dim=1), torch.ones(1, 12, 12), atol=1e-6)


def test_fit_is_deterministic_given_the_seed_and_reads_only_max_images():
    a = KMeansParts(PatchColour(), num_clusters=3, grid_size=(4, 4), seed=3).fit(_batches())
    b = KMeansParts(PatchColour(), num_clusters=3, grid_size=(4, 4), seed=3).fit(_batches())
    assert torch.equal(a.centroids, b.centroids)
    backbone = PatchColour()
    KMeansParts(backbone, num_clusters=3, grid_size=(4, 4)).fit(_batches(n=10), max_images=3)
    assert backbone.images_seen == 4  # stopped after the batch that reached 3 images


def test_predict_before_fit_is_refused():
    with pytest.raises(RuntimeError, match="fit"):
        KMeansParts(PatchColour(), num_clusters=3, grid_size=(4, 4)).predict_parts(torch.zeros(1, 3, 56, 56), 8)


def test_on_a_tiny_random_backbone_and_synthetic_data():
    from mpae_lightning.data import SyntheticPartsDataModule
    from mpae_lightning.models import FrozenBackbone

    torch.manual_seed(0)
    backbone = FrozenBackbone("vit_small_patch14_reg4_dinov2", weights="random",
                              model_kwargs=dict(embed_dim=32, depth=1, num_heads=2))
    data = SyntheticPartsDataModule(num_train=4, num_val=4, num_test=4, image_size=56, batch_size=2, mini_group=2,
                                    eval_batch_size=4, num_workers=0)
    data.setup("test")
    loader = data.test_dataloader()
    model = KMeansParts(backbone, num_clusters=4, grid_size=(4, 4), seed=0).fit(loader)
    again = KMeansParts(backbone, num_clusters=4, grid_size=(4, 4), seed=0).fit(loader)
    assert torch.equal(model.centroids, again.centroids)
    assert model.centroids.shape == (4, 32)
    images = next(iter(loader))["image"]
    scores = model.predict_parts(images, map_size=16)
    assert scores.shape == (images.shape[0], 4, 16, 16) and torch.isfinite(scores).all()
