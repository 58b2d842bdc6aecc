"""The OrthoReg penalty op: ``P = sum_l ||G_l - I||_F^2`` with its analytic gradient
(docs/design.md section 1): its backend registry and its plan.

A :class:`PenaltyPlan` is made once per caller (``fastortho.OrthoReg`` keeps one per precision
mode; ``ortho_loss`` one per model) from the layers' shapes, dtypes and sharding: which backend
(and variant) runs which layers, and the one permutation back to layer order. A warm call
checks the plan against a signature of the tensors (made in C: no Python call per layer) and
runs it; nothing is regrouped, no key is built per layer, no file is read.

Which file holds what (read top-down):

- ``__init__.py``       the registry (``ORTHOREG``: torch, triton, cuda with its Gram
                        variants), :func:`build_plan` and :class:`PenaltyPlan`
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
                        with its autograd Function; its Gram forms are the backend's variants
- ``autotune.py``       the measured per-shape-group choice among the registry's choices,
                        cached on disk
- ``sharded.py``        FSDP2 / DTensor weights: partial Grams and one all-reduce

The reference every backend is tested against is ``fastortho/reference.py``
(``ortho_penalty``, ``layer_penalty_grad``); the tests are ``tests/test_orthoreg.py`` and
``tests/test_orthoreg_triton.py`` (backend), ``tests/test_orthoreg_kernels.py`` (kernels),
``tests/test_grad_into.py``, ``tests/test_dispatch.py`` (registry, plan, host cost); the
benchmarks ``bench/test_bench_orthoreg.py`` and ``bench/test_bench_host.py``.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from ..._checks import check_bool
from ..._config import CUDA_GRAMS, autotune_enabled, forced_cuda_gram
from .._common import autocast_off, contiguous, needs_grad, triton_available
from ..registry import Backend, Choice, Registry

__all__ = [
    "CUDA_CANDIDATES",
    "ORTHOREG",
    "PenaltyPlan",
    "build_plan",
    "combine",
    "cuda_candidates",
    "ortho_penalty",
    "plan_for",
]


# ----------------------------------------------------------------------------- registry

def _load_torch():
    from .torch_backend import torch_penalty
    return torch_penalty


def _load_triton():
    from .triton_backend import triton_penalty
    return triton_penalty


def _load_cuda():
    from .cuda_backend import cuda_penalty
    return cuda_penalty


def _triton_missing(device) -> str | None:
    return None if triton_available() else "needs triton, which is not installed"


def _cuda_extension_missing(device) -> str | None:
    from .. import cuda_ext

    return None if cuda_ext.load() else f"needs the CUDA extension, not available here ({cuda_ext.error()})"


def _auto(device: torch.device) -> str:
    return "triton" if device.type == "cuda" and triton_available() else "torch"


ORTHOREG = Registry("OrthoReg penalty", _auto)
ORTHOREG.register(Backend("torch", _load_torch, grad_into=True))
ORTHOREG.register(Backend("triton", _load_triton, devices=("cuda", "interpreter"), grad_into=True,
                          dtypes=(torch.float32, torch.float16, torch.bfloat16), unavailable=_triton_missing))
ORTHOREG.register(Backend("cuda", _load_cuda, devices=("cuda",), variants=CUDA_GRAMS, compiles=False,
                          grad_into=True, dtypes=(torch.float32, torch.float16, torch.bfloat16),
                          unavailable=_cuda_extension_missing))

# Backends whose one launch (or C++ call) takes one weight dtype and one base dtype.
_ONE_DTYPE_PAIR = ("triton", "cuda")


def _cuda_variants(backend: Backend) -> tuple[str, ...]:
    """The CUDA extension's Gram forms to measure: all, or the one ``FASTORTHO_CUDA_GRAM`` forces."""
    if backend.name != "cuda":
        return backend.variants
    gram = forced_cuda_gram()
    return backend.variants if gram is None else (gram,)


# The cache labels of the CUDA extension's choices (for tests and the cache's keys).
CUDA_CANDIDATES = tuple(f"cuda:{g}" for g in CUDA_GRAMS)


def cuda_candidates() -> tuple[str, ...]:
    """The labels of the CUDA choices to measure: all, or the one ``FASTORTHO_CUDA_GRAM`` forces."""
    return tuple(f"cuda:{g}" for g in _cuda_variants(ORTHOREG["cuda"]))


