"""losses/objective.py: MPAELoss, the weighted sum of the four terms over one MPAEOutput, and LOSS_TERMS."""
from __future__ import annotations

import copy
import dataclasses
import inspect

import pytest
import torch
from torch import nn

from model_utils import (  # noqa: F401 - offline, no_vgg_download: fixtures
    LOSS_KEYS,
    TINY_LOSS,
    TINY_MODEL,
    no_vgg_download,
    offline,
    random_vgg19_features,
    tiny_images,
    tiny_loss,
)
from mpae_lightning import MPAE
from mpae_lightning.losses import (
    LOSS_TERMS,
    ArcFaceSemanticLoss,
    DistributionLoss,
    LossTerm,
    MPAELoss,
    PresenceLoss,
    RestorationLoss,
    VGGFeatures,
)
from mpae_lightning.models import MPAEOutput, WeightsUnavailableError


@pytest.fixture(scope="module")
def model() -> MPAE:
    torch.manual_seed(0)
    return MPAE(**TINY_MODEL)


@pytest.fixture(scope="module")
def loss() -> MPAELoss:
    return tiny_loss()


@pytest.fixture()
def output(model) -> MPAEOutput:
    """One training forward of the tiny model with fixed masking, as a detached output."""
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        return model.train()(tiny_images(), noise=noise)


def _weighted_sum(losses: dict[str, torch.Tensor], weights: dict[str, float]) -> torch.Tensor:
    return sum(weights[term.name] * losses[term.name] for term in LOSS_TERMS)


# --------------------------------------------------------------------------- the total


def test_every_term_with_its_parts_and_the_weighted_total(loss, output):
    losses = loss(output)
    assert set(losses) == LOSS_KEYS
    for name, value in losses.items():
        assert torch.isfinite(value).all(), name
    assert losses["perceptual_terms"].shape == (5,)
    assert all(losses[k].ndim == 0 for k in LOSS_KEYS - {"perceptual_terms"})
    assert float(losses["distribution"]) == pytest.approx(float(losses["total_variation"] + losses["entropy"]), rel=1e-6)
    assert float(losses["presence"]) == pytest.approx(
        float(losses["presence_background"] + losses["presence_foreground"]), rel=1e-6
    )
    # TINY_LOSS's distinct weights: presence 2, distribution 3, semantic 5 (restoration always 1)
    expected = losses["restoration"] + 3.0 * losses["distribution"] + 2.0 * losses["presence"] + 5.0 * losses["semantic"]
    assert float(losses["total"]) == pytest.approx(float(expected), rel=1e-6)


def test_default_weights_give_the_papers_total(output):
    """L = L_r + 0.5 L_d + 1 L_p + 0.25 L_s (docs/method.md §3), from the defaults of MPAELoss."""
    defaults = {k: p.default for k, p in inspect.signature(MPAELoss).parameters.items()}
    assert (defaults["distribution_weight"], defaults["presence_weight"], defaults["semantic_weight"]) == (0.5, 1.0, 0.25)
    paper = MPAELoss(vgg_features=random_vgg19_features())
    losses = paper(output)
    expected = losses["restoration"] + 0.5 * losses["distribution"] + 1.0 * losses["presence"] + 0.25 * losses["semantic"]
    assert float(losses["total"]) == pytest.approx(float(expected), rel=1e-6)


def _copy_features(loss: MPAELoss) -> nn.Sequential:
    """The loss's VGG-19 layers as one ``features`` Sequential (to build a second loss on the same weights)."""
    return nn.Sequential(*[copy.deepcopy(layer) for block in loss.vgg.slices for layer in block])


def _double(output: MPAEOutput) -> MPAEOutput:
    return MPAEOutput(**{f.name: (lambda t: t.double() if t.is_floating_point() else t)(getattr(output, f.name))
                         for f in dataclasses.fields(MPAEOutput)})


