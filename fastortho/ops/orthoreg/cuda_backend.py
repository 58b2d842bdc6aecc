"""The "cuda" backend of the OrthoReg penalty: ``fastortho::ortho_penalty_grouped`` from the
C++ extension (``csrc/``), which returns the per-layer penalties and the gradient of their sum
in one call; backward scales each layer's gradient by its upstream value, straight into
``.grad`` where autograd allows (``into_grad.layer_gradients``). Precision: "ieee" and "tf32"
as asked; "bf16" runs as tf32 (the extension's products are fp32 cuBLAS GEMMs).

The variant is how the extension forms the symmetric rank-k update ``G = X^T X``: "gemm" (one
batched GEMM), "triangle" (the upper block triangle, one batched GEMM per block row) or "syrk"
(cuBLAS SYRK per layer); ``autotune.py`` measures which serves each shape group."""
from __future__ import annotations

import torch

from ..._config import CUDA_GRAMS
from .._common import contiguous, fp32_matmul, without_autocast
from . import into_grad


class CudaPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, squared: bool, precision: str, gram: str, n: int, *tensors):
        weights, bases = list(tensors[:n]), list(tensors[n:])
        with fp32_matmul("ieee" if precision == "ieee" else "tf32", "cuda"):
            values, grads = torch.ops.fastortho.ortho_penalty_grouped(weights, bases, squared, gram)
        ctx.n, ctx.eager = n, True  # an eager-only Function: its backward may write .grad (into_grad)
        ctx.save_for_backward(*grads)
        return values

    @staticmethod
    @without_autocast
    def backward(ctx, grad_values):
        grads = list(ctx.saved_tensors)
        factors = list(grad_values.to(grads[0].dtype).unbind())
        return (None, None, None, None, *into_grad.layer_gradients(ctx, grads, factors), *([None] * ctx.n))


def cuda_penalty(weights, bases, squared: bool, precision: str, need_grad: bool = True, variant: str = "gemm"):
    """The penalty by the extension; ``variant`` is its Gram form (``CUDA_GRAMS``). The extension
    returns the gradient with the values, so ``need_grad`` changes nothing."""
    if variant not in CUDA_GRAMS:
        raise ValueError(f"variant: expected one of the CUDA extension's Gram forms {CUDA_GRAMS}, got {variant!r}")
    weights, bases = contiguous(weights), contiguous(bases)
    return CudaPenalty.apply(squared, precision, variant, len(weights), *weights, *bases)
