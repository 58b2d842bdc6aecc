"""Backend choice for the OrthoReg penalty. Each backend is a registered op with its own
autograd formula; this module picks one and calls it."""
from __future__ import annotations

import torch
from torch import Tensor

from .orthoreg_torch import ortho_penalty_torch

BACKENDS = ("auto", "triton", "cuda", "torch")


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "torch"
    if backend in ("triton", "cuda"):
        raise ValueError(
            f"backend={backend!r} is not available in this build of fastortho (only the 'torch' "
            f"backend is implemented so far); use backend='auto' or 'torch'")
    return backend


def ortho_penalty(weights: list[Tensor], bases: list[Tensor], *, squared: bool, precision: str,
                  backend: str) -> Tensor:
    """Per-layer penalties (fp32 ``[L]``), differentiable w.r.t. ``weights``."""
    chosen = resolve_backend(backend, weights[0].device)
    need_grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
    values, _ = ortho_penalty_torch(weights, bases, squared, precision, need_grad)
    return values
