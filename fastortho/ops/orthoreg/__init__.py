"""The OrthoReg penalty op: ``P = sum_l ||G_l - I||_F^2`` with its analytic gradient
(docs/design.md section 1), on three backends (torch, triton, cuda) and their measured
choice ("auto"). :func:`ortho_penalty` is the only entry the
public module (``fastortho/orthoreg.py``) calls; it validates nothing the public module has
already checked, picks a backend and returns the differentiable per-layer values.

Which file holds what (read top-down):

- ``__init__.py``       this dispatch: ``backend="auto" | "triton" | "cuda" | "torch"``, the
                        split by dtype and by backend, DTensor routing
- ``torch_backend.py``  batched PyTorch products by shape group: registered ops
                        ``fastortho::ortho_gram_torch`` / ``ortho_grad_torch``, fakes, and the
                        one autograd definition (``_setup_context`` / ``_backward``)
- ``triton_backend.py`` ``D`` written once per step into a 16-bit (bf16; tf32 mode: scaled
                        fp16) or fp32 scratch, the pipelined upper-triangle Gram
                        (``fastortho/kernels/orthoreg.py``) and the gradient on cuBLAS (tf32
                        mode: one Triton launch): ``fastortho::ortho_scratch_gram`` /
                        ``ortho_scratch_grad`` / ``ortho_scratch_grad_fp16``, fakes, one
                        autograd definition
- ``into_grad.py``      when a backward writes the gradient straight into ``.grad``
- ``cuda_backend.py``   the C++ extension's ``fastortho::ortho_penalty_grouped`` (``csrc/``)
                        with its autograd Function
- ``autotune.py``       the measured per-shape-group choice among torch, Triton and the CUDA
                        forms, cached on disk
- ``sharded.py``        FSDP2 / DTensor weights: partial Grams and one all-reduce

The reference every backend is tested against is ``fastortho/reference.py``
(``ortho_penalty``, ``layer_penalty_grad``); the tests are ``tests/test_orthoreg.py`` and
``tests/test_orthoreg_triton.py`` (backend), ``tests/test_orthoreg_kernels.py`` (kernels),
``tests/test_grad_into.py``; the benchmark ``bench/test_bench_orthoreg.py``. Eager calls
skip the custom-op dispatch (``fastortho.ops._common.ListOp``); under torch.compile the
registered ops run.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..._checks import check_bool
from ..._config import CUDA_GRAMS, autotune_enabled, forced_cuda_gram
from .._common import BACKENDS, autocast_off, contiguous, resolve_backend, triton_available
from .torch_backend import torch_penalty

__all__ = [
    "AUTO_CANDIDATES",
    "BACKENDS",
    "CUDA_CANDIDATES",
    "combine",
    "cuda_candidates",
    "ortho_penalty",
    "resolve_backend",
    "triton_available",
]


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


def _triton_penalty(weights: list[Tensor], bases: list[Tensor], squared: bool, precision: str) -> Tensor:
    from .triton_backend import triton_penalty

    return by_dtypes(contiguous(weights), contiguous(bases), lambda ws, bs: triton_penalty(ws, bs, squared, precision))


def _cuda_penalty(weights, bases, squared, precision, gram) -> Tensor:
    from .cuda_backend import cuda_penalty

    return by_dtypes(weights, bases, lambda ws, bs: cuda_penalty(ws, bs, squared, precision, gram))


# The measured candidates of backend="auto" besides the CUDA forms; the first is the reference
# every candidate must agree with.
AUTO_CANDIDATES = ("torch", "triton")
# The CUDA extension's ways to form the Gram, as measured candidates ("cuda:<gram>").
CUDA_CANDIDATES = tuple(f"cuda:{g}" for g in CUDA_GRAMS)


def cuda_candidates() -> tuple[str, ...]:
    """The CUDA candidates to measure: all, or the one ``FASTORTHO_CUDA_GRAM`` forces."""
    gram = forced_cuda_gram()
    return CUDA_CANDIDATES if gram is None else (f"cuda:{gram}",)


def _run(backend: str, weights, bases, squared, precision) -> Tensor:
    """``backend``: "triton", "torch", or "cuda:<gram>" (see CUDA_CANDIDATES)."""
    if backend == "triton":
        return _triton_penalty(weights, bases, squared, precision)
    if backend.startswith("cuda"):
        return _cuda_penalty(weights, bases, squared, precision, backend.partition(":")[2] or "gemm")
    need_grad = torch.is_grad_enabled() and any(w.requires_grad for w in weights)
    return torch_penalty(weights, bases, squared, precision, need_grad)


def _measured(weights, bases, squared, precision, candidates: tuple[str, ...]) -> Tensor:
    """Per shape group the fastest of ``candidates`` (torch, Triton and the CUDA extension's
    Gram variants for backend="auto", the variants alone for backend="cuda"), measured once
    and cached on disk (autotune.py)."""
    from .. import cuda_ext
    from .autotune import choose

    if any(c.startswith("cuda") for c in candidates) and not cuda_ext.load():
        candidates = tuple(c for c in candidates if not c.startswith("cuda")) or ("torch",)
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
    one all-reduce (sharded.py), replicated ones as their local full tensors."""
    from .sharded import is_dtensor, shard_dim, sharded_ortho_penalty

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
    """Per-layer penalties (fp32 ``[L]``), differentiable w.r.t. ``weights``, computed with
    autocast off (``precision`` says the operand format)."""
    check_bool("squared", squared)
    if any(type(w).__name__ == "DTensor" for w in weights):
        return _with_dtensors(weights, bases, squared, precision, backend)
    with autocast_off():
        return _ortho_penalty(weights, bases, squared, precision, backend)


def _ortho_penalty(weights, bases, squared, precision, backend) -> Tensor:
    device = weights[0].device
    if any(w.device != device for w in weights):
        raise ValueError(f"model: the regularized parameters must share one device, got "
                         f"{sorted({str(w.device) for w in weights})}")
    chosen = resolve_backend(backend, device)
    tune = not torch.compiler.is_compiling() and autotune_enabled()
    if chosen == "cuda":
        candidates = cuda_candidates()
        if tune:
            return _measured(weights, bases, squared, precision, candidates)
        return _run(candidates[0], weights, bases, squared, precision)
    if backend == "auto" and chosen == "triton" and tune:
        return _measured(weights, bases, squared, precision, AUTO_CANDIDATES + cuda_candidates())
    return _run(chosen, weights, bases, squared, precision)
