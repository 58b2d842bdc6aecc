"""The "triton" backend of the OrthoReg penalty: two registered ops around the kernels of
``fastortho.kernels.orthoreg`` (docs/design.md section 3).

- ``fastortho::ortho_gram_triton`` (forward, phase 1): per-layer penalties and ``G - I``.
- ``fastortho::ortho_grad_triton`` (backward, phase 2): the gradient of every layer, scaled
  by the upstream gradient, into one flat buffer whose per-layer views go to autograd.

The gradient is computed in backward (not saved from forward), so between the two passes
only ``G - I`` (``k x k`` per layer) is held. Triton is imported on first use only.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ...kernels.layout import gmi_layout, grad_layout, layer_views
from .._common import ListOp, grad_op, upstream_coefficient, without_autocast
from .torch_backend import weight_shapes


def gram_values(weights: list[Tensor], bases: list[Tensor], squared: bool, precision: str) -> tuple[Tensor, Tensor]:
    """Phase 1: per-layer penalties and the flat buffer of every layer's ``G - I``."""
    from ...kernels.orthoreg import gram_penalty

    sq, gmi = gram_penalty(weights, bases, precision)
    return (sq if squared else sq.sqrt()), gmi


def grad_buffer(weights: list[Tensor], bases: list[Tensor], gmi: Tensor, coef: Tensor, precision: str) -> Tensor:
    """Phase 2: ``coef[l] * X (G - I)`` of every layer into one flat buffer."""
    from ...kernels.orthoreg import penalty_grad

    return penalty_grad(weights, bases, gmi, coef, precision)


ortho_gram_triton = torch.library.custom_op("fastortho::ortho_gram_triton", gram_values, mutates_args=())
ortho_grad_triton = torch.library.custom_op("fastortho::ortho_grad_triton", grad_buffer, mutates_args=())


@ortho_gram_triton.register_fake
def _(weights, bases, squared, precision):
    values = weights[0].new_empty(len(weights), dtype=torch.float32)
    return values, weights[0].new_empty(gmi_layout(weight_shapes(weights))[1], dtype=torch.float32)


@ortho_grad_triton.register_fake
def _(weights, bases, gmi, coef, precision):
    return weights[0].new_empty(grad_layout(weight_shapes(weights))[1])


def _setup_context(ctx, inputs, output):
    weights, bases, squared, precision = inputs
    values, gmi = output
    ctx.squared, ctx.precision, ctx.n = squared, precision, len(weights)
    ctx.shapes = weight_shapes(weights)
    ctx.save_for_backward(values, gmi, *weights, *bases)


@without_autocast
def _backward(ctx, grad_values, _grad_gmi):
    values, gmi, *tensors = ctx.saved_tensors
    coef = upstream_coefficient(values, grad_values, ctx.squared, 4.0)
    flat = grad_op(ctx, grad_buffer, ortho_grad_triton)(list(tensors[:ctx.n]), list(tensors[ctx.n:]), gmi, coef,
                                                        ctx.precision)
    return layer_views(flat, ctx.shapes, grad_layout(ctx.shapes)[0]), [None] * ctx.n, None, None


# triton_penalty(weights, bases, squared, precision) -> per-layer values.
triton_penalty = ListOp(ortho_gram_triton, gram_values, _setup_context, _backward, num_lists=2)
