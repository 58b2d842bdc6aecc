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

from ...kernels.layout import lora_grad_offsets, lora_grad_views
from .._common import ListOp, grad_op, upstream_coefficient, without_autocast
from .torch_backend import adapter_shapes


def _rank_padding(As) -> int:
    from ...kernels.lora_orthoreg import rank_padding

    return rank_padding(max(int(a.shape[0]) for a in As))


def penalty_values(As: list[Tensor], Bs: list[Tensor], scales: list[float], squared: bool,
                   precision: str) -> tuple[Tensor, Tensor]:
    """Per-adapter penalties and the small matrices backward needs (made either way: the values
    come from them)."""
    from ...kernels.lora_orthoreg import lora_penalty

    sq, small = lora_penalty(As, Bs, tuple(scales), precision)
    return (sq if squared else sq.sqrt()), small


def grad_buffer(As: list[Tensor], Bs: list[Tensor], scales: list[float], small: Tensor, coef: Tensor,
                precision: str) -> Tensor:
    from ...kernels.lora_orthoreg import lora_grad

    return lora_grad(As, Bs, tuple(scales), small, coef, precision)


lora_ortho_triton = torch.library.custom_op("fastortho::lora_ortho_triton", penalty_values, mutates_args=())
lora_grad_triton = torch.library.custom_op("fastortho::lora_grad_triton", grad_buffer, mutates_args=())


@lora_ortho_triton.register_fake
def _(As, Bs, scales, squared, precision):
    rp = _rank_padding(As)
    return (As[0].new_empty(len(As), dtype=torch.float32),
            As[0].new_empty((len(As), 2, rp, rp), dtype=torch.float32))


@lora_grad_triton.register_fake
def _(As, Bs, scales, small, coef, precision):
    return As[0].new_empty(lora_grad_offsets(adapter_shapes(As, Bs))[2])


def _setup_context(ctx, inputs, output):
    As, Bs, scales, squared, precision = inputs
    values, small = output
    ctx.scales, ctx.squared, ctx.precision, ctx.n = list(scales), squared, precision, len(As)
    ctx.save_for_backward(values, small, *As, *Bs)


@without_autocast
def _backward(ctx, grad_values, _grad_small):
    values, small, *tensors = ctx.saved_tensors
    As, Bs = list(tensors[:ctx.n]), list(tensors[ctx.n:])
    coef = upstream_coefficient(values, grad_values, ctx.squared, 1.0)
    flat = grad_op(ctx, grad_buffer, lora_grad_triton)(As, Bs, ctx.scales, small, coef, ctx.precision)
    return (*lora_grad_views(flat, adapter_shapes(As, Bs)), None, None, None)


# triton_lora_penalty(As, Bs, scales, squared, precision[, need_grad]) -> per-adapter values
# (need_grad, the plans' common argument, is dropped).
triton_lora_penalty = ListOp(lora_ortho_triton, penalty_values, _setup_context, _backward, num_lists=2, num_args=5)
