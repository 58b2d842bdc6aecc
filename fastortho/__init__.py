"""fastortho: fused kernels for weight-disentanglement regularizers in task arithmetic."""
from .layers import select_parameters
from .orthoreg import OrthoReg, ortho_loss
from .snapshot import Snapshot, snapshot

__version__ = "0.1.0"
__all__ = ["OrthoReg", "Snapshot", "ortho_loss", "select_parameters", "snapshot", "__version__"]
