"""What a run reports as its memory: peak CUDA memory on a GPU, the activation bytes one step
saves for backward on a CPU (a proxy)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def memory_probe(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0, "peak CUDA memory allocated"
    return None, "activation bytes saved for backward (CPU proxy)"


def autocast(cfg, device: torch.device):
    """bf16 autocast as the configuration asks ("auto": on CUDA only)."""
    enabled = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def activation_bytes(model, head, x, y, cfg, device) -> int:
    from ..testing import saved_activation_bytes

    statics = list(model.parameters()) + list(model.buffers())
    encoder = model.encoder.module if isinstance(model.encoder, nn.parallel.DistributedDataParallel) else model.encoder

    def loss():
        with autocast(cfg, device):
            return F.cross_entropy(head(encoder(x)).float(), y)
    return saved_activation_bytes(loss, statics)
