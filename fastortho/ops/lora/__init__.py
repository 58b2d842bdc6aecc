"""The exact low-rank OrthoReg penalty of LoRA adapters (``D = s B A`` never formed;
docs/design.md section 1), on two backends; :func:`lora_ortho_penalty` is the only entry the
public module (``fastortho/orthoreg.py``) calls, with a plan the caller keeps (as for the dense
penalty). ``backend="auto"`` is Triton on CUDA, torch elsewhere; the CUDA extension has no LoRA
op, so ``LORA`` registers no "cuda" backend.

Which file holds what:

- ``__init__.py``       the registry (``LORA``) and :class:`LoRAPlan`
- ``torch_backend.py``  batched ``r x r`` products by adapter shape: registered ops
                        ``fastortho::lora_ortho_torch`` / ``lora_grad_torch``, fakes, the one
                        autograd definition
- ``triton_backend.py`` registered ops ``fastortho::lora_ortho_triton`` / ``lora_grad_triton``
                        around ``fastortho/kernels/lora_orthoreg.py`` (every adapter in one
                        launch), fakes, the one autograd definition

Reference: ``fastortho/reference.py`` (``lora_layer_penalty``, ``lora_layer_penalty_grads``,
``released_lora_ortho_loss``); tests ``tests/test_lora.py``; benchmark ``bench/test_bench_lora.py``.
"""
from __future__ import annotations

import operator

import torch
from torch import Tensor

from ..._checks import check_bool
from .._common import autocast_off, contiguous, needs_grad, triton_available
from ..registry import Backend, Registry

__all__ = ["LORA", "LoRAPlan", "build_lora_plan", "lora_ortho_penalty", "lora_plan_for"]


def _load_torch():
    from .torch_backend import torch_lora_penalty
    return torch_lora_penalty


def _load_triton():
    from .triton_backend import triton_lora_penalty
    return triton_lora_penalty


def _triton_missing(device) -> str | None:
    return None if triton_available() else "needs triton, which is not installed"


LORA = Registry("LoRA penalty", lambda device: "triton" if device.type == "cuda" and triton_available() else "torch")
LORA.register(Backend("torch", _load_torch))
LORA.register(Backend("triton", _load_triton, devices=("cuda", "interpreter"),
                      dtypes=(torch.float32, torch.float16, torch.bfloat16), unavailable=_triton_missing))

_DTYPE = operator.attrgetter("dtype")


class LoRAPlan:
    """The backend that runs every adapter, and the one dtype its launch takes (Triton: one
    dtype per launch, so mixed adapters are promoted). Calling it runs the penalty."""

    def __init__(self, run, common: torch.dtype | None, contig: bool, backend: str):
        self.run, self.common, self.contig, self.backend = run, common, contig, backend

    def __call__(self, As: list[Tensor], Bs: list[Tensor], scales: list[float], squared: bool,
                 precision: str) -> Tensor:
        need_grad = needs_grad(As, Bs)
        with autocast_off():
            if self.contig:
                As, Bs = contiguous(As), contiguous(Bs)
            if self.common is not None:
                As, Bs = [a.to(self.common) for a in As], [b.to(self.common) for b in Bs]
            return self.run(As, Bs, scales, squared, precision, need_grad)


def build_lora_plan(As: list[Tensor], Bs: list[Tensor], backend: str) -> LoRAPlan:
    device = As[0].device
    if any(t.device != device for t in (*As, *Bs)):
        raise ValueError(f"model: the LoRA adapters must share one device, got "
                         f"{sorted({str(t.device) for t in (*As, *Bs)})}")
    if backend == "cuda":
        raise ValueError(f"backend={backend!r} has no LoRA op (a LoRA update is never formed); use backend='auto', "
                         f"'triton' or 'torch'")
    chosen = LORA.resolve(backend, device)
    common = None
    if chosen.name == "triton":
        dtypes = {t.dtype for t in (*As, *Bs)}
        if len(dtypes) > 1:  # one launch takes one dtype
            common = torch.promote_types(*dtypes) if len(dtypes) == 2 else torch.float32
    return LoRAPlan(chosen.run, common, chosen.name == "triton", chosen.name)


def _signature(As, Bs) -> tuple:
    return tuple(map(_DTYPE, As)), tuple(map(_DTYPE, Bs)), As[0].device


def lora_plan_for(As: list[Tensor], Bs: list[Tensor], backend: str, plans: dict) -> LoRAPlan:
    """The plan kept in the caller's ``plans``, rebuilt when the adapters' dtypes or device changed."""
    if torch.compiler.is_compiling():
        return build_lora_plan(As, Bs, backend)
    held = plans.get(backend)
    sig = _signature(As, Bs)
    if held is None or held[0] != sig:
        if len(plans) >= 8:
            plans.clear()
        held = plans[backend] = (sig, build_lora_plan(As, Bs, backend))
    return held[1]


_PLANS: dict = {}


def lora_ortho_penalty(As: list[Tensor], Bs: list[Tensor], scales: list[float], *, squared: bool,
                       precision: str, backend: str) -> Tensor:
    """Per-adapter penalties of ``D_i = scales[i] * Bs[i] @ As[i]`` (fp32 ``[L]``),
    differentiable w.r.t. ``As`` and ``Bs``; ``D`` is never formed. Autocast is off inside
    (``precision`` says the operand format)."""
    check_bool("squared", squared)
    scales = [float(s) for s in scales]
    return lora_plan_for(As, Bs, backend, _PLANS)(As, Bs, scales, squared, precision)
