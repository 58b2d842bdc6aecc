"""The "cuda" backend of the OrthoReg penalty: ``fastortho::ortho_penalty_grouped`` from the
C++ extension (``csrc/``), which returns the per-layer penalties and the gradient of their sum
in one call; backward scales each layer's gradient by its upstream value (one fused
``_foreach_mul``). Precision: "ieee" and "tf32" as asked; "bf16" runs as tf32 (the extension's
products are fp32 cuBLAS GEMMs)."""
from __future__ import annotations

import torch

from .precision import fp32_matmul


class CudaPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, squared: bool, precision: str, n: int, *tensors):
        weights, bases = list(tensors[:n]), list(tensors[n:])
        with fp32_matmul("ieee" if precision == "ieee" else "tf32", "cuda"):
            values, grads = torch.ops.fastortho.ortho_penalty_grouped(weights, bases, squared)
        ctx.n = n
        ctx.save_for_backward(*grads)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        grads = list(ctx.saved_tensors)
        scaled = torch._foreach_mul(grads, list(grad_values.to(grads[0].dtype).unbind()))
        return (None, None, None, *scaled, *([None] * ctx.n))


def cuda_penalty(weights, bases, squared: bool, precision: str):
    weights = [w if w.is_contiguous() else w.contiguous() for w in weights]
    bases = [b if b.is_contiguous() else b.contiguous() for b in bases]
    return CudaPenalty.apply(squared, precision, len(weights), *weights, *bases)
