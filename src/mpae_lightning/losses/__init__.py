"""MPAE's loss terms, one module each (formulas in docs/method.md §3)."""
from .distribution import DistributionLoss, EntropyLoss, TotalVariationLoss
from .presence import BackgroundPresenceLoss, MiniGroupPresenceLoss, PresenceLoss
from .restoration import RestorationLoss
from .semantic import ArcFaceSemanticLoss

__all__ = [
    "ArcFaceSemanticLoss",
    "BackgroundPresenceLoss",
    "DistributionLoss",
    "EntropyLoss",
    "MiniGroupPresenceLoss",
    "PresenceLoss",
    "RestorationLoss",
    "TotalVariationLoss",
]
