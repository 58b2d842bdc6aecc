"""The "triton" backend of the OrthoReg penalty: two registered ops around the kernels of
``fastortho.kernels.orthoreg``.

- ``fastortho::ortho_gram_triton`` (forward, phase 1): per-layer penalties and ``G - I``.
- ``fastortho::ortho_grad_triton`` (backward, phase 2): the gradient of every layer, scaled
  by the upstream gradient, into one flat buffer whose per-layer views go to autograd.

The gradient is computed in backward (not saved from forward), so between the two passes
only ``G - I`` (``k x k`` per layer) is held. Triton is imported on first use only.
"""
from __future__ import annotations

import torch
from torch import Tensor


from ..kernels.orthoreg_layout import gmi_layout, grad_layout
from .orthoreg_torch import weight_shapes as _shapes


@torch.library.custom_op("fastortho::ortho_gram_triton", mutates_args=())
def ortho_gram_triton(weights: list[Tensor], bases: list[Tensor], squared: bool,
                      precision: str) -> tuple[Tensor, Tensor]:
    from ..kernels.orthoreg import gram_penalty

    sq, gmi = gram_penalty(weights, bases, precision)
    return (sq if squared else sq.sqrt()), gmi


@ortho_gram_triton.register_fake
def _(weights, bases, squared, precision):
    values = weights[0].new_empty(len(weights), dtype=torch.float32)
    return values, weights[0].new_empty(gmi_layout(_shapes(weights))[1], dtype=torch.float32)


@torch.library.custom_op("fastortho::ortho_grad_triton", mutates_args=())
def ortho_grad_triton(weights: list[Tensor], bases: list[Tensor], gmi: Tensor, coef: Tensor,
                      precision: str) -> Tensor:
    from ..kernels.orthoreg import penalty_grad

    return penalty_grad(weights, bases, gmi, coef, precision)


@ortho_grad_triton.register_fake
def _(weights, bases, gmi, coef, precision):
    return weights[0].new_empty(grad_layout(_shapes(weights))[1])


def _coef(values, grad_values, squared):
    if squared:
        return 4.0 * grad_values
    # d||G - I|| = 4 X (G - I) / (2 ||G - I||); zero where the norm is zero.
    return torch.where(values > 0, 2.0 * grad_values / values, torch.zeros_like(values))


def _views(flat, shapes):
    offsets, _ = grad_layout(shapes)
    return [flat[o:o + r * c].view(r, c) for (r, c), o in zip(shapes, offsets)]


def _setup_context(ctx, inputs, output):
    weights, bases, squared, precision = inputs
    values, gmi = output
    ctx.squared, ctx.precision, ctx.n = squared, precision, len(weights)
    ctx.shapes = _shapes(weights)
    ctx.save_for_backward(values, gmi, *weights, *bases)


def _backward(ctx, grad_values, _grad_gmi):
    values, gmi, *tensors = ctx.saved_tensors
    weights, bases = tensors[:ctx.n], tensors[ctx.n:]
    coef = _coef(values, grad_values, ctx.squared)
    flat = ortho_grad_triton(weights, bases, gmi, coef, ctx.precision)
    return _views(flat, ctx.shapes), [None] * ctx.n, None, None


ortho_gram_triton.register_autograd(_backward, setup_context=_setup_context)


class TritonPenalty(torch.autograd.Function):
    """The same two launches for eager mode without the custom-op dispatch (whose Python
    cost grows with the number of list arguments). Under torch.compile the registered ops
    are used instead."""

    @staticmethod
    def forward(ctx, squared: bool, precision: str, n: int, *tensors: Tensor) -> Tensor:
        from ..kernels.orthoreg import gram_penalty

        weights, bases = list(tensors[:n]), list(tensors[n:])
        sq, gmi = gram_penalty(weights, bases, precision)
        values = sq if squared else sq.sqrt()
        ctx.squared, ctx.precision, ctx.n = squared, precision, n
        ctx.shapes = _shapes(weights)
        ctx.save_for_backward(values, gmi, *weights, *bases)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        from ..kernels.orthoreg import penalty_grad

        values, gmi, *tensors = ctx.saved_tensors
        weights, bases = tensors[:ctx.n], tensors[ctx.n:]
        flat = penalty_grad(weights, bases, gmi, _coef(values, grad_values, ctx.squared), ctx.precision)
        return (None, None, None, *_views(flat, ctx.shapes), *([None] * ctx.n))
