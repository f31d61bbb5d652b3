"""Shared by the model, loss and module tests: tiny configurations, a cheap random VGG-19 and offline fixtures.

Test modules import the fixtures by name (``from model_utils import offline``), so only those
that need them see them.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

#: A tiny MPAE that runs a step in well under a second on the CPU: 4x4 patch grid, random weights.
TINY_MODEL = dict(
    num_parts=3,
    image_size=56,  # 4x4 patch grid
    feature_dim=64,
    backbone="vit_small_patch14_reg4_dinov2",
    backbone_weights="random",
    backbone_kwargs=dict(embed_dim=32, depth=1, num_heads=2),
    descriptor_width=32,
    descriptor_depth=1,
    descriptor_heads=2,
    encoder_width=32,
    encoder_depth=1,
    encoder_heads=2,
    decoder_depth=1,
    restore_patch=4,
    mask_ratio=0.75,
)
#: Its objective: distinct, non-default lambdas so that a swapped weight shows in the total.
TINY_LOSS = dict(
    mini_group=2,
    vgg_weights="random",
    presence_weight=2.0,
    distribution_weight=3.0,
    semantic_weight=5.0,
)
#: MPAEModule takes both.
TINY_MODULE = {**TINY_MODEL, **TINY_LOSS}

#: Every key MPAELoss returns: the four terms, their parts and the total.
LOSS_KEYS = {
    "restoration",
    "restoration_l1",
    "perceptual",
    "perceptual_terms",
    "total_variation",
    "entropy",
    "distribution",
    "presence_background",
    "presence_foreground",
    "presence",
    "semantic",
    "total",
}

#: A small timm ViT for backbone tests.
SMALL_VIT = dict(embed_dim=32, depth=1, num_heads=2)


_VGG19_FEATURES: dict[int, nn.Sequential] = {}


def random_vgg19_features(seed: int = 0) -> nn.Sequential:
    """A seeded random ``vgg19().features``, built without the (slow, 100M-parameter) classifier.

    Built once per seed and handed out as copies, so that each caller may change its own.
    """
    if seed not in _VGG19_FEATURES:
        from torchvision.models.vgg import cfgs, make_layers

        generator_state = torch.get_rng_state()
        torch.manual_seed(seed)
        _VGG19_FEATURES[seed] = make_layers(cfgs["E"])
        torch.set_rng_state(generator_state)  # callers' own seeding is left as it was
    return copy.deepcopy(_VGG19_FEATURES[seed])


def tiny_loss(**overrides):
    """:class:`MPAELoss` of :data:`TINY_LOSS` on a random VGG-19 (no download, ~0.3 s)."""
    from mpae_lightning.losses import MPAELoss

    kwargs = {k: v for k, v in TINY_LOSS.items() if k != "vgg_weights"}
    kwargs.update(overrides)
    if "vgg_weights" not in kwargs and "vgg_features" not in kwargs:
        kwargs["vgg_features"] = random_vgg19_features()
    return MPAELoss(**kwargs)


def tiny_images(batch: int = 3, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(batch, 3, 56, 56, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.fixture()
def offline(monkeypatch, tmp_path):
    """No network and empty caches: every download attempt fails as it would on an offline machine."""
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    for var in ("HF_HOME", "TORCH_HOME", "HF_HUB_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    try:  # huggingface_hub reads its cache folder at import time
        from huggingface_hub import constants

        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_hub_cache"))
        monkeypatch.setattr(constants, "HF_HOME", str(tmp_path / "hf_home"))
    except ImportError:
        pass
    try:  # huggingface_hub retries failed connections with 1+2+4+8+8 s of back-off; skip the waiting
        import time
        import types

        from huggingface_hub.utils import _http

        fast_time = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if not n.startswith("_")})
        fast_time.sleep = lambda seconds: None
        monkeypatch.setattr(_http, "time", fast_time)
    except (ImportError, AttributeError):
        pass
    return tmp_path


@pytest.fixture()
def no_vgg_download(offline, monkeypatch):
    """torchvision's weight download raises (and counts the attempts), on top of a machine without network."""
    import torchvision.models._api as tv_api

    attempts = []

    def refuse(url, *args, **kwargs):
        attempts.append(url)
        raise ConnectionError(f"download of {url} refused by the test")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    return attempts
