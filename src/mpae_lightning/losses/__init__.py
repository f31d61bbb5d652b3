"""MPAE's loss terms, one module each (formulas in docs/method.md §3)."""
from .distribution import EntropyLoss, TotalVariationLoss
from .presence import BackgroundPresenceLoss, MiniGroupPresenceLoss
from .restoration import RestorationLoss
from .semantic import ArcFaceSemanticLoss

__all__ = [
    "ArcFaceSemanticLoss",
    "BackgroundPresenceLoss",
    "EntropyLoss",
    "MiniGroupPresenceLoss",
    "RestorationLoss",
    "TotalVariationLoss",
]
