"""Backend choice for the exact low-rank (LoRA) OrthoReg penalty; the same rules as the
dense penalty (``backend="auto"`` is Triton on CUDA, torch elsewhere)."""
from __future__ import annotations

import torch
from torch import Tensor

from .lora_torch import LoRATorchPenalty, lora_ortho_torch
from .orthoreg import resolve_backend


def _contiguous(ts: list[Tensor]) -> list[Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in ts]


def lora_ortho_penalty(As: list[Tensor], Bs: list[Tensor], scales: list[float], *, squared: bool,
                       precision: str, backend: str) -> Tensor:
    """Per-adapter penalties of ``D_i = scales[i] * Bs[i] @ As[i]`` (fp32 ``[L]``),
    differentiable w.r.t. ``As`` and ``Bs``; ``D`` is never formed."""
    device = As[0].device
    if any(t.device != device for t in (*As, *Bs)):
        raise ValueError(f"model: the LoRA adapters must share one device, got "
                         f"{sorted({str(t.device) for t in (*As, *Bs)})}")
    scales = tuple(float(s) for s in scales)
    chosen = resolve_backend(backend, device)
    if chosen == "cuda":
        raise ValueError("backend='cuda': the CUDA extension has no LoRA op; use backend='auto', 'triton' or 'torch'")
    if chosen == "triton":
        from .lora_triton import LoRATritonPenalty, lora_ortho_triton

        As, Bs = _contiguous(As), _contiguous(Bs)
        dtypes = {t.dtype for t in (*As, *Bs)}
        if len(dtypes) > 1:  # one launch takes one dtype
            common = torch.promote_types(*dtypes) if len(dtypes) == 2 else torch.float32
            As, Bs = [a.to(common) for a in As], [b.to(common) for b in Bs]
        if torch.compiler.is_compiling():
            return lora_ortho_triton(As, Bs, list(scales), squared, precision)[0]
        return LoRATritonPenalty.apply(squared, precision, scales, len(As), *As, *Bs)
    if torch.compiler.is_compiling():
        need_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (*As, *Bs))
        return lora_ortho_torch(As, Bs, list(scales), squared, precision, need_grad)[0]
    return LoRATorchPenalty.apply(squared, precision, scales, len(As), *As, *Bs)
