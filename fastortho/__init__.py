"""fastortho: fused kernels for weight-disentanglement regularizers in task arithmetic."""
from . import analysis, merge  # (plots import matplotlib only when drawn)
from ._config import set_exchange, set_kernels
from ._files import RunLockedError
from ._version import __version__
from .layers import select_parameters
from .linearize import LinearizedModel, linearize
from .lora import LoRAAdapter, TrainableReport, add_lora, attention_only, lora_adapters, lora_delta_weights, merge_lora
from .merge import merge_tasks, merge_vectors, task_addition
from .orthoreg import OrthoReg, ortho_loss
from .snapshot import Snapshot, snapshot
from .task_vectors import AdditionResult, NegationResult, TaskVector, cosine_matrix, task_negation
from .taujp import TauJpRegularizer, taujp_loss, taujp_matrix

__all__ = [
    "AdditionResult",
    "NegationResult",
    "RunLockedError",
    "TaskVector",
    "analysis",
    "cosine_matrix",
    "task_addition",
    "task_negation",
    "LinearizedModel",
    "LoRAAdapter",
    "OrthoReg",
    "TauJpRegularizer",
    "linearize",
    "taujp_loss",
    "taujp_matrix",
    "Snapshot",
    "TrainableReport",
    "add_lora",
    "attention_only",
    "lora_adapters",
    "lora_delta_weights",
    "merge",
    "merge_lora",
    "merge_tasks",
    "merge_vectors",
    "ortho_loss",
    "select_parameters",
    "set_exchange",
    "set_kernels",
    "snapshot",
    "__version__",
]
