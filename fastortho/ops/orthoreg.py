"""Backend choice for the OrthoReg penalty. Each backend is a registered op with its own
autograd formula; this module picks one and calls it."""
from __future__ import annotations


import torch
from torch import Tensor

from ..kernels import interpreting
from .orthoreg_torch import TorchPenalty, ortho_gram_torch

BACKENDS = ("auto", "triton", "cuda", "torch")


_triton_available: bool | None = None


def triton_available() -> bool:
    """Whether triton imports (probed once, on first use, never at import of fastortho).
    A module flag rather than functools.lru_cache, which torch.compile warns about."""
    global _triton_available
    if _triton_available is None:
        try:
            import triton  # noqa: F401
            _triton_available = True
        except ImportError:
            _triton_available = False
    return _triton_available


def resolve_backend(backend: str, device: torch.device) -> str:
    """The backend that will run: "auto" is Triton on CUDA (when triton imports), else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton': triton is not installed; use backend='torch'")
        if device.type != "cuda" and not interpreting():
            raise ValueError(f"backend='triton' needs CUDA tensors (the weights are on {device}); on "
                             f"CPU it runs only under the Triton interpreter (set TRITON_INTERPRET=1 "
                             f"before triton is imported), or use backend='torch'")
    if backend == "cuda":
        raise ValueError("backend='cuda': the CUDA C++ extension (csrc/) is not part of this build "
                         "yet; use backend='auto', 'triton' or 'torch'")
    return backend


def _triton_call(weights: list[Tensor], bases: list[Tensor], squared: bool, precision: str) -> Tensor:
    from .orthoreg_triton import TritonPenalty, ortho_gram_triton

    if torch.compiler.is_compiling():
        return ortho_gram_triton(weights, bases, squared, precision)[0]
    return TritonPenalty.apply(squared, precision, len(weights), *weights, *bases)


def _triton_penalty(weights: list[Tensor], bases: list[Tensor], squared: bool, precision: str) -> Tensor:

    weights = [w if w.is_contiguous() else w.contiguous() for w in weights]
    bases = [b if b.is_contiguous() else b.contiguous() for b in bases]
    # One launch takes one weight dtype and one base dtype; mixed models get one per pair.
    kinds: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (w, b) in enumerate(zip(weights, bases)):
        kinds.setdefault((w.dtype, b.dtype), []).append(i)
    if len(kinds) == 1:
        return _triton_call(weights, bases, squared, precision)
    parts, order = [], []
    for idx in kinds.values():
        parts.append(_triton_call([weights[i] for i in idx], [bases[i] for i in idx], squared, precision))
        order += idx
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return torch.cat(parts)[inverse.to(weights[0].device)]


def _with_dtensors(weights, bases, squared, precision, backend) -> Tensor:
    """Weights that are DTensors (FSDP2 / tensor parallel): sharded ones by partial Grams and
    one all-reduce (fastortho.distributed), replicated ones as their local full tensors."""
    from ..distributed import is_dtensor, shard_dim, sharded_ortho_penalty

    sharded, plain = [], []
    for i, w in enumerate(weights):
        (sharded if is_dtensor(w) and shard_dim(w) is not None else plain).append(i)
    parts, order = [], []
    if sharded:
        parts.append(sharded_ortho_penalty([weights[i] for i in sharded], [bases[i] for i in sharded],
                                           squared=squared, precision=precision))
        order += sharded
    if plain:
        ws = [weights[i].to_local() if hasattr(weights[i], "to_local") else weights[i] for i in plain]
        bs = [bases[i].to_local() if hasattr(bases[i], "to_local") else bases[i] for i in plain]
        parts.append(ortho_penalty(ws, bs, squared=squared, precision=precision, backend=backend))
        order += plain
    values = torch.cat(parts)
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return values[inverse.to(values.device)]


def ortho_penalty(weights: list[Tensor], bases: list[Tensor], *, squared: bool, precision: str,
                  backend: str) -> Tensor:
    """Per-layer penalties (fp32 ``[L]``), differentiable w.r.t. ``weights``."""
    if any(type(w).__name__ == "DTensor" for w in weights):
        return _with_dtensors(weights, bases, squared, precision, backend)
    device = weights[0].device
    if any(w.device != device for w in weights):
        raise ValueError(f"model: the regularized parameters must share one device, got "
                         f"{sorted({str(w.device) for w in weights})}")
    chosen = resolve_backend(backend, device)
    if chosen == "triton":
        return _triton_penalty(weights, bases, squared, precision)
    if torch.compiler.is_compiling():
        need_grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
        return ortho_gram_torch(weights, bases, squared, precision, need_grad)[0]
    # Eager: an autograd.Function over the same implementation, without the custom-op
    # dispatch cost (milliseconds per call for a ViT's 100 list arguments).
    return TorchPenalty.apply(squared, precision, len(weights), *weights, *bases)
