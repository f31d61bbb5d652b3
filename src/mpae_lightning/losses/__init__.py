"""MPAE's training objective (:class:`MPAELoss`) and its terms, one module each (formulas in docs/method.md §3)."""
from .distribution import DistributionLoss, EntropyLoss, TotalVariationLoss
from .presence import BackgroundPresenceLoss, MiniGroupPresenceLoss, PresenceLoss
from .restoration import RestorationLoss
from .objective import LOSS_TERMS, LossTerm, MPAELoss
from .semantic import ArcFaceSemanticLoss
from .vgg import VGGFeatures

__all__ = [
    "LOSS_TERMS",
    "LossTerm",
    "MPAELoss",
    "VGGFeatures",
    "ArcFaceSemanticLoss",
    "BackgroundPresenceLoss",
    "DistributionLoss",
    "EntropyLoss",
    "MiniGroupPresenceLoss",
    "PresenceLoss",
    "RestorationLoss",
    "TotalVariationLoss",
]
