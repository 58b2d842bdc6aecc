"""Backend choice for the OrthoReg penalty. Each backend is a registered op with its own
autograd formula; this module picks one and calls it."""
from __future__ import annotations

import os

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
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors (the weights are on {device}); use "
                             f"backend='auto' or 'torch'")
        from . import cuda_ext

        if not cuda_ext.load():
            raise ValueError(f"backend='cuda': the CUDA extension is not available here ({cuda_ext.error()}); "
                             f"use backend='triton' or 'torch'")
    return backend


_inverse_cache: dict[tuple, Tensor] = {}


def _inverse(order: list[int], device: torch.device) -> Tensor:
    """The permutation that puts values computed in ``order`` back in layer order, on the
    values' device; cached in eager mode (the split is the same every step), so a training
    step pays no host-to-device copy for it."""
    key = (tuple(order), device)
    cached = None if torch.compiler.is_compiling() else _inverse_cache.get(key)
    if cached is None:
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.tensor(order)] = torch.arange(len(order))
        cached = inverse.to(device)
        if not torch.compiler.is_compiling():
            if len(_inverse_cache) > 64:  # a handful of layer splits per process; bound it anyway
                _inverse_cache.clear()
            _inverse_cache[key] = cached
    return cached


def combine(parts: list[tuple[list[int], Tensor]], n: int) -> Tensor:
    """Per-layer values computed in parts (``(layer indices, values)``) back in layer order."""
    if len(parts) == 1 and parts[0][0] == list(range(n)):
        return parts[0][1]
    order = [i for idx, _ in parts for i in idx]
    if sorted(order) != list(range(n)):
        raise ValueError(f"combine: the parts must cover layers 0..{n - 1} once each, got {sorted(order)}")
    values = torch.cat([v for _, v in parts])
    return values[_inverse(order, values.device)]


def by_dtypes(weights: list[Tensor], bases: list[Tensor], call) -> Tensor:
    """``call(weights, bases)`` once per (weight dtype, base dtype) pair: a kernel launch or a
    C++ call takes one of each."""
    kinds: dict[tuple[torch.dtype, torch.dtype], list[int]] = {}
    for i, (w, b) in enumerate(zip(weights, bases)):
        kinds.setdefault((w.dtype, b.dtype), []).append(i)
    return combine([(idx, call([weights[i] for i in idx], [bases[i] for i in idx])) for idx in kinds.values()],
                   len(weights))


def _triton_call(weights: list[Tensor], bases: list[Tensor], squared: bool, precision: str) -> Tensor:
    from .orthoreg_triton import TritonPenalty, ortho_gram_triton

    if torch.compiler.is_compiling():
        return ortho_gram_triton(weights, bases, squared, precision)[0]
    return TritonPenalty.apply(squared, precision, len(weights), *weights, *bases)


def _triton_penalty(weights: list[Tensor], bases: list[Tensor], squared: bool, precision: str) -> Tensor:
    weights = [w if w.is_contiguous() else w.contiguous() for w in weights]
    bases = [b if b.is_contiguous() else b.contiguous() for b in bases]
    return by_dtypes(weights, bases, lambda ws, bs: _triton_call(ws, bs, squared, precision))


def _cuda_penalty(weights, bases, squared, precision, gram) -> Tensor:
    from .orthoreg_cuda import cuda_penalty

    return by_dtypes(weights, bases, lambda ws, bs: cuda_penalty(ws, bs, squared, precision, gram))


# The CUDA extension's ways to form the Gram, as measured candidates ("cuda:<gram>").
CUDA_CANDIDATES = ("cuda:gemm", "cuda:triangle", "cuda:syrk")


def cuda_candidates() -> tuple[str, ...]:
    """The CUDA candidates to measure: all, or the one ``FASTORTHO_CUDA_GRAM`` forces."""
    gram = os.environ.get("FASTORTHO_CUDA_GRAM")
    if not gram:
        return CUDA_CANDIDATES
    if f"cuda:{gram}" not in CUDA_CANDIDATES:
        raise ValueError(f"FASTORTHO_CUDA_GRAM: expected one of {[c[5:] for c in CUDA_CANDIDATES]}, got {gram!r}")
    return (f"cuda:{gram}",)


def _run(backend: str, weights, bases, squared, precision) -> Tensor:
    """``backend``: "triton", "torch", or "cuda:<gram>" (see CUDA_CANDIDATES)."""
    if backend == "triton":
        return _triton_penalty(weights, bases, squared, precision)
    if backend.startswith("cuda"):
        return _cuda_penalty(weights, bases, squared, precision, backend.partition(":")[2] or "gemm")
    if torch.compiler.is_compiling():
        need_grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
        return ortho_gram_torch(weights, bases, squared, precision, need_grad)[0]
    # Eager: an autograd.Function over the same implementation, without the custom-op
    # dispatch cost (milliseconds per call for a ViT's 100 list arguments).
    return TorchPenalty.apply(squared, precision, len(weights), *weights, *bases)


def _measured(weights, bases, squared, precision, candidates: tuple[str, ...]) -> Tensor:
    """Per shape group the fastest of ``candidates`` (Triton and the CUDA extension's Gram
    variants for backend="auto", the variants alone for backend="cuda"), measured once and
    cached on disk (fastortho.ops.backend_choice)."""
    from . import cuda_ext
    from .backend_choice import choose

    if candidates[0] == "triton" and not cuda_ext.load():
        return _run("triton", weights, bases, squared, precision)
    if len(candidates) == 1:
        return _run(candidates[0], weights, bases, squared, precision)
    assign = choose(weights, bases, squared, precision, lambda b, ws, bs: _run(b, ws, bs, squared, precision),
                    candidates)
    parts = []
    for backend in sorted(set(assign)):
        idx = [i for i, b in enumerate(assign) if b == backend]
        parts.append((idx, _run(backend, [weights[i] for i in idx], [bases[i] for i in idx], squared, precision)))
    return combine(parts, len(weights))


def _with_dtensors(weights, bases, squared, precision, backend) -> Tensor:
    """Weights that are DTensors (FSDP2 / tensor parallel): sharded ones by partial Grams and
    one all-reduce (fastortho.distributed), replicated ones as their local full tensors."""
    from ..distributed import is_dtensor, shard_dim, sharded_ortho_penalty

    sharded, plain = [], []
    for i, w in enumerate(weights):
        (sharded if is_dtensor(w) and shard_dim(w) is not None else plain).append(i)
    parts, orders = [], []
    if sharded:
        parts.append(sharded_ortho_penalty([weights[i] for i in sharded], [bases[i] for i in sharded],
                                           squared=squared, precision=precision))
        orders.append(sharded)
    if plain:
        ws = [weights[i].to_local() if hasattr(weights[i], "to_local") else weights[i] for i in plain]
        bs = [bases[i].to_local() if hasattr(bases[i], "to_local") else bases[i] for i in plain]
        parts.append(ortho_penalty(ws, bs, squared=squared, precision=precision, backend=backend))
        orders.append(plain)
    return combine([(o, v) for o, v in zip(orders, parts)], len(weights))


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
    tune = not torch.compiler.is_compiling() and os.environ.get("FASTORTHO_AUTOTUNE", "1") != "0"
    if chosen == "cuda":
        candidates = cuda_candidates()
        if tune:
            return _measured(weights, bases, squared, precision, candidates)
        return _run(candidates[0], weights, bases, squared, precision)
    if backend == "auto" and chosen == "triton" and tune:
        return _measured(weights, bases, squared, precision, ("triton",) + cuda_candidates())
    return _run(chosen, weights, bases, squared, precision)
