"""Fused dual linear: the primal ``y = x0 W0^T + b0`` and the tangent
``dy = x0 dW^T + dx W0^T + db`` of a linear layer in one kernel.

Each program owns a ``BM x BN`` tile of both outputs and walks the reduction dimension once:
every ``x0`` and ``W0`` tile is loaded once and feeds both the primal product and its share
of the tangent (``x0`` with ``dW``, ``W0`` with ``dx``); accumulation is fp32.

Multi-tangent variant (``dual_linear_multi``): ``T`` tangents of one primal (``dW: T x N x K``,
``dx: T x M x K``), the third grid axis; the primal is not recomputed there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import device_info, dot_precision


@triton.jit
def dual_linear_kernel(x_ptr, dx_ptr, w_ptr, dw_ptr, b_ptr, db_ptr, y_ptr, dy_ptr, M, N, K,
                       sxm, sxk, sdxt, sdxm, sdxk, swn, swk, sdwt, sdwn, sdwk, sdbt, syt, sym, syn,
                       sdyt, sdym, sdyn,
                       HAS_DX: tl.constexpr, HAS_DW: tl.constexpr, HAS_B: tl.constexpr, HAS_DB: tl.constexpr,
                       WRITE_Y: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                       PRECISION: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    t = tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc_y = tl.zeros((BM, BN), dtype=tl.float32)
    acc_dy = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask_x = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        mask_w = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxk, mask=mask_x, other=0.0)
        w = tl.load(w_ptr + offs_n[:, None] * swn + offs_k[None, :] * swk, mask=mask_w, other=0.0)
        if WRITE_Y:
            acc_y = tl.dot(x, tl.trans(w), acc_y, input_precision=PRECISION)
        if HAS_DW:
            dw = tl.load(dw_ptr + t * sdwt + offs_n[:, None] * sdwn + offs_k[None, :] * sdwk, mask=mask_w, other=0.0)
            acc_dy = tl.dot(x, tl.trans(dw.to(x.dtype)), acc_dy, input_precision=PRECISION)
        if HAS_DX:
            dx = tl.load(dx_ptr + t * sdxt + offs_m[:, None] * sdxm + offs_k[None, :] * sdxk, mask=mask_x, other=0.0)
            acc_dy = tl.dot(dx.to(w.dtype), tl.trans(w), acc_dy, input_precision=PRECISION)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if WRITE_Y:
        if HAS_B:
            acc_y += tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + offs_m[:, None] * sym + offs_n[None, :] * syn, acc_y.to(y_ptr.dtype.element_ty), mask=mask)
    if HAS_DB:
        acc_dy += tl.load(db_ptr + t * sdbt + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    tl.store(dy_ptr + t * sdyt + offs_m[:, None] * sdym + offs_n[None, :] * sdyn,
             acc_dy.to(dy_ptr.dtype.element_ty), mask=mask)


def launch_blocks(device) -> tuple[int, int, int, int]:
    """``(BM, BN, BK, num_warps)`` on ``device`` (a torch.device or a ``DeviceInfo``)."""
    if not device_info(device).is_cuda:
        return 32, 32, 32, 4  # the interpreter: small tiles
    return 128, 128, 32, 8


def _strides(t, dims):
    return [0] * dims if t is None else list(t.stride())


def dual_linear(x0: torch.Tensor, dx, w0: torch.Tensor, dw, b0=None, db=None):
    """``(y, dy)`` for 2-D ``x0, dx: M x K``, ``w0, dW: N x K``, ``b0, db: N`` (tangents may be
    None)."""
    M, K = x0.shape
    N = w0.shape[0]
    y = torch.empty((M, N), dtype=x0.dtype, device=x0.device)
    dy = torch.empty((M, N), dtype=x0.dtype, device=x0.device)
    _launch(x0, dx, w0, dw, b0, db, y, dy, M, N, K, tangents=1, write_y=True)
    return y, dy


def dual_linear_multi(x0: torch.Tensor, dx, w0: torch.Tensor, dw, db=None):
    """``dy[t] = x0 dW[t]^T + dx[t] W0^T + db[t]`` for ``T`` tangents (``dx: T x M x K`` or None,
    ``dW: T x N x K`` or None, ``db: T x N`` or None)."""
    M, K = x0.shape
    N = w0.shape[0]
    T = next(t.shape[0] for t in (dx, dw, db) if t is not None)
    dy = torch.empty((T, M, N), dtype=x0.dtype, device=x0.device)
    _launch(x0, dx, w0, dw, None, db, None, dy, M, N, K, tangents=T, write_y=False)
    return dy


def _launch(x0, dx, w0, dw, b0, db, y, dy, M, N, K, tangents, write_y):
    BM, BN, BK, warps = launch_blocks(x0.device)
    multi = tangents > 1 or (dy.dim() == 3)
    sdx = _strides(dx, 3 if multi else 2)
    sdw = _strides(dw, 3 if multi else 2)
    sdb = _strides(db, 2 if multi else 1)
    sdy = list(dy.stride())
    if not multi:  # no tangent axis
        sdx, sdw, sdb, sdy = [0] + sdx, [0] + sdw, [0] + sdb, [0] + sdy
    sy = [0, 0, 0] if y is None else [0] + list(y.stride())
    grid = (triton.cdiv(M, BM), triton.cdiv(N, BN), tangents)
    dual_linear_kernel[grid](
        x0, dx if dx is not None else x0, w0, dw if dw is not None else w0,
        b0 if b0 is not None else w0, db if db is not None else w0, y if y is not None else dy, dy, M, N, K,
        x0.stride(0), x0.stride(1), sdx[0], sdx[1], sdx[2], w0.stride(0), w0.stride(1), sdw[0], sdw[1], sdw[2],
        sdb[0], sy[0], sy[1], sy[2], sdy[0], sdy[1], sdy[2],
        HAS_DX=dx is not None, HAS_DW=dw is not None, HAS_B=b0 is not None, HAS_DB=db is not None,
        WRITE_Y=write_y, BM=BM, BN=BN, BK=BK, PRECISION=dot_precision(x0.dtype), num_warps=warps)
