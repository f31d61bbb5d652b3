"""mpae-lightning: Masked Part AutoEncoder (ICCV 2025) for unsupervised part discovery."""
from .models import MPAE, load_official_checkpoint

__version__ = "0.1.0"
__all__ = ["MPAE", "load_official_checkpoint"]
