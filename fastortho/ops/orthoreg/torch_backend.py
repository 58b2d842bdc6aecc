"""The "torch" backend of the OrthoReg penalty: layers grouped by shape and computed with
batched library matmuls; the CPU default and the fallback everywhere.

Forward (``fastortho::ortho_gram_torch``) forms each update ``D = W - W0`` once and its
Gram's ``G - I``, and keeps both for backward. Backward (``fastortho::ortho_grad_torch``)
folds the per-layer factor (upstream gradient x 4, or / ||G - I||) into the small ``G - I``
and writes each gradient with one product, ``D (c (G - I))``: no pass over a gradient-sized
buffer is spent on scaling. Both are ``torch.library.custom_op`` s (opaque to
torch.compile, with fake kernels); the precision flags they set act at run time only.
"""
from __future__ import annotations

import functools
import operator

import torch
from torch import Tensor

from .._common import (
    ListOp,
    bmm,
    grad_op,
    penalty_product,
    shape_groups,
    to_group_order,
    to_layer_order,
    upstream_coefficient,
    without_autocast,
)
from . import into_grad

_SHAPE = operator.attrgetter("shape")


def weight_shapes(weights: list[Tensor]) -> tuple[tuple[int, int], ...]:
    """``(rows, cols)`` per layer, looked up by the tensors' shapes (no Python call per layer)."""
    shapes = tuple(map(_SHAPE, weights))
    try:
        return _pairs(shapes)
    except TypeError:  # symbolic sizes (tracing with dynamic shapes) are not hashable
        return _pairs.__wrapped__(shapes)


@functools.lru_cache(maxsize=64)
def _pairs(shapes: tuple) -> tuple[tuple[int, int], ...]:
    return tuple((int(s[0]), int(s[1])) for s in shapes)


def layer_groups(weights: list[Tensor]) -> tuple[tuple[tuple[int, int], tuple[int, ...]], ...]:
    """How the layers are batched. On CUDA, by shape: one batched product per group instead
    of one launch per layer. Elsewhere one group per layer: there is no launch overhead to
    amortize and stacking would only copy the weights."""
    shapes = weight_shapes(weights)
    if weights[0].device.type == "cuda":
        return shape_groups(shapes)
    return tuple((s, (i,)) for i, s in enumerate(shapes))


# Column-block width of the symmetric Gram below. Narrower blocks skip more of the lower
# triangle but run less efficient products; 256 measured best on the 2-core CPU.
SYMMETRIC_GRAM_BLOCK = 256


def _gram(x: Tensor, precision: str) -> Tensor:
    """``x^T x`` for ``x`` of shape [L, big, k], computing only the block rows of the upper
    triangle (two thirds of the products for k = 768) and mirroring them."""
    k = x.shape[2]
    block = SYMMETRIC_GRAM_BLOCK
    if k < 2 * block:
        return bmm(x.transpose(1, 2), x, precision)
    g = x.new_empty((x.shape[0], k, k), dtype=torch.float32)
    for i0 in range(0, k, block):
        i1 = min(k, i0 + block)
        rows = bmm(x[:, :, i0:i1].transpose(1, 2), x[:, :, i0:], precision)
        g[:, i0:i1, i0:] = rows
        g[:, i0:, i0:i1] = rows.transpose(1, 2)
    return g


def _deltas(weights: list[Tensor], bases: list[Tensor], idx: tuple[int, ...]) -> Tensor:
    """``W - W0`` in fp32 for the layers ``idx`` of one shape, stacked ``[L_g, out, in]``:
    one pass over each pair, written straight into the stacked buffer."""
    if len(idx) == 1:
        i = idx[0]
        return (weights[i].float() - bases[i].float()).unsqueeze(0)
    w = weights[idx[0]]
    d = torch.empty((len(idx),) + tuple(w.shape), dtype=torch.float32, device=w.device)
    for j, i in enumerate(idx):
        torch.sub(weights[i].float(), bases[i].float(), out=d[j])
    return d


def _gram_factors(gmis: list[Tensor], coefs: list[Tensor]) -> list[Tensor]:
    """Per group ``c (G - I)``: the per-layer factor folded into the small matrix."""
    return [g * c.view(-1, 1, 1) for g, c in zip(gmis, coefs)]


