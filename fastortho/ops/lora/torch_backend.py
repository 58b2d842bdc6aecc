"""The "torch" backend of the exact low-rank OrthoReg penalty of LoRA adapters.

For an adapter ``D = s B A`` (``B: out x r``, ``A: r x in``), with ``M = B^T B`` and
``N = A A^T`` (``r x r``) and ``E = s^2 M N - I_r`` (docs/design.md section 1):

    ||G - I||_F^2 = tr(E E) + (k - r),      k = min(out, in)

(the same as ``s^4 tr(MNMN) - 2 s^2 tr(MN) + k``, written so that no two large terms cancel),
and the gradients are

    dP/dB = 4 s^2 B (N E),      dP/dA = 4 s^2 (E M) A.

``D`` is never formed: the cost is ``O((out + in) r^2)`` per adapter instead of
``O(out in k)``. Adapters of one shape ``(out, in, r)`` are stacked and run as batched
products (the stacked copies are only ``(out + in) r`` elements each). Forward keeps the
small ``4 s^2 N E`` and ``4 s^2 E M``; backward folds the per-adapter upstream factor into
them and writes each gradient with one product.
"""
from __future__ import annotations

import functools
import operator

import torch
from torch import Tensor

from .._common import (
    ListOp,
    bmm,
    fp32_matmul,
    grad_op,
    shape_groups,
    to_group_order,
    to_layer_order,
    upstream_coefficient,
    without_autocast,
)

_SHAPE = operator.attrgetter("shape")


def adapter_shapes(As: list[Tensor], Bs: list[Tensor]) -> tuple[tuple[int, int, int], ...]:
    """``(out, in, r)`` per adapter (looked up by the tensors' shapes: no Python call per adapter)."""
    a_shapes, b_shapes = tuple(map(_SHAPE, As)), tuple(map(_SHAPE, Bs))
    try:
        return _adapter_shapes(a_shapes, b_shapes)
    except TypeError:  # symbolic sizes (tracing with dynamic shapes) are not hashable
        return _adapter_shapes.__wrapped__(a_shapes, b_shapes)


@functools.lru_cache(maxsize=64)
def _adapter_shapes(a_shapes, b_shapes) -> tuple[tuple[int, int, int], ...]:
    return tuple((int(b[0]), int(a[1]), int(a[0])) for a, b in zip(a_shapes, b_shapes))


@functools.lru_cache(maxsize=256)
def _scale_factors(scales: tuple[float, ...], groups, device: torch.device) -> tuple[Tensor, ...]:
    """Per group the ``[L_g, 1, 1]`` tensor of ``s^2``, made on the device once (a fresh
    host tensor every call would be a blocking copy)."""
    return tuple(torch.tensor([scales[i] ** 2 for i in idx], dtype=torch.float32).view(-1, 1, 1).to(device)
                 for _, idx in groups)


def _stack(tensors: list[Tensor], idx: tuple[int, ...]) -> Tensor:
    if len(idx) == 1:
        return tensors[idx[0]].float().unsqueeze(0)
    return torch.stack([tensors[i].float() for i in idx])


