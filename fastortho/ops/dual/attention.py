"""The dual rules of attention: scaled dot-product attention (its one-pass Triton kernel or
SDPA plus the tangent in PyTorch ops) and ``nn.MultiheadAttention``'s whole forward, whose
projections go through the linear rule and whose attention goes through the SDPA rule's
pieces (``_fused_sdpa``, ``_sdpa_tangent``): only the head reshapes and the masks are its own."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .._common import mm_accumulate_fp32
from .policy import compute_dtype, kernel_how, measured_triton
from .rules import dual_linear
from .values import Dual, bind, jvp_fallback, parameters, split, wrap


def additive_mask(mask: Tensor | None, dtype: torch.dtype, attend_when_true: bool) -> Tensor | None:
    """A float mask to add to the scores. Boolean masks: SDPA's ``True`` = attend;
    nn.MultiheadAttention's ``True`` = masked out (``attend_when_true=False``)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        blocked = ~mask if attend_when_true else mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(blocked, float("-inf"))
    return mask.to(dtype)


def _operand_dtype(t: Tensor) -> torch.dtype:
    """The attention tangent's operand format: under autocast its dtype (half operands, fp32
    accumulation, as the primal attention runs); otherwise the input's own (float64 stays)."""
    if t.dtype != torch.float64 and torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``[..., L, D]`` as ``[B, L, D]`` in ``dtype`` (one copy if the heads are a permuted view):
    batched products on 3-D tensors are one ``bmm`` each, where ``matmul`` on 4-D views expands,
    copies and reshapes per call."""
    return t.to(dtype).reshape(-1, t.shape[-2], t.shape[-1])


def _probs(q: Tensor, k: Tensor, mask: Tensor | None, scale: float, lead: tuple) -> Tensor:
    """Softmax of ``c Q K^T + mask`` for ``[B, L, D]`` rows, in fp32 (float64 for float64
    rows); ``lead`` is the leading shape the mask broadcasts against."""
    s = mm_accumulate_fp32(q, k.transpose(1, 2)) * scale
    if mask is not None:
        s = (s.view(*lead, *s.shape[1:]) + mask).view(s.shape)
    return torch.softmax(s, dim=-1)


def _tangent_rows(q, k, v, o, dq, dk, dv, mask, scale, lead, shape, dtype):
    """``dO`` in ``shape`` and ``dtype`` from ``[B, L, D]`` rows in one operand format: the
    products take half operands (``P`` and ``P * dS`` rounded to it, as flash attention
    rounds ``P``) and accumulate in fp32; the softmax and the elementwise terms are fp32.

    The result is the output of its last op, never a view or a no-op cast of an
    intermediate: torch 2.11's dynamo drops the gradient of an autograd.Function whose
    forward returns such an alias (docs/design.md section 7)."""
    p = _probs(q, k, mask, scale, lead)
    ds = mm_accumulate_fp32(q, dk.transpose(1, 2), mm_accumulate_fp32(dq, k.transpose(1, 2))) * scale
    z = p * ds
    # (P * dS) V + P dV - rowsum(P * dS) O, the last term written straight in the output's shape
    pv = mm_accumulate_fp32(z.to(q.dtype), v, mm_accumulate_fp32(p.to(q.dtype), dv))
    rowsum = z.sum(-1, keepdim=True)
    do = torch.addcmul(pv.view(shape), rowsum.view(*shape[:-1], 1), o.view(shape), value=-1.0)
    return do if do.dtype == dtype else do.to(dtype)


def attention_tangent(q, k, v, o, dq, dk, dv, mask, scale):
    """The tangent of ``O = softmax(c Q K^T + mask) V`` (docs/design.md section 1):
    ``dS = c (dQ K^T + Q dK^T)``, ``dO = (P * dS) V - rowsum(P * dS) O + P dV``.
    Plain differentiable ops (used without autograd, e.g. under vmap); operands in the
    autocast dtype under autocast, fp32 accumulation (:func:`_tangent_rows`)."""
    dtype, lead = _operand_dtype(q), tuple(q.shape[:-2])
    with torch.autocast(q.device.type, enabled=False):  # the operand format is chosen here, not recast
        return _tangent_rows(*(_rows(t, dtype) for t in (q, k, v, o, dq, dk, dv)), mask, scale, lead, o.shape, dtype)


class AttentionTangent(torch.autograd.Function):
    """``(dQ, dK, dV) -> dO`` at fixed primal ``Q, K, V, O``, with the gradient of that linear
    map: ``g_S = P * (g V^T - rowsum(g * O))`` (the flash-attention backward's ``dS``),
    ``grad dQ = c g_S K``, ``grad dK = c g_S^T Q``, ``grad dV = P^T g``. The primal ``Q, K, V``
    are saved (as the ``[B, L, D]`` rows the products use) and ``P`` is recomputed in
    backward. ``O`` is saved only with ``keep_o`` (the caller's ``O`` is a view of a tensor
    kept anyway, e.g. the output projection's input, so saving it costs nothing); otherwise
    backward recomputes ``O = P V`` rather than hold a second copy. Operands in the autocast
    dtype under autocast, fp32 accumulation."""

    @staticmethod
    def forward(ctx, q, k, v, o, dq, dk, dv, mask, scale, keep_o=False):
        lead, dtype = tuple(q.shape[:-2]), _operand_dtype(q)
        with torch.autocast(q.device.type, enabled=False):
            q3, k3, v3 = _rows(q, dtype), _rows(k, dtype), _rows(v, dtype)
            do = _tangent_rows(q3, k3, v3, _rows(o, dtype), _rows(dq, dtype), _rows(dk, dtype), _rows(dv, dtype),
                               mask, scale, lead, o.shape, dtype)
        ctx.save_for_backward(q3, k3, v3, mask, o if keep_o else None)
        ctx.scale, ctx.lead = scale, lead
        ctx.shapes = (dq.shape, dk.shape, dv.shape)
        ctx.dtypes = (dq.dtype, dk.dtype, dv.dtype)
        return do  # fresh: see _tangent_rows

    @staticmethod
    def backward(ctx, g):
        q, k, v, mask, o = ctx.saved_tensors
        c = ctx.scale
        with torch.autocast(q.device.type, enabled=False):
            g = _rows(g, q.dtype)
            p = _probs(q, k, mask, c, ctx.lead)
            if o is None:
                rowsum = (g * mm_accumulate_fp32(p.to(q.dtype), v)).sum(-1, keepdim=True)
            else:  # O in the caller's layout: the row sums without reshaping it
                rowsum = (g.view(o.shape).to(p.dtype) * o).sum(-1, keepdim=True).view(*g.shape[:-1], 1)
            grad_dv = mm_accumulate_fp32(p.transpose(1, 2).to(q.dtype), g)
            gs = p * (mm_accumulate_fp32(g, v.transpose(1, 2)) - rowsum)
            grad_dq = mm_accumulate_fp32(gs.to(q.dtype), k) * c
            grad_dk = mm_accumulate_fp32(gs.transpose(1, 2).to(q.dtype), q) * c
        (sq, sk, sv), (tq, tk, tv) = ctx.shapes, ctx.dtypes
        return (None, None, None, None, grad_dq.view(sq).to(tq), grad_dk.view(sk).to(tk), grad_dv.view(sv).to(tv),
                None, None, None)


def _causal_mask(q: Tensor, k: Tensor) -> Tensor:
    L, S = q.shape[-2], k.shape[-2]
    keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    return additive_mask(keep, torch.float32, attend_when_true=True)


def _run_fused_sdpa(q, dq, k, dk, v, dv, is_causal, scale):
    from .triton_backend import FusedAttentionTangent

    dtype = compute_dtype(q)
    zeros = torch.zeros((), dtype=dtype, device=q.device)
    tans = [(t if t is not None else zeros.expand(ref.shape)).to(dtype) for t, ref in ((dq, q), (dk, k), (dv, v))]
    o, do, _ = FusedAttentionTangent.apply(q.to(dtype), k.to(dtype), v.to(dtype), *tans, scale, is_causal)
    return o, do


def _run_torch_sdpa(q, dq, k, dk, v, dv, is_causal, scale):
    with torch.no_grad():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    return o, _sdpa_tangent(q, dq, k, dk, v, dv, o, None, is_causal, scale)


def attention_runs_triton(q, dq, k, dk, v, dv, is_causal, scale) -> bool:
    """:func:`measured_triton` for the attention tangent: forward and the backward of the
    tangent map (the two paths' backwards differ), on detached copies of the tangents with a
    fixed incoming gradient, so the caller's graph and random state are untouched."""
    def candidates():
        gen = torch.Generator(device=q.device).manual_seed(0)
        g = torch.randn(q.shape[:-1] + v.shape[-1:], generator=gen, device=q.device, dtype=compute_dtype(q))

        def timed(run):
            def once():
                leaves = [None if t is None else t.detach().requires_grad_(True) for t in (dq, dk, dv)]
                with torch.enable_grad():
                    _, do = run(q, leaves[0], k, leaves[1], v, leaves[2], is_causal, scale)
                    do.backward(g.to(do.dtype))
                return [do.detach(), *(leaf.grad for leaf in leaves if leaf is not None)]
            return once
        tensors = [t for t in (q, dq, k, dk, v, dv) if t is not None]
        return tensors, {"torch": timed(_run_torch_sdpa), "triton": timed(_run_fused_sdpa)}

    key = (
        tuple(q.shape),
        k.shape[-2],
        v.shape[-1],
        compute_dtype(q),
        (dq is not None, dk is not None, dv is not None),
        bool(is_causal),
    )
    return measured_triton("attention", key, q.device, candidates)


def _fused_sdpa(q, dq, k, dk, v, dv, attn_mask, is_causal, scale):
    """``(O, dO)`` from the one-pass Triton kernel where the policy takes it for this call
    (no mask other than causal, head size <= 128; forced by "triton", measured faster under
    "auto" on CUDA); otherwise None."""
    if not (attn_mask is None and q.shape[-1] <= 128 and q.dim() >= 3 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        return None
    how = kernel_how("attention", q, k, v, dq, dk, dv)
    if how == "triton" or (how == "measure" and attention_runs_triton(q, dq, k, dk, v, dv, is_causal, scale)):
        return _run_fused_sdpa(q, dq, k, dk, v, dv, is_causal, scale)
    return None


def _sdpa_tangent(q, dq, k, dk, v, dv, o, attn_mask, is_causal, scale, keep_o=False):
    """``dO`` at the primal ``O`` by PyTorch ops (differentiable in the tangents where they
    require grad); ``keep_o``: ``O`` is a view of a tensor the caller keeps (AttentionTangent)."""
    c = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    mask_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = additive_mask(attn_mask, mask_dtype, attend_when_true=True)
    if is_causal:
        causal = _causal_mask(q, k).to(mask_dtype)
        mask = causal if mask is None else mask + causal
    if dq is None or dk is None or dv is None:  # a zero only where a tangent is missing (an op less per call)
        zeros = torch.zeros((), dtype=q.dtype, device=q.device)
        dq = dq if dq is not None else zeros.expand(q.shape)
        dk = dk if dk is not None else zeros.expand(k.shape)
        dv = dv if dv is not None else zeros.expand(v.shape)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (dq, dk, dv)):
        return AttentionTangent.apply(q, k, v, o, dq, dk, dv, mask, c, keep_o)
    return attention_tangent(q, k, v, o, dq, dk, dv, mask, c)


def _check_sdpa(dropout_p, enable_gqa):
    if dropout_p:
        raise NotImplementedError("attention dropout (dropout_p > 0) in a linearized model: the tangent "
                                  "would need the primal's dropout mask; use eval mode or dropout_p=0")
    if enable_gqa:
        raise NotImplementedError("grouped-query attention (enable_gqa=True) in a linearized model")


def dual_sdpa(q, dq, k, dk, v, dv, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention and its tangent. On CUDA (policy "auto"), without a mask
    other than causal: one Triton kernel computes ``O`` and ``dO`` in one pass. Otherwise the
    primal by ``F.scaled_dot_product_attention`` (any backend: flash, memory-efficient, math)
    and the tangent by the one-pass formula in PyTorch ops."""
    _check_sdpa(dropout_p, enable_gqa)
    has_tangent = not (dq is None and dk is None and dv is None)
    fused = _fused_sdpa(q, dq, k, dk, v, dv, attn_mask, is_causal, scale) if has_tangent else None
    if fused is not None:
        return fused
    with torch.no_grad():
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    if not has_tangent:
        return o, None
    return o, _sdpa_tangent(q, dq, k, dk, v, dv, o, attn_mask, is_causal, scale)


def _chunk3(t: Tensor | None, dim: int = 0) -> tuple:
    return (None, None, None) if t is None else t.chunk(3, dim=dim)


def dual_multi_head_attention(query, key, value, num_heads, in_proj, in_proj_bias, out_proj, out_proj_bias,
                              attn_mask=None, key_padding_mask=None, separate_proj=None, is_causal=False):
    """``nn.MultiheadAttention``'s computation (``F.multi_head_attention_forward`` without
    bias_k/bias_v, zero-attention, dropout or returned weights) on dual values. Every
    argument that can carry a tangent is a ``(primal, tangent)`` pair; ``query`` etc. are
    ``(L, N, E)`` or unbatched ``(L, E)``. ``separate_proj``: ``(q, k, v)`` weight pairs
    when nn.MultiheadAttention keeps them apart."""
    batched = query[0].dim() == 3

    def batch(pair):
        p, t = pair
        return (p, t) if batched else (p.unsqueeze(1), t.unsqueeze(1) if t is not None else None)

    same_kv, same_qk = key is value, query is key
    query, key, value = batch(query), batch(key), batch(value)
    key = query if same_qk else key
    value = key if same_kv else value
    L, N, E = query[0].shape
    S = key[0].shape[0]
    H = num_heads
    hd = E // H

    def heads(t: Tensor | None, length: int) -> Tensor | None:  # (len, N, E) -> (N, H, len, hd)
        return None if t is None else t.reshape(length, N, H, hd).permute(1, 2, 0, 3)

    if separate_proj is None and query is key and key is value:
        # Self-attention: one product with the fused weight, as nn.MultiheadAttention does
        # (three would each keep their own contiguous copy of a transposed input).
        qkv, dqkv = dual_linear(*query, *in_proj, *in_proj_bias)
        (q, k, v), (dq, dk, dv) = qkv.chunk(3, dim=-1), _chunk3(dqkv, dim=-1)
    else:  # three products; the fused weight's thirds only here (a split per tensor otherwise wasted)
        if separate_proj is not None:
            (wq, dwq), (wk, dwk), (wv, dwv) = separate_proj
        else:
            (wq, wk, wv), (dwq, dwk, dwv) = in_proj[0].chunk(3), _chunk3(in_proj[1])
        if in_proj_bias[0] is not None:
            (bq, bk, bv), (dbq, dbk, dbv) = in_proj_bias[0].chunk(3), _chunk3(in_proj_bias[1])
        else:
            bq = bk = bv = dbq = dbk = dbv = None
        q, dq = dual_linear(*query, wq, dwq, bq, dbq)
        k, dk = dual_linear(*key, wk, dwk, bk, dbk)
        v, dv = dual_linear(*value, wv, dwv, bv, dbv)
    q, dq, k, dk, v, dv = heads(q, L), heads(dq, L), heads(k, S), heads(dk, S), heads(v, S), heads(dv, S)

    mask = None
    if attn_mask is not None:
        m = additive_mask(attn_mask, q.dtype, attend_when_true=False)
        mask = m.view(1, 1, L, S) if m.dim() == 2 else m.view(N, H, L, S)
    if key_padding_mask is not None:
        kp = additive_mask(key_padding_mask, q.dtype, attend_when_true=False).view(N, 1, 1, S)
        mask = kp if mask is None else mask + kp
    def merge(t: Tensor | None) -> Tensor | None:  # (N, H, L, hd) -> (L, N, E)
        return None if t is None else t.permute(2, 0, 1, 3).reshape(L, N, E)

    causal = is_causal and mask is None
    has_tangent = not (dq is None and dk is None and dv is None)
    fused = _fused_sdpa(q, dq, k, dk, v, dv, mask, causal, None) if has_tangent else None
    if fused is not None:
        attended, dattended = merge(fused[0]), merge(fused[1])
    else:
        with torch.no_grad():
            attended = merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal))
        # The tangent sees O as a view of the output projection's input, which that projection's
        # tangent keeps for its backward when its weight is tuned: the attention backward then
        # reads it rather than computing P V again (and holds no second copy).
        dattended = merge(_sdpa_tangent(q, dq, k, dk, v, dv, heads(attended, L), mask, causal, None,
                                        keep_o=out_proj[1] is not None)) if has_tangent else None
    out, dout = dual_linear(attended, dattended, *out_proj, *out_proj_bias)
    if not batched:
        out, dout = out.squeeze(1), (dout.squeeze(1) if dout is not None else None)
    return out, dout


# ----------------------------------------------------------------------------- torch-function rules
# The entries of fastortho.dual.RULES for these ops (one layer of rules per op, here).


def sdpa_rule(func, args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, args), **kwargs)
    if isinstance(a.get("attn_mask"), Dual):
        return jvp_fallback(func, args, kwargs)
    return wrap(*dual_sdpa(*split(a["query"]), *split(a["key"]), *split(a["value"]),
                               a.get("attn_mask"), a.get("dropout_p", 0.0), a.get("is_causal", False),
                               a.get("scale"), a.get("enable_gqa", False)))


_MHA = parameters(F.multi_head_attention_forward)


def mha_rule(func, args, kwargs):
    g = bind(_MHA, args, kwargs)
    training_dropout = g["training"] and g["dropout_p"] > 0
    if training_dropout:  # a JVP would draw its own dropout mask, not the primal's
        raise NotImplementedError("nn.MultiheadAttention(dropout > 0) in train mode in a linearized model: the "
                                  "tangent would need the primal's dropout mask; use eval mode for the attention "
                                  "(module.eval()) or dropout=0")
    unsupported = (g["bias_k"] is not None or g["bias_v"] is not None or g["add_zero_attn"] or training_dropout
                   or g["need_weights"] or g["static_k"] is not None or g["static_v"] is not None
                   or isinstance(g["attn_mask"], Dual) or isinstance(g["key_padding_mask"], Dual))
    if unsupported:
        # Correct for every configuration (need_weights, bias_k, dropout...), not memory-lean.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return jvp_fallback(func, args, kwargs)
    separate = None
    if g["use_separate_proj_weight"]:
        separate = (split(g["q_proj_weight"]), split(g["k_proj_weight"]), split(g["v_proj_weight"]))
    query = split(g["query"])
    key = query if g["key"] is g["query"] else split(g["key"])  # self-attention stays recognizable
    value = key if g["value"] is g["key"] else split(g["value"])
    out, tan = dual_multi_head_attention(
        query, key, value, g["num_heads"], split(g["in_proj_weight"]),
        split(g["in_proj_bias"]), split(g["out_proj_weight"]), split(g["out_proj_bias"]),
        attn_mask=g["attn_mask"], key_padding_mask=g["key_padding_mask"], separate_proj=separate,
        is_causal=g["is_causal"])
    return wrap(out, tan), None
