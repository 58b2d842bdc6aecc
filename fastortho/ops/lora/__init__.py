"""The exact low-rank OrthoReg penalty of LoRA adapters (``D = s B A`` never formed;
docs/design.md section 1), on two backends; :func:`lora_ortho_penalty` is the only entry the
public module (``fastortho/orthoreg.py``) calls. ``backend="auto"`` is Triton on CUDA, torch
elsewhere; the CUDA extension has no LoRA op.

Which file holds what:

- ``__init__.py``       this dispatch
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

import torch
from torch import Tensor

from ..._checks import check_bool
from .._common import autocast_off, contiguous, resolve_backend
from .torch_backend import torch_lora_penalty

__all__ = ["lora_ortho_penalty"]


def lora_ortho_penalty(As: list[Tensor], Bs: list[Tensor], scales: list[float], *, squared: bool,
                       precision: str, backend: str) -> Tensor:
    """Per-adapter penalties of ``D_i = scales[i] * Bs[i] @ As[i]`` (fp32 ``[L]``),
    differentiable w.r.t. ``As`` and ``Bs``; ``D`` is never formed. Autocast is off inside
    (``precision`` says the operand format)."""
    check_bool("squared", squared)
    with autocast_off():
        return _lora_ortho_penalty(As, Bs, scales, squared, precision, backend)


def _lora_ortho_penalty(As, Bs, scales, squared, precision, backend) -> Tensor:
    device = As[0].device
    if any(t.device != device for t in (*As, *Bs)):
        raise ValueError(f"model: the LoRA adapters must share one device, got "
                         f"{sorted({str(t.device) for t in (*As, *Bs)})}")
    scales = [float(s) for s in scales]
    chosen = resolve_backend(backend, device)
    if chosen == "cuda":
        raise ValueError(f"backend={chosen!r} has no LoRA op (a LoRA update is never formed); use backend='auto', "
                         f"'triton' or 'torch'")
    if chosen == "triton":
        from .triton_backend import triton_lora_penalty

        As, Bs = contiguous(As), contiguous(Bs)
        dtypes = {t.dtype for t in (*As, *Bs)}
        if len(dtypes) > 1:  # one launch takes one dtype
            common = torch.promote_types(*dtypes) if len(dtypes) == 2 else torch.float32
            As, Bs = [a.to(common) for a in As], [b.to(common) for b in Bs]
        return triton_lora_penalty(As, Bs, scales, squared, precision)
    need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*As, *Bs))
    return torch_lora_penalty(As, Bs, scales, squared, precision, need_grad)
