"""MPAE's training objective: the four weighted loss terms and the frozen VGG-19 of the first."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .distribution import DistributionLoss
from .presence import PresenceLoss
from .restoration import RestorationLoss
from .semantic import ArcFaceSemanticLoss
from .vgg import VGGFeatures

if TYPE_CHECKING:  # the loss reads the model's output; the model never needs the loss
    from ..models.mpae import MPAEOutput


@dataclass(frozen=True)
class LossTerm:
    """One weighted term of MPAE's total loss: a row of :data:`LOSS_TERMS`.

    Attributes:
        name: the term's key in the losses :meth:`MPAELoss.forward` returns (and its submodule).
        weight: the :class:`MPAELoss` argument holding its weight in the total (None: weight 1).
        logged: the name it is logged under (``train/<logged>``, ``val/<logged>``).
    """

    name: str
    weight: str | None
    logged: str


#: ``total = sum(weight * term)`` in this order; docs/method.md gives the formulas. Adding a term
#: is its module in :class:`MPAELoss`, one line where :meth:`MPAELoss.forward` assembles the
#: terms, and one row here.
LOSS_TERMS: tuple[LossTerm, ...] = (
    LossTerm("restoration", None, "restoration"),
    LossTerm("distribution", "distribution_weight", "distribution"),
    LossTerm("presence", "presence_weight", "presence"),
    LossTerm("semantic", "semantic_weight", "semantic"),
)


class MPAELoss(nn.Module):
    """L = L_r + lambda_d L_d + lambda_p L_p + lambda_s L_s, from one :class:`~mpae_lightning.models.MPAEOutput`.

    Owns the networks the objective needs: the frozen VGG-19 of the restoration term, whose
    pretrained weights are fetched on first use (or by :meth:`resolve`), never at
    construction, so building a model for inference needs no network.

    Args:
        mini_group: chunk size of the foreground presence term (8 single-category, 64
            multi-category). The ``mpae`` CLI sets it from ``data.init_args.mini_group``.
        presence_weight: lambda_p.
        distribution_weight: lambda_d.
        semantic_weight: lambda_s.
        l1_weight: weight of the pixel L1 inside L_r.
        arcface_s: ArcFace logit scale s.
        arcface_m: ArcFace angular margin m.
        vgg_weights: ``"torchvision"`` (download), a local ``.pth`` or ``"random"``.
        vgg_features: an already built ``vgg19().features`` to use instead of ``vgg_weights``.
    """

    def __init__(
        self,
        mini_group: int = 8,
        presence_weight: float = 1.0,
        distribution_weight: float = 0.5,
        semantic_weight: float = 0.25,
        l1_weight: float = 0.1,
        arcface_s: float = 20.0,
        arcface_m: float = 0.5,
        vgg_weights: str | None = "torchvision",
        vgg_features: nn.Sequential | None = None,
    ) -> None:
        super().__init__()
        self.presence_weight = float(presence_weight)
        self.distribution_weight = float(distribution_weight)
        self.semantic_weight = float(semantic_weight)
        self.restoration = RestorationLoss(VGGFeatures(vgg_weights, features=vgg_features), l1_weight)
        self.distribution = DistributionLoss()
        self.presence = PresenceLoss(mini_group)
        self.semantic = ArcFaceSemanticLoss(arcface_s, arcface_m)
        self._compiled_map_terms: Callable[..., Any] | None = None  # set by compile_regions()

    @property
    def vgg(self) -> VGGFeatures:
        """The frozen VGG-19 feature taps of the restoration term."""
        return self.restoration.features

    @property
    def mini_group(self) -> int:
        return self.presence.foreground.mini_group

    def resolve(self) -> None:
        """Fetch the VGG-19 weights now, if not done yet.

        Called by the first forward; call it earlier to fail fast (:class:`WeightsUnavailableError`
        naming ``vgg_weights``) before a long run starts.
        """
        self.vgg.resolve()

    def map_terms(
        self, similarity: torch.Tensor, local_features: torch.Tensor, descriptors: torch.Tensor,
        gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> dict[str, Any]:
        """The terms that need only the part map: some fifty small kernels, compiled by :meth:`compile_regions`."""
        return {
            "distribution": self.distribution(similarity),
            "presence": self.presence(similarity, gather),
            "semantic": self.semantic(similarity, local_features, descriptors),
        }

    def forward(
        self, output: MPAEOutput, gather: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> dict[str, torch.Tensor]:
        """Every term (unweighted, with the parts a term reports) and the weighted ``total``.

        Args:
            output: the model's forward on a batch.
            gather: under DDP, :func:`~mpae_lightning.losses.gather.gather_with_grad`, so that the
                presence loss's mini-groups are cut from the global batch (training only: every
                process must call it the same number of times). Every other term is a mean over
                the process's images, which DDP's gradient average turns into the global mean.
        """
        self.resolve()  # an offline failure comes before the forward's work, with one clear line
        # A collective inside a compiled region would break its graph: gathering runs the eager terms.
        map_terms = self._compiled_map_terms if gather is None and self._compiled_map_terms else self.map_terms
        values = {
            "restoration": self.restoration(output.restored, output.target),
            **map_terms(output.similarity, output.local_features, output.descriptors,
                        **({"gather": gather} if gather is not None else {})),
        }
        losses: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for term in LOSS_TERMS:
            value = values[term.name]
            if isinstance(value, dict):  # the term with its parts
                losses.update(value)
                value = value[term.name]
            else:
                losses[term.name] = value
            weighted = value if term.weight is None else getattr(self, term.weight) * value
            total = weighted if total is None else total + weighted
        losses["total"] = total  # type: ignore[assignment]
        return losses

    def compile_regions(self, **options: Any) -> None:
        """``torch.compile`` the part-map terms (:meth:`map_terms`) in place; a second call does nothing.

        Args:
            options: ``torch.compile`` keyword arguments (default ``dynamic=False``).
        """
        if self._compiled_map_terms is None:
            self._compiled_map_terms = torch.compile(self.map_terms, **{"dynamic": False, **options})
