"""The "triton" backend of the OrthoReg penalty (docs/design.md section 6): ``D`` is
written once per step, as ``X^T`` in the mode's operand format, into a one-step scratch buffer
(``fastortho/kernels/orthoreg.py``: one delta launch, plus a fix-up launch for the
"tf32" mode's scaled fp16, and one pipelined upper-triangle Gram launch). The gradient
``c X (G - I)``: in "bf16" and "ieee" one cuBLAS batched product per shape group on views of
that scratch, the factor ``c`` folded into the small ``k x k`` matrix first; in "tf32" one
grouped Triton launch over the fp16 scratch that undoes its scale in the epilogue (cuBLAS would
need ``c (G - I) / s`` in fp16, which underflows for small updates).

- ``fastortho::ortho_scratch_gram``: per-layer values, the scratch, ``G - I``, and in "tf32"
  mode the per-layer scales and statistics;
- ``fastortho::ortho_scratch_grad``: per shape group the stacked gradients.

Between the passes the scratch (2 B per element in bf16 and fp16, 4 B in fp32) and ``G - I``
are held.
"""
from __future__ import annotations

import functools
import operator

import torch
from torch import Tensor

from .._common import ListOp, grad_op, penalty_product, to_group_order, upstream_coefficient, without_autocast
from . import into_grad
from .torch_backend import weight_shapes

_SHAPE = operator.attrgetter("shape")


@functools.lru_cache(maxsize=64)
def flat_shapes(shapes: tuple[torch.Size, ...]) -> list[int]:
    """The layers' ``[r0, c0, r1, c1, ...]`` (what the registered gradient ops take), made once
    per set of shapes. Callers must not modify the list."""
    return [int(v) for s in shapes for v in s]


def _layout(shapes):
    """The scratch layout of ``shapes``: ``(rows, cols)`` pairs, or their flat list ``[r0, c0, ...]``
    (what the registered op takes)."""
    from ...kernels.orthoreg import scratch_layout

    if shapes and isinstance(shapes[0], int):
        return scratch_layout(_pairs(tuple(shapes)))
    return scratch_layout(tuple((int(r), int(c)) for r, c in shapes))


