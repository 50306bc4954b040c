"""acf_fast: Attentive Collaborative Filtering (VisRec tutorial) with fused kernels."""

from .model.acf import ACF
from .model.losses import bpr_loss, sigmoid_loss, warp_loss

__version__ = "0.1.0"
__all__ = ["ACF", "bpr_loss", "sigmoid_loss", "warp_loss", "__version__"]
