"""The Triton kernels behind the dual functions of :mod:`fastortho.ops.dual`, as autograd
Functions: the fused dual linear (``kernels/dual_linear.py``) and the one-pass attention
tangent (``kernels/attention_tangent.py``).

- The primal output is marked non-differentiable (a linearized model's primal is a constant);
  backward is the gradient of the tangent map from the primal inputs only.
- Each Function has a ``vmap`` rule for tangents batched over a leading axis with an
  unbatched primal (``taujp_matrix``: every task vector's tangent per primal pass): the dual
  linear calls its multi-tangent kernel, the attention launches once per tangent.
- The dual pass never uses forward-mode AD (tangents are computed explicitly), so the
  forward-AD caveats about custom ops (docs/design.md section 7) do not arise here.

Which path runs is :func:`fastortho.set_kernels`'s policy.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _batched(t, dim, size):
    if t is None:
        return None
    if dim is None:
        return t.expand(size, *t.shape)
    return t.movedim(dim, 0)


class FusedDualLinear(torch.autograd.Function):
    """``(y, dy)`` of a linear layer from 2-D ``x0``/``dx`` (``M x K``), ``w0``/``dw`` (``N x K``)."""

    @staticmethod
    def forward(x0, dx, w0, dw, b0, db):
        from ...kernels.dual_linear import dual_linear

        return dual_linear(x0, dx, w0, dw, b0, db)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x0, dx, w0, dw, b0, db = inputs
        ctx.save_for_backward(x0, w0)
        ctx.flags = (dx is not None, dw is not None, db is not None)
        ctx.mark_non_differentiable(output[0])

    @staticmethod
    def backward(ctx, _grad_y, g):
        x0, w0 = ctx.saved_tensors
        has_dx, has_dw, has_db = ctx.flags
        need = ctx.needs_input_grad
        grad_dx = (g @ w0.to(g.dtype)) if has_dx and need[1] else None
        grad_dw = (g.T @ x0.to(g.dtype)) if has_dw and need[3] else None
        grad_db = g.sum(0) if has_db and need[5] else None
        return None, grad_dx, None, grad_dw, None, grad_db

    @staticmethod
    def vmap(info, in_dims, x0, dx, w0, dw, b0, db):
        from ...kernels.dual_linear import dual_linear_multi

        if in_dims[0] is not None or in_dims[2] is not None or in_dims[4] is not None:
            raise NotImplementedError("fused dual linear under vmap: only the tangents may be batched")
        size = info.batch_size
        y = F.linear(x0, w0, b0)
        dy = dual_linear_multi(x0, _batched(dx, in_dims[1], size), w0, _batched(dw, in_dims[3], size),
                               _batched(db, in_dims[5], size))
        return (y, dy), (None, 0)


class FusedAttentionTangent(torch.autograd.Function):
    """``(O, dO, lse)`` of scaled dot-product attention in one pass; gradients for
    ``dQ, dK, dV`` from ``Q, K, V`` and ``lse`` (``O`` is recomputed, not saved)."""

    @staticmethod
    def forward(q, k, v, dq, dk, dv, scale, causal):
        from ...kernels.attention_tangent import attention_with_tangent

        return attention_with_tangent(q, k, v, dq, dk, dv, scale, causal)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, _, _, _, scale, causal = inputs
        ctx.save_for_backward(q, k, v, output[2])
        ctx.scale, ctx.causal = scale, causal
        ctx.mark_non_differentiable(output[0], output[2])

    @staticmethod
    def backward(ctx, _grad_o, g, _grad_lse):
        from ...kernels.attention_tangent import attention_tangent_backward

        q, k, v, lse = ctx.saved_tensors
        gdq, gdk, gdv = attention_tangent_backward(q, k, v, lse, g.contiguous(), ctx.scale, ctx.causal)
        return None, None, None, gdq, gdk, gdv, None, None

    @staticmethod
    def vmap(info, in_dims, q, k, v, dq, dk, dv, scale, causal):
        from ...kernels.attention_tangent import attention_with_tangent

        if any(d is not None for d in in_dims[:3]):
            raise NotImplementedError("attention tangent under vmap: only the tangents may be batched")
        size = info.batch_size
        dqs, dks, dvs = (_batched(t, d, size) for t, d in zip((dq, dk, dv), in_dims[3:6]))
        outs = [attention_with_tangent(q, k, v, dqs[i], dks[i], dvs[i], scale, causal) for i in range(size)]
        return (outs[0][0], torch.stack([o[1] for o in outs]), outs[0][2]), (None, 0, None)