@pytest.mark.parametrize("term", [t for t in LOSS_TERMS if t.weight is not None], ids=lambda t: t.name)
def test_changing_a_weight_changes_the_total_by_that_term(loss, output, term):
    base = loss(output)
    weights = {t.name: 1.0 if t.weight is None else getattr(loss, t.weight) for t in LOSS_TERMS}
    assert float(base["total"]) == pytest.approx(float(_weighted_sum(base, weights)), rel=1e-6)
    changed = tiny_loss(**{term.weight: getattr(loss, term.weight) + 1.5})(output)
    for name in LOSS_KEYS - {"total"}:
        assert torch.equal(changed[name], base[name]), name  # the terms themselves are unchanged
    assert float(changed["total"] - base["total"]) == pytest.approx(1.5 * float(base[term.name]), rel=1e-5)
    zero = tiny_loss(**{term.weight: 0.0})(output)
    assert float(base["total"] - zero["total"]) == pytest.approx(getattr(loss, term.weight) * float(base[term.name]),
                                                                  rel=1e-5)


def test_loss_is_deterministic_and_reads_only_the_output(loss, output):
    a, b = loss(output), loss(output)
    assert all(torch.equal(a[k], b[k]) for k in LOSS_KEYS)


# --------------------------------------------------------------------------- the table


def test_loss_terms_table_names_the_terms_their_weights_and_logged_names(loss):
    assert [t.name for t in LOSS_TERMS] == ["restoration", "distribution", "presence", "semantic"]
    assert all(isinstance(t, LossTerm) for t in LOSS_TERMS)
    settings = set(inspect.signature(MPAELoss).parameters)
    for term in LOSS_TERMS:
        assert isinstance(getattr(loss, term.name), nn.Module), term.name  # the term's submodule
        if term.weight is not None:
            assert term.weight in settings and isinstance(getattr(loss, term.weight), float), term.weight
        assert term.logged in LOSS_KEYS
    assert LOSS_TERMS[0].weight is None  # L_r has weight 1


