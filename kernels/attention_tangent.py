"""One-pass attention with its tangent (docs/design.md section 7, Lu & Song 2024 App. F).

Forward: flash-style online softmax over key blocks producing ``O = softmax(c Q K^T) V`` and
``dO = (P * dS) V - rowsum(P * dS) O + P dV``, ``dS = c (dQ K^T + Q dK^T)``, together. Per
query block it keeps ``l``, ``O~ = sum p V``, ``A~ = sum p dV``, ``B~ = sum (p * dS) V`` and
``r~ = rowsum(p * dS)``, all rescaled by ``exp(m_old - m_new)``; it also writes the row
log-sum-exp for backward.

Backward of the tangent map ``(dQ, dK, dV) -> dO`` at fixed ``Q, K, V`` (what a linearized
model's training step needs), from ``Q, K, V`` and the log-sum-exp only:
``g_S = P * (g V^T - delta)``, ``delta = rowsum(g * O)``; ``grad dQ = c g_S K``,
``grad dK = c g_S^T Q``, ``grad dV = P^T g``. One kernel per query block recomputes ``O``
(for ``delta``) and accumulates ``grad dQ``; one per key block accumulates ``grad dK`` and
``grad dV``. Inputs are ``[batch * heads, length, head_dim]``; the head dim is padded to a
power of two inside (64, 80 and 128 all work); optional causal masking.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import device_info, dot_precision


@triton.jit
def _scores(q, k, offs_m, offs_n, S, scale, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    valid = offs_n[None, :] < S
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None])
    return tl.where(valid, s, float("-inf"))


@triton.jit
def attention_tangent_fwd(q_ptr, k_ptr, v_ptr, dq_ptr, dk_ptr, dv_ptr, o_ptr, do_ptr, lse_ptr, L, S, D, scale,
                          BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, CAUSAL: tl.constexpr,
                          PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    q_off = bh * L * D
    kv_off = bh * S * D
    mask_q = (offs_m[:, None] < L) & (offs_d[None, :] < D)
    q = tl.load(q_ptr + q_off + offs_m[:, None] * D + offs_d[None, :], mask=mask_q, other=0.0)
    dq = tl.load(dq_ptr + q_off + offs_m[:, None] * D + offs_d[None, :], mask=mask_q, other=0.0)
    m_i = tl.full((BM,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BM,), dtype=tl.float32)
    r_i = tl.zeros((BM,), dtype=tl.float32)
    o = tl.zeros((BM, BD), dtype=tl.float32)
    a = tl.zeros((BM, BD), dtype=tl.float32)
    b = tl.zeros((BM, BD), dtype=tl.float32)
    for n0 in range(0, S, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_k = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        idx = kv_off + offs_n[:, None] * D + offs_d[None, :]
        k = tl.load(k_ptr + idx, mask=mask_k, other=0.0)
        v = tl.load(v_ptr + idx, mask=mask_k, other=0.0)
        dk = tl.load(dk_ptr + idx, mask=mask_k, other=0.0)
        dv = tl.load(dv_ptr + idx, mask=mask_k, other=0.0)
        s = _scores(q, k, offs_m, offs_n, S, scale, CAUSAL, PRECISION)
        ds = (
            tl.dot(dq, tl.trans(k), input_precision=PRECISION) + tl.dot(q, tl.trans(dk), input_precision=PRECISION)
        ) * scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        pds = p * ds
        l_i = alpha * l_i + tl.sum(p, 1)
        r_i = alpha * r_i + tl.sum(pds, 1)
        o = alpha[:, None] * o + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        a = alpha[:, None] * a + tl.dot(p.to(dv.dtype), dv, input_precision=PRECISION)
        b = alpha[:, None] * b + tl.dot(pds.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    out = o / l_i[:, None]
    tangent = (a + b) / l_i[:, None] - (r_i / l_i)[:, None] * out
    tl.store(o_ptr + q_off + offs_m[:, None] * D + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=mask_q)
    tl.store(do_ptr + q_off + offs_m[:, None] * D + offs_d[None, :], tangent.to(do_ptr.dtype.element_ty), mask=mask_q)
    tl.store(lse_ptr + bh * L + offs_m, m_i + tl.log(l_i), mask=offs_m < L)


@triton.jit
def attention_tangent_bwd_dq(q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, gdq_ptr, L, S, D, scale,
                             BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, CAUSAL: tl.constexpr,
                             PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    q_off = bh * L * D
    kv_off = bh * S * D
    mask_q = (offs_m[:, None] < L) & (offs_d[None, :] < D)
    q = tl.load(q_ptr + q_off + offs_m[:, None] * D + offs_d[None, :], mask=mask_q, other=0.0)
    g = tl.load(g_ptr + q_off + offs_m[:, None] * D + offs_d[None, :], mask=mask_q, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + bh * L + offs_m, mask=offs_m < L, other=0.0)
    # O, recomputed (not saved), for delta = rowsum(g * O)
    o = tl.zeros((BM, BD), dtype=tl.float32)
    for n0 in range(0, S, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_k = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        k = tl.load(k_ptr + kv_off + offs_n[:, None] * D + offs_d[None, :], mask=mask_k, other=0.0)
        v = tl.load(v_ptr + kv_off + offs_n[:, None] * D + offs_d[None, :], mask=mask_k, other=0.0)
        p = tl.exp(_scores(q, k, offs_m, offs_n, S, scale, CAUSAL, PRECISION) - lse[:, None])
        o += tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    delta = tl.sum(g * o, 1)
    tl.store(delta_ptr + bh * L + offs_m, delta, mask=offs_m < L)
    gdq = tl.zeros((BM, BD), dtype=tl.float32)
    for n0 in range(0, S, BN):
        offs_n = n0 + tl.arange(0, BN)
        mask_k = (offs_n[:, None] < S) & (offs_d[None, :] < D)
        k = tl.load(k_ptr + kv_off + offs_n[:, None] * D + offs_d[None, :], mask=mask_k, other=0.0)
        v = tl.load(v_ptr + kv_off + offs_n[:, None] * D + offs_d[None, :], mask=mask_k, other=0.0)
        p = tl.exp(_scores(q, k, offs_m, offs_n, S, scale, CAUSAL, PRECISION) - lse[:, None])
        gs = p * (tl.dot(g.to(v.dtype), tl.trans(v), input_precision=PRECISION) - delta[:, None])
        gdq += tl.dot(gs.to(k.dtype), k, input_precision=PRECISION)
    tl.store(gdq_ptr + q_off + offs_m[:, None] * D + offs_d[None, :], (gdq * scale).to(gdq_ptr.dtype.element_ty),
             mask=mask_q)


@triton.jit
def attention_tangent_bwd_dkdv(q_ptr, k_ptr, v_ptr, g_ptr, lse_ptr, delta_ptr, gdk_ptr, gdv_ptr, L, S, D, scale,
                               BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, CAUSAL: tl.constexpr,
                               PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    offs_n = pid_n * BN + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    q_off = bh * L * D
    kv_off = bh * S * D
    mask_k = (offs_n[:, None] < S) & (offs_d[None, :] < D)
    k = tl.load(k_ptr + kv_off + offs_n[:, None] * D + offs_d[None, :], mask=mask_k, other=0.0)
    v = tl.load(v_ptr + kv_off + offs_n[:, None] * D + offs_d[None, :], mask=mask_k, other=0.0)
    gdk = tl.zeros((BN, BD), dtype=tl.float32)
    gdv = tl.zeros((BN, BD), dtype=tl.float32)
    for m0 in range(0, L, BM):
        offs_m = m0 + tl.arange(0, BM)
        mask_q = (offs_m[:, None] < L) & (offs_d[None, :] < D)
        q = tl.load(q_ptr + q_off + offs_m[:, None] * D + offs_d[None, :], mask=mask_q, other=0.0)
        g = tl.load(g_ptr + q_off + offs_m[:, None] * D + offs_d[None, :], mask=mask_q, other=0.0)
        lse = tl.load(lse_ptr + bh * L + offs_m, mask=offs_m < L, other=0.0)
        delta = tl.load(delta_ptr + bh * L + offs_m, mask=offs_m < L, other=0.0)
        p = tl.exp(_scores(q, k, offs_m, offs_n, S, scale, CAUSAL, PRECISION) - lse[:, None])
        p = tl.where(offs_m[:, None] < L, p, 0.0)
        gs = p * (tl.dot(g.to(v.dtype), tl.trans(v), input_precision=PRECISION) - delta[:, None])
        gdv += tl.dot(tl.trans(p).to(g.dtype), g, input_precision=PRECISION)
        gdk += tl.dot(tl.trans(gs).to(q.dtype), q, input_precision=PRECISION)
    idx = kv_off + offs_n[:, None] * D + offs_d[None, :]
    tl.store(gdk_ptr + idx, (gdk * scale).to(gdk_ptr.dtype.element_ty), mask=mask_k)
    tl.store(gdv_ptr + idx, gdv.to(gdv_ptr.dtype.element_ty), mask=mask_k)


# Shared memory of the fp32 forward kernel at head dims 65-128 (BM=64, BN=32, BD=128, 8 warps),
# read off its sm_90a compile (fastortho.kernels.resources): 64 KiB per pipeline stage plus
# 64 KiB; bf16 needs less. Used to pick the deepest pipeline the device's blocks can hold.
_WIDE_STAGE_BYTES, _WIDE_FIXED_BYTES = 65536, 65536


def launch_config(device, head_dim: int, dtype: torch.dtype) -> dict:
    """Blocks, warps and stages on ``device`` (a torch.device or a ``DeviceInfo``) for
    ``dtype`` operands."""
    info = device_info(device)
    bd = max(16, triton.next_power_of_2(head_dim))
    if not info.is_cuda:
        return dict(BM=16, BN=16, BD=bd, num_warps=4, num_stages=1)
    if bd <= 64:
        # fp32 operands at BN=64 spill at sm_90a (forward 116 B per thread on triton 3.6, 80 B on
        # 3.8; dK/dV 128 / 64 B); BN=32 spills on neither version and halves the shared memory
        # of the forward (tests/test_kernel_resources.py). 16-bit operands fit at BN=64.
        return dict(BM=64, BN=32 if dtype == torch.float32 else 64, BD=bd, num_warps=4, num_stages=3)
    # Head dims 65-128: three stages need 256 KiB, beyond the 227 KiB of an H100 block (the
    # launch would fail); two stages and 8 warps fit (192 KiB) and spill least
    # (tests/test_kernel_resources.py checks the budget at sm_90a).
    stages = 3
    while stages > 1 and _WIDE_FIXED_BYTES + stages * _WIDE_STAGE_BYTES > info.shared_per_block:
        stages -= 1
    return dict(BM=64, BN=32, BD=bd, num_warps=8, num_stages=stages)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-2], t.shape[-1]).contiguous()


def attention_with_tangent(q, k, v, dq, dk, dv, scale: float | None = None, causal: bool = False):
    """``(O, dO, lse)`` for ``[..., L, D]`` queries and ``[..., S, D]`` keys/values (the
    leading dims flattened into batch x heads)."""
    shape = q.shape
    L, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    qf, kf, vf, dqf, dkf, dvf = (_flat(t) for t in (q, k, v, dq, dk, dv))
    BH = qf.shape[0]
    c = scale if scale is not None else 1.0 / math.sqrt(D)
    # outputs allocated in their final (contiguous) shape and returned as they are: never a
    # view of a buffer (torch 2.11's dynamo loses the gradient of a Function returning one)
    o = torch.empty(shape, dtype=q.dtype, device=q.device)
    do = torch.empty(shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((BH, L), dtype=torch.float32, device=q.device)
    cfg = launch_config(q.device, D, q.dtype)
    grid = (triton.cdiv(L, cfg["BM"]), BH)
    attention_tangent_fwd[grid](
        qf,
        kf,
        vf,
        dqf,
        dkf,
        dvf,
        o,
        do,
        lse,
        L,
        S,
        D,
        c,
        BM=cfg["BM"],
        BN=cfg["BN"],
        BD=cfg["BD"],
        CAUSAL=causal,
        PRECISION=dot_precision(q.dtype),
        num_warps=cfg["num_warps"],
        num_stages=cfg["num_stages"],
    )
    return o, do, lse


def attention_tangent_backward(q, k, v, lse, g, scale: float | None = None, causal: bool = False):
    """Gradients ``(grad dQ, grad dK, grad dV)`` of ``<g, dO>`` at fixed ``Q, K, V``."""
    L, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    qf, kf, vf, gf = (_flat(t) for t in (q, k, v, g))
    BH = qf.shape[0]
    c = scale if scale is not None else 1.0 / math.sqrt(D)
    delta = torch.empty((BH, L), dtype=torch.float32, device=q.device)
    gdq, gdk, gdv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
    cfg = launch_config(q.device, D, q.dtype)
    prec = dot_precision(q.dtype)
    attention_tangent_bwd_dq[(triton.cdiv(L, cfg["BM"]), BH)](
        qf, kf, vf, gf, lse, delta, gdq, L, S, D, c, BM=cfg["BM"], BN=cfg["BN"], BD=cfg["BD"], CAUSAL=causal,
        PRECISION=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    attention_tangent_bwd_dkdv[(triton.cdiv(S, cfg["BN"]), BH)](
        qf, kf, vf, gf, lse, delta, gdk, gdv, L, S, D, c, BM=cfg["BM"], BN=cfg["BN"], BD=cfg["BD"], CAUSAL=causal,
        PRECISION=prec, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return gdq, gdk, gdv
