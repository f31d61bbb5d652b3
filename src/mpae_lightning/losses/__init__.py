"""MPAE's loss terms, one module each (see MPAE_SPEC.md section 2)."""
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