def lora_penalty_parts(As: list[Tensor], Bs: list[Tensor], scales: tuple[float, ...], precision: str,
                       keep: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Per-adapter ``||G - I||_F^2`` (fp32 ``[L]``) and, if ``keep``, per shape group the
    stacked ``4 s^2 N E`` and ``4 s^2 E M`` the gradients need."""
    groups = shape_groups(adapter_shapes(As, Bs))
    s2s = _scale_factors(tuple(scales), groups, As[0].device)
    sqs, nes, ems = [], [], []
    for ((out, inn, r), idx), s2 in zip(groups, s2s):
        a, b = _stack(As, idx), _stack(Bs, idx)
        m = bmm(b.transpose(1, 2), b, precision)  # B^T B
        n = bmm(a, a.transpose(1, 2), precision)  # A A^T
        # The r x r products are free next to the two above: always true fp32.
        with fp32_matmul("ieee", a.device.type):
            e = s2 * torch.bmm(m, n)
            e.diagonal(dim1=1, dim2=2).sub_(1.0)
            sqs.append((e * e.transpose(1, 2)).sum(dim=(1, 2)) + float(min(out, inn) - r))
            if keep:
                nes.append(torch.bmm(n, e) * (4.0 * s2))
                ems.append(torch.bmm(e, m) * (4.0 * s2))
    return to_layer_order(torch.cat(sqs), groups), nes, ems


def lora_scaled_grads(As: list[Tensor], Bs: list[Tensor], nes: list[Tensor], ems: list[Tensor],
                      coefs: list[Tensor], precision: str) -> list[Tensor]:
    """Per group ``[grad A (stacked), grad B (stacked)]``: ``(c 4s^2 E M) A`` and
    ``B (c 4s^2 N E)``, fp32."""
    groups = shape_groups(adapter_shapes(As, Bs))
    out = []
    for (_, idx), ne, em, c in zip(groups, nes, ems, coefs):
        c = c.view(-1, 1, 1)
        out.append(bmm(em * c, _stack(As, idx), precision))
        out.append(bmm(_stack(Bs, idx), ne * c, precision))
    return out


def _unstack(buffers: list[Tensor], groups, As, Bs) -> tuple[list[Tensor], list[Tensor]]:
    n = len(As)
    grad_a: list[Tensor | None] = [None] * n
    grad_b: list[Tensor | None] = [None] * n
    for g, (_, idx) in enumerate(groups):
        for j, i in enumerate(idx):
            ga, gb = buffers[2 * g][j], buffers[2 * g + 1][j]
            grad_a[i] = ga if As[i].dtype == torch.float32 else ga.to(As[i].dtype)
            grad_b[i] = gb if Bs[i].dtype == torch.float32 else gb.to(Bs[i].dtype)
    return grad_a, grad_b


def lora_parts(As: list[Tensor], Bs: list[Tensor], scales: list[float], squared: bool, precision: str,
               need_grad: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Forward: per-adapter penalties and, if ``need_grad``, what backward needs."""
    sq, nes, ems = lora_penalty_parts(As, Bs, tuple(scales), precision, keep=need_grad)
    return (sq if squared else sq.sqrt()), nes, ems


lora_ortho_torch = torch.library.custom_op("fastortho::lora_ortho_torch", lora_parts, mutates_args=())
lora_grad_torch = torch.library.custom_op("fastortho::lora_grad_torch", lora_scaled_grads, mutates_args=())


@lora_ortho_torch.register_fake
def _(As, Bs, scales, squared, precision, need_grad):
    values = As[0].new_empty(len(As), dtype=torch.float32)
    if not need_grad:
        return values, [], []
    groups = shape_groups(adapter_shapes(As, Bs))
    small = [As[0].new_empty((len(idx), r, r), dtype=torch.float32) for (_, _, r), idx in groups]
    return values, small, [torch.empty_like(t) for t in small]


@lora_grad_torch.register_fake
def _(As, Bs, nes, ems, coefs, precision):
    out = []
    for (o, i, r), idx in shape_groups(adapter_shapes(As, Bs)):
        out.append(As[0].new_empty((len(idx), r, i), dtype=torch.float32))
        out.append(As[0].new_empty((len(idx), o, r), dtype=torch.float32))
    return out


def _setup_context(ctx, inputs, output):
    As, Bs, _, squared, precision, need_grad = inputs
    values, nes, ems = output
    ctx.squared, ctx.precision, ctx.need_grad, ctx.n = squared, precision, need_grad, len(As)
    ctx.save_for_backward(values, *As, *Bs, *nes, *ems)


@without_autocast
def _backward(ctx, grad_values, _grad_nes, _grad_ems):
    n = ctx.n
    if not ctx.need_grad:
        return [None] * n, [None] * n, None, None, None, None
    values, *saved = ctx.saved_tensors
    As, Bs, small = list(saved[:n]), list(saved[n:2 * n]), saved[2 * n:]
    groups = shape_groups(adapter_shapes(As, Bs))
    g = len(groups)
    # The kernels fold 4 s^2 into N E and E M already: the coefficient's scale is 1.
    coefs = to_group_order(upstream_coefficient(values, grad_values, ctx.squared, 1.0), groups)
    buffers = grad_op(ctx, lora_scaled_grads, lora_grad_torch)(As, Bs, list(small[:g]), list(small[g:]), coefs,
                                                              ctx.precision)
    grad_a, grad_b = _unstack(buffers, groups, As, Bs)
    return grad_a, grad_b, None, None, None, None


# torch_lora_penalty(As, Bs, scales, squared, precision, need_grad) -> per-adapter values.
torch_lora_penalty = ListOp(lora_ortho_torch, lora_parts, _setup_context, _backward, num_lists=2)
