"""mpae-lightning: Masked Part AutoEncoder (ICCV 2025) for unsupervised part discovery."""
from .data import (
    CelebADataModule,
    CUBDataModule,
    ImageFolderDataModule,
    MiniGroupBatchSampler,
    PartImageNetDataModule,
    SyntheticPartsDataModule,
)
from .lightning_module import MPAEModule
from .metrics import KeypointPartMetrics, MaskPartMetrics, PartARI, PartNMI
from .models import MPAE, load_official_checkpoint

__version__ = "0.1.0"  # the only place the version is written; setup.cfg reads it
__all__ = [
    "CUBDataModule",
    "CelebADataModule",
    "ImageFolderDataModule",
    "KeypointPartMetrics",
    "MPAE",
    "MPAEModule",
    "MaskPartMetrics",
    "MiniGroupBatchSampler",
    "PartARI",
    "PartImageNetDataModule",
    "PartNMI",
    "SyntheticPartsDataModule",
    "load_official_checkpoint",
]