@functools.lru_cache(maxsize=64)
def _pairs(flat: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """``[r0, c0, r1, c1, ...]`` as ``((r0, c0), ...)``, made once per set of shapes."""
    return tuple(zip(flat[0::2], flat[1::2]))


def gram_parts(weights: list[Tensor], bases: list[Tensor], squared: bool,
               precision: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Forward: per-layer penalties, the scratch of ``X^T``, the buffer of ``G - I``, and the
    "tf32" mode's per-layer scales and statistics (empty in the other modes). The scratch is
    what the values are computed from, so it is written whether or not a gradient follows."""
    from ...kernels.orthoreg import scratch_penalty

    sq, gmi, xt, scales, amax_bits = scratch_penalty(weights, bases, precision)
    return (sq if squared else sq.sqrt()), xt, gmi, scales, amax_bits


def flat_grads(xt: Tensor, gmi: Tensor, scales: Tensor, amax_bits: Tensor, coef: Tensor, shapes: list[int],
               out: Tensor | None = None) -> Tensor:
    """In "tf32" mode: every layer's fp32 gradient ``c X (G - I)`` in one flat buffer (``[L_g,
    rows, cols]`` per group at the layout's ``group_o``), one Triton launch over the scaled fp16
    scratch; with ``out`` (eager only) added to that buffer in place. ``shapes``: the layers'
    ``[r0, c0, r1, c1, ...]``."""
    from ...kernels.orthoreg import scratch_grads

    return scratch_grads(xt, gmi, scales, amax_bits, coef.float().contiguous(), _pairs(tuple(shapes)), out=out)


def group_views(flat: Tensor, shapes: list[int]) -> list[Tensor]:
    """:func:`flat_grads`' buffer as ``[L_g, rows, cols]`` per shape group."""
    layout = _layout(shapes)
    return [
        flat[o0 : o0 + len(idx) * r * c].view(len(idx), r, c)
        for ((r, c), idx), o0 in zip(layout.groups, layout.group_o)
    ]


def _group_grad(xt, gmi, coefs, layout, g: int, precision: str, out: Tensor | None = None) -> Tensor:
    """Group ``g``'s gradients from views of the scratch (``D`` is ``X`` or ``X^T`` of the
    stored ``X^T``), fresh or added to ``out``."""
    ((r, c), idx), x0, g0 = layout.groups[g], layout.group_x[g], layout.group_g[g]
    k, big, n = min(r, c), max(r, c), len(idx)
    stride = -(-big // 16) * 16  # rows padded with zeros (kernels/orthoreg.py)
    xt_g = xt[x0:x0 + n * k * stride].view(n, k, stride)[:, :, :big]  # the group's X^T, [n, k, big]
    m = gmi[g0:g0 + n * k * k].view(n, k, k) * coefs[g].view(-1, 1, 1)
    return penalty_product(xt_g.transpose(1, 2) if r >= c else xt_g, m, precision, out)


def group_grads(xt: Tensor, gmi: Tensor, coef: Tensor, shapes: list[int], precision: str) -> list[Tensor]:
    """In "bf16" and "ieee" mode: per shape group the fp32 gradients ``[L_g, rows, cols]``: ``X (c (G -
    I))`` for tall layers, ``(c (G - I)) X^T`` for wide ones, on views of the scratch (cuBLAS
    reads the transposed operand in place). ``shapes``: the layers' ``[r0, c0, r1, c1, ...]``."""
    layout = _layout(shapes)
    coefs = to_group_order(coef, layout.groups)
    return [_group_grad(xt, gmi, coefs, layout, g, precision) for g in range(len(layout.groups))]


ortho_scratch_gram = torch.library.custom_op("fastortho::ortho_scratch_gram", gram_parts, mutates_args=())
ortho_scratch_grad = torch.library.custom_op("fastortho::ortho_scratch_grad", group_grads, mutates_args=())
ortho_scratch_grad_fp16 = torch.library.custom_op("fastortho::ortho_scratch_grad_fp16", flat_grads, mutates_args=())


@ortho_scratch_gram.register_fake
def _(weights, bases, squared, precision):
    from ...kernels.orthoreg import scratch_dtype

    layout = _layout(weight_shapes(weights))
    w, layers = weights[0], len(weights) if precision == "tf32" else 0
    return (w.new_empty(len(weights), dtype=torch.float32),
            w.new_empty(layout.x_numel, dtype=scratch_dtype(precision, w.device)),
            w.new_empty(layout.g_numel, dtype=torch.float32), w.new_empty(layers, dtype=torch.float32),
            w.new_empty(2 * layers, dtype=torch.int32))


@ortho_scratch_grad_fp16.register_fake
def _(xt, gmi, scales, amax_bits, coef, shapes):
    return xt.new_empty(_layout(shapes).o_numel, dtype=torch.float32)


@ortho_scratch_grad.register_fake
def _(xt, gmi, coef, shapes, precision):
    layout = _layout(shapes)
    return [xt.new_empty((len(idx), r, c), dtype=torch.float32) for (r, c), idx in layout.groups]


def _setup_context(ctx, inputs, output):
    weights, _, squared, precision = inputs
    values, xt, gmi, scales, amax_bits = output
    shapes = tuple(map(_SHAPE, weights))
    try:
        ctx.shapes = flat_shapes(shapes)
    except TypeError:  # symbolic sizes (tracing with dynamic shapes) are not hashable
        ctx.shapes = flat_shapes.__wrapped__(shapes)
    ctx.dtypes = [w.dtype for w in weights]
    ctx.squared, ctx.precision = squared, precision
    ctx.save_for_backward(values, xt, gmi, scales, amax_bits)


@without_autocast
def _backward(ctx, grad_values, _grad_x, _grad_gmi, _grad_used, _grad_stats):
    values, xt, gmi, scales, amax_bits = ctx.saved_tensors
    coef = upstream_coefficient(values, grad_values, ctx.squared, 4.0)
    layout = _layout(ctx.shapes)
    n = len(ctx.dtypes)
    if ctx.precision != "tf32":
        coefs = to_group_order(coef, layout.groups)
        grads = into_grad.group_gradients(
            ctx, layout.groups, ctx.dtypes, lambda g, out: _group_grad(xt, gmi, coefs, layout, g, ctx.precision, out),
            lambda: grad_op(ctx, group_grads, ortho_scratch_grad)(xt, gmi, coef, ctx.shapes, ctx.precision))
        return grads, [None] * n, None, None
    # "tf32": one launch writes every layer, so straight into .grad for all layers or for none.
    offsets = list(layout.o_offsets)
    mode, weights = into_grad.plan(ctx, list(range(n)), offsets, layout.o_numel) if into_grad.allowed(ctx, n) \
        else (into_grad.AUTOGRAD, [])
    if isinstance(mode, Tensor):
        flat_grads(xt, gmi, scales, amax_bits, coef, ctx.shapes, out=mode)
        return [None] * n, [None] * n, None, None
    flat = grad_op(ctx, flat_grads, ortho_scratch_grad_fp16)(xt, gmi, scales, amax_bits, coef, ctx.shapes)
    if mode == into_grad.FRESH:
        into_grad.install(weights, [flat[o:o + w.numel()].view(w.shape) for o, w in zip(offsets, weights)])
        return [None] * n, [None] * n, None, None
    grads: list[Tensor | None] = [None] * n
    for buf, (_, idx) in zip(group_views(flat, ctx.shapes), layout.groups):
        for j, i in enumerate(idx):
            grads[i] = buf[j] if ctx.dtypes[i] == torch.float32 else buf[j].to(ctx.dtypes[i])
    return grads, [None] * n, None, None


# triton_penalty(weights, bases, squared, precision[, need_grad]) -> per-layer values (need_grad,
# the plans' common argument, is dropped: the scratch is written either way).
triton_penalty = ListOp(ortho_scratch_gram, gram_parts, _setup_context, _backward, num_lists=2, num_args=4)