# ----------------------------------------------------------------------------- layer order

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
    if len(parts) == 1 and list(parts[0][0]) == list(range(n)):
        return parts[0][1]
    order = [i for idx, _ in parts for i in idx]
    if sorted(order) != list(range(n)):
        raise ValueError(f"combine: the parts must cover layers 0..{n - 1} once each, got {sorted(order)}")
    values = torch.cat([v for _, v in parts])
    return values[_inverse(order, values.device)]


# ----------------------------------------------------------------------------- the plan

_DTYPE, _SHAPE = operator.attrgetter("dtype"), operator.attrgetter("shape")


def signature(weights: list[Tensor], bases: list[Tensor]) -> tuple:
    """What a plan depends on: the tensors' types, shapes and dtypes and the device. Made by
    ``map`` over C getters, so its cost per layer is no Python call."""
    return (tuple(map(type, weights)), tuple(map(_SHAPE, weights)), tuple(map(_DTYPE, weights)),
            tuple(map(_DTYPE, bases)), weights[0].device)


class PenaltyPlan:
    """Which implementation computes which layers, and the permutation back to layer order.

    Calling it runs the penalty: ``plan(weights, bases, squared, precision)`` returns the
    per-layer values (fp32 ``[L]``, differentiable), with autocast off. ``parts`` holds
    ``(run, layers, contiguous)`` per part; one part covering every layer in order is run
    without any split or rejoin.
    """

    def __init__(self, parts: list[tuple], n: int, device: torch.device, choices: tuple[str, ...] = ()):
        self.parts = parts
        self.n = n
        self.choices = choices  # the choice tag of each part (what ran where), for reports and tests
        self.whole = parts[0] if len(parts) == 1 and parts[0][1] is None else None
        self.order = [i for _, layers, _ in parts for i in (layers or range(n))]
        self.to_layers = None
        if self.whole is None and not torch.compiler.is_compiling():
            self.to_layers = _inverse(self.order, device)

    def __call__(self, weights: list[Tensor], bases: list[Tensor], squared: bool, precision: str) -> Tensor:
        need_grad = needs_grad(weights)
        with autocast_off():
            if self.whole is not None:
                run, _, contig = self.whole
                if contig:
                    weights, bases = contiguous(weights), contiguous(bases)
                return run(weights, bases, squared, precision, need_grad)
            values = []
            for run, layers, contig in self.parts:
                ws, bs = [weights[i] for i in layers], [bases[i] for i in layers]
                if contig:
                    ws, bs = contiguous(ws), contiguous(bs)
                values.append(run(ws, bs, squared, precision, need_grad))
            to_layers = self.to_layers if self.to_layers is not None else _inverse(self.order, values[0].device)
            return torch.cat(values)[to_layers]


def _candidates(backend: str, chosen: Backend, device: torch.device) -> tuple[Choice, ...]:
    """The choices a plan may take for ``backend``: with ``"auto"`` on CUDA torch, Triton and the
    CUDA extension's Gram forms (measured), with ``"cuda"`` its forms, else the one backend."""
    if chosen.name == "cuda":
        return tuple(Choice(chosen, v) for v in _cuda_variants(chosen))
    if backend == "auto" and chosen.name == "triton":
        return ORTHOREG.choices(device, _cuda_variants)
    return (Choice(chosen, chosen.variants[0]),)


def _measured_tags(weights, bases, squared, precision, candidates: tuple[Choice, ...]) -> list[str]:
    """Per layer the tag of the fastest agreeing candidate for its shape group (autotune.py)."""
    from .autotune import choose

    by_tag = {c.tag: c for c in candidates}

    def run(tag, ws, bs):
        return by_tag[tag].run(contiguous(ws), contiguous(bs), squared, precision, True)

    return choose(weights, bases, squared, precision, run, tuple(by_tag))


