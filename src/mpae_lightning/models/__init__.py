"""Pure-PyTorch MPAE: importable without Lightning."""
from .backbone import DEFAULT_BACKBONE, FrozenBackbone
from .descriptor_vit import DescriptorViT
from .frozen import PackedFrozenLinear
from .mpae import LOSS_TERMS, MPAE, LossTerm, MPAEOutput, PartEncoding
from .official_checkpoint import (
    convert_official_state_dict,
    is_official_state_dict,
    load_official_checkpoint,
    load_official_state_dict,
    official_config,
)
from .restorer import MaskedRestorer
from .vgg import VGGFeatures
from .weights import WeightsUnavailableError

__all__ = [
    "DEFAULT_BACKBONE",
    "DescriptorViT",
    "FrozenBackbone",
    "LOSS_TERMS",
    "LossTerm",
    "MPAE",
    "MPAEOutput",
    "MaskedRestorer",
    "PackedFrozenLinear",
    "PartEncoding",
    "VGGFeatures",
    "WeightsUnavailableError",
    "convert_official_state_dict",
    "is_official_state_dict",
    "load_official_checkpoint",
    "load_official_state_dict",
    "official_config",
]
