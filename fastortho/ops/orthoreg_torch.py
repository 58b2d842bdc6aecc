"""The "torch" backend of the OrthoReg penalty: layers grouped by shape and computed with
batched matmuls, value and gradient in one forward pass, backward only scales.

It is a ``torch.library.custom_op`` (opaque to torch.compile, with a fake kernel) whose
autograd formula is registered with ``register_autograd``. Works on any device and dtype;
the CPU default and the fallback everywhere.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .precision import fp32_matmul


@functools.lru_cache(maxsize=256)
def shape_groups(shapes: tuple[tuple[int, int], ...]) -> tuple[tuple[tuple[int, int], tuple[int, ...]], ...]:
    """Layers grouped by shape, in order of first appearance: ((shape, layer indices), ...)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s), []).append(i)
    return tuple((s, tuple(idx)) for s, idx in groups.items())


def _shapes(weights: list[Tensor]) -> tuple[tuple[int, int], ...]:
    return tuple((int(w.shape[0]), int(w.shape[1])) for w in weights)


def layer_groups(weights: list[Tensor]) -> tuple[tuple[tuple[int, int], tuple[int, ...]], ...]:
    """How the layers are batched. On CUDA, by shape: one batched product per group instead
    of one launch per layer. Elsewhere one group per layer: there is no launch overhead to
    amortize and stacking would only copy the weights."""
    shapes = _shapes(weights)
    if weights[0].device.type == "cuda":
        return shape_groups(shapes)
    return tuple((s, (i,)) for i, s in enumerate(shapes))


@functools.lru_cache(maxsize=None)
def _bmm_has_out_dtype(device_type: str) -> bool:
    """Whether ``torch.bmm(..., out_dtype=torch.float32)`` runs for bf16 on this device type
    (CUDA in recent PyTorch); probed once, lazily."""
    try:
        a = torch.ones(1, 2, 2, dtype=torch.bfloat16, device=device_type)
        return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _bmm(a: Tensor, b: Tensor, precision: str) -> Tensor:
    """fp32 batched product with the operands treated per ``precision``; fp32 result."""
    if precision == "bf16":
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        if a.device.type == "cuda" and _bmm_has_out_dtype("cuda"):
            return torch.bmm(a16, b16, out_dtype=torch.float32)
        if a.device.type == "cuda":
            return torch.bmm(a16, b16).float()
        # Exact emulation elsewhere: bf16-rounded operands, fp32 products and sums.
        with fp32_matmul("ieee", a.device.type):
            return torch.bmm(a16.float(), b16.float())
    with fp32_matmul(precision, a.device.type):
        return torch.bmm(a, b)


# Column-block width of the symmetric Gram below. Narrower blocks skip more of the lower
# triangle but run less efficient products; 256 measured best on the 2-core CPU.
SYMMETRIC_GRAM_BLOCK = 256


def _gram(x: Tensor, precision: str) -> Tensor:
    """``x^T x`` for ``x`` of shape [L, big, k], computing only the block rows of the upper
    triangle (about 5/8 of the products for k = 768) and mirroring them."""
    k = x.shape[2]
    block = SYMMETRIC_GRAM_BLOCK
    if k < 2 * block:
        return _bmm(x.transpose(1, 2), x, precision)
    g = x.new_empty((x.shape[0], k, k), dtype=torch.float32)
    for i0 in range(0, k, block):
        i1 = min(k, i0 + block)
        rows = _bmm(x[:, :, i0:i1].transpose(1, 2), x[:, :, i0:], precision)
        g[:, i0:i1, i0:] = rows
        g[:, i0:, i0:i1] = rows.transpose(1, 2)
    return g


def _stack_fp32(tensors: list[Tensor]) -> Tensor:
    if len(tensors) == 1:
        return tensors[0].unsqueeze(0).float()
    return torch.stack(tensors).float()


def penalty_and_grad(weights: list[Tensor], bases: list[Tensor], squared: bool,
                     precision: str, need_grad: bool) -> tuple[Tensor, list[Tensor]]:
    """Per-layer penalties (fp32, shape [L]) and, if ``need_grad``, one fp32 gradient buffer
    per shape group (``[L_g, out, in]``, layers in the group's index order)."""
    device = weights[0].device
    groups = layer_groups(weights)
    values = torch.empty(len(weights), dtype=torch.float32, device=device)
    grads: list[Tensor] = []
    for (rows, cols), idx in groups:
        d = _stack_fp32([weights[i] for i in idx]) - _stack_fp32([bases[i] for i in idx])
        tall = rows >= cols
        g = _gram(d if tall else d.transpose(1, 2), precision)
        g.diagonal(dim1=1, dim2=2).sub_(1.0)  # G - I without materializing I
        sq = g.square().sum(dim=(1, 2))
        norm = sq.sqrt()
        values[list(idx)] = sq if squared else norm
        if need_grad:
            grad = _bmm(d, g, precision) if tall else _bmm(g, d, precision)
            if squared:
                grad.mul_(4.0)
            else:
                # d||G-I|| = 4 D (G-I) / (2 ||G-I||); zero where the norm is zero.
                inv = torch.where(norm > 0, 2.0 / norm, torch.zeros_like(norm))
                grad.mul_(inv.view(-1, 1, 1))
            grads.append(grad)
    return values, grads


@torch.library.custom_op("fastortho::ortho_penalty_torch", mutates_args=())
def ortho_penalty_torch(weights: list[Tensor], bases: list[Tensor], squared: bool,
                        precision: str, need_grad: bool) -> tuple[Tensor, list[Tensor]]:
    return penalty_and_grad(weights, bases, squared, precision, need_grad)


@ortho_penalty_torch.register_fake
def _(weights, bases, squared, precision, need_grad):
    values = weights[0].new_empty(len(weights), dtype=torch.float32)
    if not need_grad:
        return values, []
    grads = [weights[0].new_empty((len(idx), r, c), dtype=torch.float32)
             for (r, c), idx in layer_groups(weights)]
    return values, grads


def _setup_context(ctx, inputs, output):
    weights, _, _, _, need_grad = inputs
    ctx.shapes = _shapes(weights)
    ctx.groups = layer_groups(weights)
    ctx.dtypes = [w.dtype for w in weights]
    ctx.need_grad = need_grad
    ctx.save_for_backward(*output[1])


def _backward(ctx, grad_values, _grad_buffers):
    no_grad_bases = [None] * len(ctx.shapes)
    if not ctx.need_grad:
        return [None] * len(ctx.shapes), no_grad_bases, None, None, None
    buffers = ctx.saved_tensors
    grads: list[Tensor | None] = [None] * len(ctx.shapes)
    for buf, (_, idx) in zip(buffers, ctx.groups):
        scale = grad_values[list(idx)] if len(idx) > 1 else grad_values[idx[0]:idx[0] + 1]
        scaled = buf * scale.view(-1, 1, 1)
        for j, i in enumerate(idx):
            grads[i] = scaled[j].to(ctx.dtypes[i])
    return grads, no_grad_bases, None, None, None


ortho_penalty_torch.register_autograd(_backward, setup_context=_setup_context)
