"""mpae-lightning: Masked Part AutoEncoder (ICCV 2025) for unsupervised part discovery.

The public names below are imported on first use (PEP 562), so that ``import
mpae_lightning.models`` (pure PyTorch) does not pull in Lightning and the data modules, and
``mpae --version`` answers without importing PyTorch at all.
"""
import importlib as _importlib
import typing as _typing

__version__ = "0.2.0"  # the only place the version is written; setup.cfg reads it

if _typing.TYPE_CHECKING:  # what type checkers and IDEs see; at run time __getattr__ imports these
    from .data import (
        CelebADataModule,
        CUBDataModule,
        Flowers102DataModule,
        ImageFolderDataModule,
        MiniGroupBatchSampler,
        PartImageNetDataModule,
        SyntheticPartsDataModule,
    )
    from .inference import PartMaps, predict_images
    from .lightning_module import MPAEModule
    from .losses import MPAELoss
    from .metrics import KeypointPartMetrics, MaskPartMetrics, PartARI, PartNMI
    from .models import MPAE, load_official_checkpoint

#: Public name -> the submodule that defines it (imported when the name is first read).
_EXPORTS = {
    "CUBDataModule": ".data",
    "CelebADataModule": ".data",
    "Flowers102DataModule": ".data",
    "ImageFolderDataModule": ".data",
    "MiniGroupBatchSampler": ".data",
    "PartImageNetDataModule": ".data",
    "SyntheticPartsDataModule": ".data",
    "MPAEModule": ".lightning_module",
    "PartMaps": ".inference",
    "predict_images": ".inference",
    "MPAELoss": ".losses",
    "KeypointPartMetrics": ".metrics",
    "MaskPartMetrics": ".metrics",
    "PartARI": ".metrics",
    "PartNMI": ".metrics",
    "MPAE": ".models",
    "load_official_checkpoint": ".models",
}

#: Subpackages reachable as attributes after a bare ``import mpae_lightning``, as when this file
#: imported them eagerly (e.g. ``mpae_lightning.data.PartDataModule``).
_SUBMODULES = ("data", "losses", "metrics", "models", "lightning_module")

__all__ = [
    "CUBDataModule",
    "CelebADataModule",
    "Flowers102DataModule",
    "ImageFolderDataModule",
    "KeypointPartMetrics",
    "MPAE",
    "MPAELoss",
    "MPAEModule",
    "MaskPartMetrics",
    "MiniGroupBatchSampler",
    "PartARI",
    "PartImageNetDataModule",
    "PartMaps",
    "PartNMI",
    "SyntheticPartsDataModule",
    "load_official_checkpoint",
    "predict_images",
]


def __getattr__(name: str) -> _typing.Any:
    """Import a public name's submodule on first access and cache the name here."""
    if name in _EXPORTS:
        value = getattr(_importlib.import_module(_EXPORTS[name], __name__), name)
    elif name in _SUBMODULES:
        value = _importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    """The public names too, though not imported yet (for completion and ``help()``)."""
    return sorted(set(globals()) | set(__all__) | set(_SUBMODULES))
