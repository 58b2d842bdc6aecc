"""The "triton" backend of the exact low-rank OrthoReg penalty: two registered ops around
the kernels of ``fastortho.kernels.lora_orthoreg`` (every adapter of a model per launch).

- ``fastortho::lora_ortho_triton``: per-adapter penalties and the ``r x r`` matrices
  ``4 s^2 N E``, ``4 s^2 E M`` that backward needs (the adapters are not copied).
- ``fastortho::lora_grad_triton``: the gradients of every A and B, scaled by the upstream
  factor, into one flat buffer whose views go to autograd.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .lora_torch import adapter_shapes


def _rank_padding(As) -> int:
    from ..kernels.lora_orthoreg import rank_padding

    return rank_padding(max(int(a.shape[0]) for a in As))


@torch.library.custom_op("fastortho::lora_ortho_triton", mutates_args=())
def lora_ortho_triton(As: list[Tensor], Bs: list[Tensor], scales: list[float], squared: bool,
                      precision: str) -> tuple[Tensor, Tensor]:
    from ..kernels.lora_orthoreg import lora_penalty

    sq, small = lora_penalty(As, Bs, tuple(scales), precision)
    return (sq if squared else sq.sqrt()), small


@lora_ortho_triton.register_fake
def _(As, Bs, scales, squared, precision):
    rp = _rank_padding(As)
    return (As[0].new_empty(len(As), dtype=torch.float32),
            As[0].new_empty((len(As), 2, rp, rp), dtype=torch.float32))


@torch.library.custom_op("fastortho::lora_grad_triton", mutates_args=())
def lora_grad_triton(As: list[Tensor], Bs: list[Tensor], scales: list[float], small: Tensor,
                     coef: Tensor, precision: str) -> Tensor:
    from ..kernels.lora_orthoreg import lora_grad

    return lora_grad(As, Bs, tuple(scales), small, coef, precision)


@lora_grad_triton.register_fake
def _(As, Bs, scales, small, coef, precision):
    return As[0].new_empty(sum(a.numel() + b.numel() for a, b in zip(As, Bs)))


def _coef(values: Tensor, grad_values: Tensor, squared: bool) -> Tensor:
    if squared:
        return grad_values
    return torch.where(values > 0, 0.5 * grad_values / values, torch.zeros_like(values))


def _grads(flat: Tensor, As, Bs):
    from ..kernels.lora_orthoreg import grad_views

    return grad_views(flat, adapter_shapes(As, Bs))


def _setup_context(ctx, inputs, output):
    As, Bs, scales, squared, precision = inputs
    values, small = output
    ctx.scales, ctx.squared, ctx.precision, ctx.n = tuple(scales), squared, precision, len(As)
    ctx.save_for_backward(values, small, *As, *Bs)


def _backward(ctx, grad_values, _grad_small):
    values, small, *tensors = ctx.saved_tensors
    As, Bs = tensors[:ctx.n], tensors[ctx.n:]
    flat = lora_grad_triton(As, Bs, list(ctx.scales), small, _coef(values, grad_values, ctx.squared),
                            ctx.precision)
    grad_a, grad_b = _grads(flat, As, Bs)
    return grad_a, grad_b, None, None, None


lora_ortho_triton.register_autograd(_backward, setup_context=_setup_context)


class LoRATritonPenalty(torch.autograd.Function):
    """The same two launches for eager mode, without the custom-op dispatch cost."""

    @staticmethod
    def forward(ctx, squared: bool, precision: str, scales: tuple[float, ...], n: int, *tensors: Tensor) -> Tensor:
        from ..kernels.lora_orthoreg import lora_penalty

        As, Bs = list(tensors[:n]), list(tensors[n:])
        sq, small = lora_penalty(As, Bs, scales, precision)
        values = sq if squared else sq.sqrt()
        ctx.scales, ctx.squared, ctx.precision, ctx.n = scales, squared, precision, n
        ctx.save_for_backward(values, small, *As, *Bs)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        from ..kernels.lora_orthoreg import lora_grad

        values, small, *tensors = ctx.saved_tensors
        As, Bs = tensors[:ctx.n], tensors[ctx.n:]
        flat = lora_grad(As, Bs, ctx.scales, small, _coef(values, grad_values, ctx.squared), ctx.precision)
        grad_a, grad_b = _grads(flat, As, Bs)
        return (None, None, None, None, *grad_a, *grad_b)