class _WithConstant(MPAELoss):
    """MPAELoss plus a fifth term (2, reported with a part): its module, one line in the terms, one row."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.constant_weight = 3.0

    def map_terms(self, similarity, local_features, descriptors):
        value = similarity.new_tensor(2.0)
        return {**super().map_terms(similarity, local_features, descriptors),
                "constant": {"constant": value, "constant_half": value / 2}}


def test_a_loss_term_is_one_row_of_the_table(monkeypatch, loss, output):
    from mpae_lightning.losses import objective

    before = loss(output)
    monkeypatch.setattr(objective, "LOSS_TERMS", (*LOSS_TERMS, LossTerm("constant", "constant_weight", "constant")))
    extended = _WithConstant(**{k: v for k, v in TINY_LOSS.items() if k != "vgg_weights"},
                             vgg_features=_copy_features(loss))
    after = extended(output)
    assert after["constant"] == 2.0 and after["constant_half"] == 1.0
    # the total gains weight * term, the other terms are unchanged
    assert all(torch.equal(after[k], before[k]) for k in before if k != "total")
    assert torch.allclose(after["total"], before["total"] + 3.0 * 2.0, rtol=1e-6)


# --------------------------------------------------------------------------- settings and submodules


def test_settings_reach_the_terms():
    objective = tiny_loss(mini_group=5, arcface_s=7.0, arcface_m=0.3, l1_weight=0.7)
    assert isinstance(objective.restoration, RestorationLoss) and isinstance(objective.restoration.features, VGGFeatures)
    assert objective.vgg is objective.restoration.features
    assert isinstance(objective.distribution, DistributionLoss) and isinstance(objective.presence, PresenceLoss)
    assert isinstance(objective.semantic, ArcFaceSemanticLoss)
    assert objective.mini_group == 5 == objective.presence.foreground.mini_group
    assert (objective.semantic.s, objective.semantic.m) == (7.0, 0.3)
    assert objective.restoration.l1_weight == 0.7
    assert (objective.presence_weight, objective.distribution_weight, objective.semantic_weight) == (2.0, 3.0, 5.0)


def test_objective_is_frozen_and_gradients_reach_every_trainable_weight(loss):
    """MPAELoss trains nothing (VGG frozen, in eval mode even in training); the total's gradient reaches
    every trainable weight of the model and nothing of the frozen backbone."""
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert all(not m.training for m in loss.vgg.modules())
    torch.manual_seed(0)
    model = MPAE(**TINY_MODEL).train()
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(2))
    loss(model(tiny_images(), noise=noise))["total"].backward()
    for name, p in model.named_parameters():
        if name.startswith("backbone."):
            assert p.grad is None, name
        else:
            assert p.grad is not None, f"no gradient for {name}"
            assert torch.isfinite(p.grad).all(), name
    assert model.feature_proj.weight.grad.abs().sum() > 0
    assert model.descriptor_vit.part_queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in loss.parameters())


# --------------------------------------------------------------------------- VGG-19 fetched on first use


def test_torchvision_vgg_is_fetched_on_first_use_only(no_vgg_download, model):  # noqa: F811
    """Building the objective (and evaluating the model) never downloads; the first loss asks once and says
    which setting takes a local file."""
    objective = MPAELoss(**{**TINY_LOSS, "vgg_weights": "torchvision"})
    assert not objective.vgg.is_ready and objective.vgg.source == "torchvision"
    with torch.no_grad():
        probs = model.eval().predict_parts(tiny_images())
        out = model.train()(tiny_images())
    assert probs.shape[1] == TINY_MODEL["num_parts"] + 1
    assert no_vgg_download == []  # neither construction nor evaluation tried to download
    with pytest.raises(WeightsUnavailableError, match=r"vgg_weights=/path/to/vgg19.pth"):
        objective(out)
    assert len(no_vgg_download) == 1  # the loss asked once, and said what to do
    with pytest.raises(WeightsUnavailableError, match="vgg_weights"):
        objective.resolve()  # resolve() is the same early check


def test_random_or_given_vgg_is_ready_at_once():
    assert tiny_loss().vgg.is_ready  # given layers
    assert not MPAELoss(vgg_weights="/nowhere/vgg19.pth", vgg_features=None).vgg.is_ready  # read on first use


# --------------------------------------------------------------------------- compiled part-map terms


def _flat(terms: dict) -> dict[str, torch.Tensor]:
    """``map_terms``' result with the parts of a term at the top level."""
    return {k: v for name, term in terms.items() for k, v in (term.items() if isinstance(term, dict) else [(name, term)])}


def test_map_terms_trace_as_one_graph_and_compile_regions_keeps_the_values(output):
    objective = tiny_loss().double()
    out64 = _double(output)
    args = (out64.similarity, out64.local_features, out64.descriptors)
    torch.compiler.reset()
    # fullgraph=True raises at the first graph break; "eager" only captures (no code generation).
    traced = _flat(torch.compile(objective.map_terms, backend="eager", fullgraph=True)(*args))
    plain = _flat(objective.map_terms(*args))
    assert set(plain) == {"distribution", "total_variation", "entropy", "presence", "presence_background",
                          "presence_foreground", "semantic"}
    assert traced.keys() == plain.keys()
    for key, value in plain.items():
        assert torch.allclose(traced[key], value, rtol=1e-12, atol=0), key

    reference = objective(out64)
    assert objective._compiled_map_terms is None  # nothing compiled unless asked
    objective.compile_regions(backend="eager")
    first = objective._compiled_map_terms
    assert first is not None
    objective.compile_regions(backend="eager")
    assert objective._compiled_map_terms is first  # idempotent
    keys = list(objective.state_dict())
    compiled = objective(out64)
    assert list(objective.state_dict()) == keys
    for name in LOSS_KEYS:
        assert torch.allclose(compiled[name], reference[name], rtol=1e-12, atol=0), name