def build_plan(weights: list[Tensor], bases: list[Tensor], backend: str, precision: str, squared: bool
               ) -> PenaltyPlan:
    """The plan for these layers (see :class:`PenaltyPlan`); measures on CUDA when ``backend``
    offers a choice (once per shape group, cached on disk)."""
    if any(type(w).__name__ == "DTensor" for w in weights):
        return _dtensor_plan(weights, backend, precision, squared)
    device = weights[0].device
    if any(w.device != device for w in weights):
        raise ValueError(f"model: the regularized parameters must share one device, got "
                         f"{sorted({str(w.device) for w in weights})}")
    compiling = torch.compiler.is_compiling()
    chosen = ORTHOREG.resolve(backend, device)
    if compiling and not chosen.compiles:
        raise ValueError(f"backend={backend!r}: its op cannot be traced by torch.compile; use backend='triton' "
                         f"or 'torch' inside a compiled step")
    candidates = _candidates(backend, chosen, device)
    n = len(weights)
    if len(candidates) > 1 and not compiling and autotune_enabled():
        tags = _measured_tags(weights, bases, squared, precision, candidates)
    else:
        tags = [candidates[0].tag] * n
    by_tag = {c.tag: c for c in candidates}
    groups: dict[tuple, list[int]] = {}
    for i, tag in enumerate(tags):
        split = by_tag[tag].backend.name in _ONE_DTYPE_PAIR
        groups.setdefault((tag, weights[i].dtype, bases[i].dtype) if split else (tag,), []).append(i)
    parts, labels = [], []
    for key, layers in groups.items():
        choice = by_tag[key[0]]
        whole = len(groups) == 1
        parts.append((choice.run, None if whole else tuple(layers), choice.backend.name in _ONE_DTYPE_PAIR))
        labels.append(choice.tag)
    return PenaltyPlan(parts, n, device, tuple(labels))


class _LocalPlan:
    """Replicated DTensor weights: their local tensors through an ordinary plan."""

    def __init__(self, backend: str, precision: str, squared: bool):
        self.key = (backend, precision, squared)
        self.plans: dict = {}

    def __call__(self, weights, bases, squared, precision, need_grad):
        ws = [w.to_local() if hasattr(w, "to_local") else w for w in weights]
        bs = [b.to_local() if hasattr(b, "to_local") else b for b in bases]
        return plan_for(ws, bs, self.key[0], precision, squared, self.plans)(ws, bs, squared, precision)


def _sharded(weights, bases, squared, precision, need_grad):
    from .sharded import sharded_ortho_penalty

    return sharded_ortho_penalty(weights, bases, squared=squared, precision=precision)


def _dtensor_plan(weights, backend, precision, squared) -> PenaltyPlan:
    """Weights that are DTensors (FSDP2 / tensor parallel): sharded ones by partial Grams and
    one all-reduce (sharded.py), replicated ones as their local full tensors."""
    from .sharded import is_dtensor, shard_dim

    sharded, plain = [], []
    for i, w in enumerate(weights):
        (sharded if is_dtensor(w) and shard_dim(w) is not None else plain).append(i)
    parts, labels = [], []
    if sharded:
        parts.append((_sharded, tuple(sharded), False))
        labels.append("sharded")
    if plain:
        parts.append((_LocalPlan(backend, precision, squared), tuple(plain), False))
        labels.append("local")
    if len(parts) == 1:
        parts[0] = (parts[0][0], None, False)
    return PenaltyPlan(parts, len(weights), weights[0].device, tuple(labels))


def plan_for(weights: list[Tensor], bases: list[Tensor], backend: str, precision: str, squared: bool,
             plans: dict) -> PenaltyPlan:
    """The plan kept in ``plans`` (the caller's dict) for these options, rebuilt when the
    tensors' signature changed; under torch.compile built at trace time and not kept."""
    if torch.compiler.is_compiling():
        return build_plan(weights, bases, backend, precision, squared)
    key = (backend, precision, squared)
    held = plans.get(key)
    sig = signature(weights, bases)
    if held is None or held[0] != sig:
        if len(plans) >= 8:  # a few precision modes per caller; bound it anyway
            plans.clear()
        held = plans[key] = (sig, build_plan(weights, bases, backend, precision, squared))
    return held[1]


# Plans of the functional ortho_penalty (callers without a place of their own).
_PLANS: dict = {}


def ortho_penalty(weights: list[Tensor], bases: list[Tensor], *, squared: bool, precision: str,
                  backend: str) -> Tensor:
    """Per-layer penalties (fp32 ``[L]``), differentiable w.r.t. ``weights``, computed with
    autocast off (``precision`` says the operand format). Keeps its plans in a module cache;
    ``fastortho.OrthoReg`` and ``ortho_loss`` keep their own."""
    check_bool("squared", squared)
    return plan_for(weights, bases, backend, precision, squared, _PLANS)(weights, bases, squared, precision)