def scaled_grads(deltas: list[Tensor], gmis: list[Tensor], coefs: list[Tensor], precision: str) -> list[Tensor]:
    """Per group ``D (c (G - I))`` (tall) or ``(c (G - I)) D`` (wide): the per-layer factor
    ``c`` is folded into the small ``k x k`` matrix, so the gradient is written once."""
    return [penalty_product(d, gs, precision) for d, gs in zip(deltas, _gram_factors(gmis, coefs))]


def penalty_parts(weights: list[Tensor], bases: list[Tensor], squared: bool, precision: str,
                  need_grad: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Forward: per-layer penalties (``||G - I||_F^2``, or its root when not ``squared``; fp32
    ``[L]``) and, if ``need_grad``, per group the stacked updates ``D`` and ``G - I`` that the
    gradient needs."""
    groups = layer_groups(weights)
    sqs: list[Tensor] = []
    deltas: list[Tensor] = []
    gmis: list[Tensor] = []
    for (rows, cols), idx in groups:
        d = _deltas(weights, bases, idx)
        g = _gram(d if rows >= cols else d.transpose(1, 2), precision)
        g.diagonal(dim1=1, dim2=2).sub_(1.0)  # G - I without materializing I
        # square().sum() (cascaded summation) is ~100x more accurate in fp32 on a CPU than
        # linalg.vector_norm over 10^6 terms; the temporary is only k x k per layer.
        sqs.append(g.square().sum(dim=(1, 2)))
        if need_grad:
            deltas.append(d)
            gmis.append(g)
    sq = to_layer_order(torch.cat(sqs), groups)
    return (sq if squared else sq.sqrt()), deltas, gmis


ortho_gram_torch = torch.library.custom_op("fastortho::ortho_gram_torch", penalty_parts, mutates_args=())


@ortho_gram_torch.register_fake
def _(weights, bases, squared, precision, need_grad):
    values = weights[0].new_empty(len(weights), dtype=torch.float32)
    if not need_grad:
        return values, [], []
    groups = layer_groups(weights)
    deltas = [weights[0].new_empty((len(idx), r, c), dtype=torch.float32) for (r, c), idx in groups]
    gmis = [weights[0].new_empty((len(idx), min(r, c), min(r, c)), dtype=torch.float32)
            for (r, c), idx in groups]
    return values, deltas, gmis


ortho_grad_torch = torch.library.custom_op("fastortho::ortho_grad_torch", scaled_grads, mutates_args=())


@ortho_grad_torch.register_fake
def _(deltas, gmis, coefs, precision):
    return [torch.empty_like(d) for d in deltas]


def _setup_context(ctx, inputs, output):
    weights, _, squared, precision, need_grad = inputs
    values, deltas, gmis = output
    ctx.groups = layer_groups(weights)
    ctx.dtypes = [w.dtype for w in weights]
    ctx.squared, ctx.precision, ctx.need_grad = squared, precision, need_grad
    ctx.save_for_backward(values, *deltas, *gmis)


@without_autocast
def _backward(ctx, grad_values, _grad_deltas, _grad_gmis):
    n = len(ctx.dtypes)
    if not ctx.need_grad:
        return [None] * n, [None] * n, None, None, None
    values, *saved = ctx.saved_tensors
    k = len(ctx.groups)
    coefs = to_group_order(upstream_coefficient(values, grad_values, ctx.squared, 4.0), ctx.groups)
    deltas, gmis = list(saved[:k]), list(saved[k:])

    def product(g, out):
        return penalty_product(deltas[g], gmis[g] * coefs[g].view(-1, 1, 1), ctx.precision, out)

    grads = into_grad.group_gradients(ctx, ctx.groups, ctx.dtypes, product, lambda: grad_op(
        ctx, scaled_grads, ortho_grad_torch)(deltas, gmis, coefs, ctx.precision))
    return grads, [None] * n, None, None, None


# The penalty of fastortho.ops.orthoreg's "torch" backend:
# torch_penalty(weights, bases, squared, precision, need_grad) -> per-layer values.
torch_penalty = ListOp(ortho_gram_torch, penalty_parts, _setup_context, _backward, num_lists=2)
