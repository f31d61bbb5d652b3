"""Pure-PyTorch MPAE: importable without Lightning."""
from .backbone import DEFAULT_BACKBONE, FrozenBackbone
from .descriptor_vit import DescriptorViT
from .mpae import MPAE, MPAEOutput, PartEncoding
from .official_checkpoint import (
    convert_official_state_dict,
    is_official_state_dict,
    load_official_checkpoint,
    load_official_state_dict,
    official_config,
)
from .restorer import MaskedRestorer
from .weights import WeightsUnavailableError

__all__ = [
    "DEFAULT_BACKBONE",
    "DescriptorViT",
    "FrozenBackbone",
    "MPAE",
    "MPAEOutput",
    "MaskedRestorer",
    "PartEncoding",
    "WeightsUnavailableError",
    "convert_official_state_dict",
    "is_official_state_dict",
    "load_official_checkpoint",
    "load_official_state_dict",
    "official_config",
]
