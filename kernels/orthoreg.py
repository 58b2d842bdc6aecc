"""OrthoReg over a one-step scratch copy of the updates (docs/design.md section 6): two grouped
Triton launches for the value and ``G - I``; the gradient is a cuBLAS batched product per shape
group (``fastortho/ops/orthoreg/triton_backend.py``), or in "tf32" mode a third launch.

1. :func:`write_deltas`: one persistent launch over tiles of every layer writes ``X^T``
   (``k x big``, row-major; ``X = D`` for tall layers, ``D^T`` for wide ones, ``D = W - W0``)
   in the mode's operand format into one flat scratch buffer laid out by shape group
   (``[L_g, k, big]`` contiguous per group, so the gradient's batched products take views of
   it): bf16 for "bf16" (kept in fp32 under the interpreter, which has no bf16 arithmetic,
   rounded by bit arithmetic: the same products), fp32 for "ieee", and for "tf32" fp16 times a
   per-layer power of two ``s`` (fp16 has tf32's 11-bit significand; the scale keeps the
   layer's largest element near 2**11, far from fp16's overflow and its subnormals).
   The scale comes from the previous call's (the plan keeps it), so the write needs no second
   read of ``W``; the same launch records each layer's ``max |D|``, and a fix-up launch over
   the same tiles rewrites only the layers whose recorded maximum left the safe window with
   the old scale (the first call, a ``D`` that grew 8x), with a scale from the new maximum.
   Its programs decide from values the first launch finished writing, so no program waits.
2. :func:`scratch_gram`: one persistent launch over the upper-triangle tiles ``ti <= tj`` of
   every ``G = X^T X``. Both operand tiles are plain loads of rows of ``X^T`` (contiguous along
   the reduction axis: K-major, what tensor-core products want), so the mainloop is an ordinary
   pipelined GEMM: loads in flight while the products run (fastortho.kernels.resources checks
   the sm_90a compile for it). The epilogue undoes the scale (``1 / s**2``, exact), subtracts
   ``I``, writes the tile's share of ``||G - I||_F^2`` (doubled off the diagonal) to its own
   slot, and stores the tile of ``G - I`` and its mirror into ``[L_g, k, k]`` per group; in
   "tf32" mode it also records ``max |G - I|`` per layer.
3. "tf32" mode only, :func:`scratch_grads`: ``c X (G - I)`` per layer from the fp16 scratch in
   one grouped launch. cuBLAS cannot take it: its fp16 operand ``c (G - I) / s`` would fall
   into fp16's subnormals for small updates, and undoing a second scale costs a pass over the
   gradient. Here ``G - I`` is rounded to fp16 with its own power of two ``t`` (from its
   recorded maximum) and ``c / (s t)`` is applied in the epilogue.

Traffic per element of the regularized weights: read ``W`` and ``W0`` once (8 B in fp32), write
``X^T`` once (2 B in bf16 and fp16, 4 B in fp32), read it for the Gram (about ``2 k / BT`` tile
passes, mostly from L2) and once more for the gradient, write the gradient (4 B).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    PlanCache,
    check_precision,
    device_info,
    gram_tile_epilogue,
    mma,
    pair_plan,
    persistent_grid,
    round_to_bf16,
)

__all__ = ["ScratchConfig", "default_config", "scratch_layout", "scratch_penalty", "write_deltas", "scratch_gram",
           "scratch_grads", "scratch_plan", "delta_kernel", "scratch_gram_kernel", "scratch_grad_kernel",
           "LAYER_FIELDS", "pow2_scale", "keeps_scale", "SCALE_TARGET"]

# The columns of the layer table, one int64 row per layer (the host writes them in this order;
# the kernels read each by its name below):
#   w_off, w0_off   the layer's first element in the weight / base storage (elements)
#   cols            columns of W (its row stride)
#   k, big          min(rows, cols), max(rows, cols)
#   tall            1 when rows >= cols (X = D), 0 when wide (X = D^T)
#   xt_off          the layer's X^T in the scratch; xt_stride: its row stride (big padded to 16)
#   gmi_off         the layer's G - I in the G - I buffer
#   grad_off        the layer's gradient in the "tf32" mode's flat gradient buffer
LAYER_COLUMNS = ("w_off", "w0_off", "cols", "k", "big", "tall", "xt_off", "gmi_off", "xt_stride", "grad_off")
LAYER_FIELDS = len(LAYER_COLUMNS)
(L_W_OFF, L_W0_OFF, L_COLS, L_K, L_BIG, L_TALL, L_XT_OFF, L_GMI_OFF, L_XT_STRIDE,
 L_GRAD_OFF) = (tl.constexpr(i) for i in range(LAYER_FIELDS))
# The columns of a tile table, four int32 per tile: the layer, the tile's two block indices
# (delta pass: row block of X^T, column block; Gram: ti, tj; gradient: block of big, block of
# k) and, for the Gram, the tile's slot of partial sums.
T_LAYER, T_I, T_J, T_SLOT = (tl.constexpr(i) for i in range(4))

# "tf32" mode's fp16 scratch: a layer's largest |D| is scaled into [2**11, 2**12) when its scale
# is (re)chosen; an old scale is kept while that element stays within [2**4, 2**15) (8x growth,
# 128x shrinkage), and the exponent is clamped to [-60, 60] (1 / s**2 stays a normal fp32).
SCALE_TARGET, SCALE_KEEP_LOW, SCALE_KEEP_HIGH, SCALE_EXP_LIMIT = 11, 16.0, 32768.0, 60


@triton.jit
def _pow2_scale(amax):
    # 2**e with amax * 2**e in [2**11, 2**12) (e from amax's exponent bits; 0 and subnormals get
    # the largest e), e clamped to [-60, 60]. Exact: products with it only move exponents.
    e = (amax.to(tl.int32, bitcast=True) >> 23) & 0xFF
    es = tl.minimum(tl.maximum(127 + 11 - e, -60), 60)
    return ((es + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _keeps_scale(amax, s_prev, s_new):
    # Whether the scale a delta launch used still serves: set, no element near fp16's overflow,
    # the largest not so small that precision leaks into subnormals (or nothing to gain).
    m = amax * s_prev
    return ((s_prev > 0) & (m < 32768.0) & ((m >= 16.0) | (amax == 0))) | (s_prev == s_new)


@triton.jit
def delta_kernel(w_base, w0_base, xt_ptr, layer_table, tile_table, num_tiles, prev_scale_ptr, scale_ptr, amax_bits_ptr,
                 NF: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, FORMAT: tl.constexpr,
                 EMULATE_BF16: tl.constexpr, FIXUP: tl.constexpr):
    # X^T[i, b] = D[b, i] (tall) or D[i, b] (wide), for one (BR x BC) tile of one layer.
    # FORMAT "fp16" (the scaled scratch): the first launch (FIXUP False) writes D * scale and
    # records max |D| per layer in amax_bits (int32 bits: order-preserving for values >= 0); the
    # fix-up launch stores the scale each layer ends with in scale_ptr and rewrites only tiles of
    # layers whose old scale no longer serves (the other tiles' loads and stores are masked off).
    pid = tl.program_id(0)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        trow = tile_table + tile * 4  # this tile's row of the tile table
        layer, ti, tb = tl.load(trow + T_LAYER), tl.load(trow + T_I), tl.load(trow + T_J)
        lrow = layer_table + layer * NF  # its layer's row of the layer table
        # Sizes and in-layer indices are int32 (the host checks every layer has fewer than 2**31
        # elements); the offsets into the shared buffers stay int64.
        k, big = tl.load(lrow + L_K).to(tl.int32), tl.load(lrow + L_BIG).to(tl.int32)
        cols = tl.load(lrow + L_COLS).to(tl.int32)
        # Rows of X^T are padded to a multiple of 16 elements at 16-aligned offsets (the host lays
        # them out so): 16-byte aligned rows let the loads be asynchronous copies for bf16 too.
        xt_off = tl.multiple_of(tl.load(lrow + L_XT_OFF), 16)
        xt_stride = tl.multiple_of(tl.load(lrow + L_XT_STRIDE).to(tl.int32), 16)
        tall = tl.load(lrow + L_TALL)
        go = True
        s = 1.0
        if FORMAT == "fp16":
            s = tl.load(prev_scale_ptr + layer)
            if FIXUP:
                amax = tl.load(amax_bits_ptr + layer).to(tl.float32, bitcast=True)
                s_new = _pow2_scale(amax)
                keep = _keeps_scale(amax, s, s_new)
                s = tl.where(keep, s, s_new)
                tl.store(scale_ptr + layer, s)
                go = keep == 0
        offs_i = ti * BR + tl.arange(0, BR)
        offs_b = tb * BC + tl.arange(0, BC)
        mask = (offs_i[:, None] < k) & (offs_b[None, :] < big) & go
        # the padding columns big..xt_stride are written too, as zeros
        out_mask = (offs_i[:, None] < k) & (offs_b[None, :] < xt_stride) & go
        if tall != 0:
            idx = offs_b[None, :] * cols + offs_i[:, None]
        else:
            idx = offs_i[:, None] * cols + offs_b[None, :]
        w_off, w0_off = tl.load(lrow + L_W_OFF), tl.load(lrow + L_W0_OFF)
        d = (tl.load(w_base + w_off + idx, mask=mask, other=0.0).to(tl.float32)
             - tl.load(w0_base + w0_off + idx, mask=mask, other=0.0).to(tl.float32))
        out = xt_ptr + xt_off + offs_i[:, None] * xt_stride + offs_b[None, :]
        if FORMAT == "fp16":
            tl.store(out, (d * s).to(tl.float16), mask=out_mask)
            if not FIXUP:
                amax_tile = tl.max(tl.max(tl.abs(d), axis=1), axis=0)
                tl.atomic_max(amax_bits_ptr + layer, amax_tile.to(tl.int32, bitcast=True))
        elif FORMAT == "bf16":
            if EMULATE_BF16:
                tl.store(out, round_to_bf16(d), mask=out_mask)
            else:
                tl.store(out, d.to(tl.bfloat16), mask=out_mask)
        else:
            tl.store(out, d, mask=out_mask)


@triton.jit
def scratch_gram_kernel(xt_ptr, layer_table, tile_table, num_tiles, gmi_ptr, partial_ptr, scale_ptr, gmax_ptr,
                        NF: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
                        EMULATE_BF16: tl.constexpr, SCALED: tl.constexpr):
    # SCALED: X^T holds fp16 values of D * s (delta_kernel); products of fp16 operands are
    # exact in the fp32 accumulator, and 1 / s**2 undoes the scale exactly.
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(partial_ptr + num_tiles, 0.0)  # the zero slot that pads the per-layer gather
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        trow = tile_table + tile * 4  # this tile's row of the tile table
        layer, ti, tj = tl.load(trow + T_LAYER), tl.load(trow + T_I), tl.load(trow + T_J)
        lrow = layer_table + layer * NF
        k = tl.load(lrow + L_K).to(tl.int32)
        xt_off = tl.multiple_of(tl.load(lrow + L_XT_OFF), 16)
        xt_stride = tl.multiple_of(tl.load(lrow + L_XT_STRIDE).to(tl.int32), 16)
        offs_i = ti * BT + tl.arange(0, BT)
        offs_j = tj * BT + tl.arange(0, BT)
        offs_k = tl.arange(0, BK)
        # Rows past k are clamped to the last row (no mask on them: fewer registers); their
        # products only reach entries of G past k, which the epilogue zeroes.
        rows_i = tl.minimum(offs_i, k - 1)
        rows_j = tl.minimum(offs_j, k - 1)
        xt = xt_ptr + xt_off
        a_ptrs = xt + rows_i[:, None] * xt_stride + offs_k[None, :]
        b_ptrs = xt + rows_j[:, None] * xt_stride + offs_k[None, :]
        acc = tl.zeros((BT, BT), dtype=tl.float32)
        for b0 in range(0, xt_stride, BK):
            # Only the reduction axis is masked (the row padding holds zeros): nothing past it adds.
            in_range = (b0 + offs_k)[None, :] < xt_stride
            a = tl.load(a_ptrs + b0, mask=in_range, other=0.0)
            b = tl.load(b_ptrs + b0, mask=in_range, other=0.0)
            if SCALED:
                acc = tl.dot(a, tl.trans(b), acc)
            else:
                acc = mma(a, tl.trans(b), acc, PRECISION, EMULATE_BF16)
        if SCALED:
            s = tl.load(scale_ptr + layer)
            acc = acc * (1.0 / (s * s))
        # read after the mainloop: nothing the epilogue alone needs is held across it
        slot, gmi_off = tl.load(trow + T_SLOT), tl.load(lrow + L_GMI_OFF)
        gmi, valid = gram_tile_epilogue(acc, offs_i, offs_j, k, ti, tj, partial_ptr, slot)
        if SCALED:  # for the gradient's own fp16 scale of G - I (zero outside the layer)
            gm = tl.max(tl.max(tl.abs(gmi), axis=1), axis=0)
            tl.atomic_max(gmax_ptr + layer, gm.to(tl.int32, bitcast=True))
        g = gmi_ptr + gmi_off
        tl.store(g + offs_i[:, None] * k + offs_j[None, :], gmi, mask=valid)
        if ti != tj:
            tl.store(g + offs_j[:, None] * k + offs_i[None, :], tl.trans(gmi), mask=tl.trans(valid))


@triton.jit
def scratch_grad_kernel(xt_ptr, gmi_ptr, out_ptr, scale_ptr, gmax_ptr, coef_ptr, layer_table, tile_table, num_tiles,
                        NF: tl.constexpr, BT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                        ACCUMULATE: tl.constexpr):
    # One (BN x BT) tile of M X^T = (X M)^T per program step, M = G - I (symmetric), X^T from
    # the fp16 scratch (scale s). M is rounded to fp16 with its own power of two t in
    # registers and is the product's first operand, which a tensor-core product may take from
    # registers; X^T, the second, streams through shared memory by asynchronous copies, so no
    # product waits for a shared-memory store. The epilogue applies c / (s t) and stores into
    # the layer's gradient: [b, j] for tall layers, [j, b] for wide ones (ACCUMULATE: added to
    # what it holds; every element belongs to one tile, so read-modify-write is race-free).
    pid = tl.program_id(0)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        trow = tile_table + tile * 4  # this tile's row of the tile table
        layer, tb, tj = tl.load(trow + T_LAYER), tl.load(trow + T_I), tl.load(trow + T_J)
        lrow = layer_table + layer * NF
        k, big = tl.load(lrow + L_K).to(tl.int32), tl.load(lrow + L_BIG).to(tl.int32)
        xt_off = tl.multiple_of(tl.load(lrow + L_XT_OFF), 16)
        xt_stride = tl.multiple_of(tl.load(lrow + L_XT_STRIDE).to(tl.int32), 16)
        gmi_off, grad_off = tl.load(lrow + L_GMI_OFF), tl.load(lrow + L_GRAD_OFF)
        tall = tl.load(lrow + L_TALL)
        offs_b = tb * BT + tl.arange(0, BT)
        offs_j = tj * BN + tl.arange(0, BN)
        offs_r = tl.arange(0, BK)
        s = tl.load(scale_ptr + layer)
        t = _pow2_scale(tl.load(gmax_ptr + layer).to(tl.float32, bitcast=True))
        xt = xt_ptr + xt_off
        g = gmi_ptr + gmi_off
        acc = tl.zeros((BN, BT), dtype=tl.float32)
        for r0 in range(0, k, BK):
            rows = r0 + offs_r
            m = tl.load(g + offs_j[:, None] * k + rows[None, :], mask=(offs_j[:, None] < k) & (rows[None, :] < k),
                        other=0.0)
            xt_tile = tl.load(xt + rows[:, None] * xt_stride + offs_b[None, :],
                              mask=(rows[:, None] < k) & (offs_b[None, :] < xt_stride), other=0.0)
            acc = tl.dot((m * t).to(tl.float16), xt_tile, acc)
        grad = acc * (1.0 / (s * t)) * tl.load(coef_ptr + layer)
        # The epilogue in two column halves, stored one after the other: with ACCUMULATE only
        # half of the old tile is live beside the product. The whole tile at once spilled at
        # sm_90a (72 B per thread on triton 3.6, 8 B on 3.8); the halves spill on neither and
        # need fewer layout conversions through shared memory (tests/test_kernel_resources.py).
        halves = tl.split(tl.permute(tl.reshape(grad, (BN, 2, BT // 2)), (0, 2, 1)))
        offs_h = tl.arange(0, BT // 2)
        for h in tl.static_range(2):
            part = halves[h]
            cols_b = tb * BT + h * (BT // 2) + offs_h
            valid = (offs_j[:, None] < k) & (cols_b[None, :] < big)
            if tall != 0:
                out = out_ptr + grad_off + cols_b[None, :] * k + offs_j[:, None]
            else:
                out = out_ptr + grad_off + offs_j[:, None] * big + cols_b[None, :]
            if ACCUMULATE:
                part += tl.load(out, mask=valid, other=0.0)
            tl.store(out, part, mask=valid)


# ----------------------------------------------------------------------------- host code


def pow2_scale(amax: float) -> float:
    """The host mirror of the kernels' scale choice (for tests): ``2**e`` with ``amax * 2**e``
    in ``[2**11, 2**12)``, ``e`` clamped to ``[-60, 60]`` (0 and fp32 subnormals get 60)."""
    import math

    if amax != amax or math.isinf(amax):
        return 2.0 ** -SCALE_EXP_LIMIT
    if not amax >= 2.0 ** -126:  # zero and fp32 subnormals
        return 2.0 ** SCALE_EXP_LIMIT
    e = min(max(SCALE_TARGET - (math.frexp(amax)[1] - 1), -SCALE_EXP_LIMIT), SCALE_EXP_LIMIT)
    return 2.0 ** e


def keeps_scale(amax: float, s_prev: float) -> bool:
    """The host mirror of whether a layer keeps the scale its delta launch used."""
    m = amax * s_prev
    return (s_prev > 0 and m < SCALE_KEEP_HIGH and (m >= SCALE_KEEP_LOW or amax == 0)) or s_prev == pow2_scale(amax)

@dataclass(frozen=True)
class ScratchConfig:
    gram_block: int = 128  # BT: Gram tile edge
    gram_k: int = 32  # BK: reduction step of the Gram
    delta_rows: int = 64  # BR x BC: tile of the delta pass
    delta_cols: int = 64
    num_warps: int = 8
    num_stages: int = 3
    delta_warps: int = 4
    programs_per_sm: int = 1
    grad_rows: int = 128  # BT x BN: gradient tile ("tf32" mode), BK its reduction step
    grad_cols: int = 128
    grad_k: int = 32


def default_config(precision: str, device) -> ScratchConfig:
    """The launch configuration on ``device`` (a torch.device or a ``DeviceInfo``): on a GPU
    128 x 128 Gram tiles with three pipeline stages (16-bit operands step 64 deep along the
    reduction, fp32 32: the same bytes per stage)."""
    if not device_info(device).is_cuda:
        # The interpreter: small tiles keep its numpy products cheap on small layers.
        return ScratchConfig(32, 32, 32, 32, num_warps=4, num_stages=1, grad_rows=32, grad_cols=32, grad_k=32)
    return ScratchConfig(gram_k=32 if precision == "ieee" else 64)


def scratch_dtype(precision: str, device) -> torch.dtype:
    """The format of ``X^T`` in the scratch buffer: bf16 for "bf16" (kept in fp32 under the
    interpreter, which has no bf16 arithmetic), fp16 times a per-layer power of two for "tf32"
    (tf32's significand; numpy has fp16, so the interpreter keeps it too), fp32 for "ieee"."""
    if precision == "bf16":
        return torch.bfloat16 if device_info(device).is_cuda else torch.float32
    return torch.float16 if precision == "tf32" else torch.float32


def _format(precision: str) -> str:
    return {"bf16": "bf16", "tf32": "fp16"}.get(precision, "fp32")


@dataclass(frozen=True)
class ScratchLayout:
    """Where each layer's ``X^T`` (``k`` rows of ``stride = round_up(big, 16)`` elements, the
    padding zeros), ``G - I`` (``k x k``) and gradient (``rows x cols``) live, shape group by
    shape group."""
    groups: tuple  # ((rows, cols), layer indices) in order of first appearance
    x_offsets: tuple[int, ...]  # per layer, into the scratch
    g_offsets: tuple[int, ...]  # per layer, into the G - I buffer
    o_offsets: tuple[int, ...]  # per layer, into the gradient buffer ("tf32" mode's kernel)
    group_x: tuple[int, ...]  # per group, its first element in the scratch
    group_g: tuple[int, ...]
    group_o: tuple[int, ...]
    x_numel: int
    g_numel: int
    o_numel: int


@functools.lru_cache(maxsize=64)
def scratch_layout(shapes: tuple[tuple[int, int], ...]) -> ScratchLayout:
    from .layout import round_up

    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s), []).append(i)
    x_off, g_off, o_off = [0] * len(shapes), [0] * len(shapes), [0] * len(shapes)
    group_x, group_g, group_o, xp, gp, op = [], [], [], 0, 0, 0
    for (r, c), idx in groups.items():
        k, stride = min(r, c), round_up(max(r, c), 16)
        group_x.append(xp)
        group_g.append(gp)
        group_o.append(op)
        for i in idx:
            x_off[i], g_off[i], o_off[i] = xp, gp, op
            xp, gp, op = xp + k * stride, gp + k * k, op + r * c
        # each group of X^T and G - I 16-element aligned; the gradient buffer unpadded, since
        # every element of it is written (ViT shapes keep it aligned anyway)
        xp, gp = round_up(xp, 16), round_up(gp, 16)
    return ScratchLayout(tuple((s, tuple(i)) for s, i in groups.items()), tuple(x_off), tuple(g_off), tuple(o_off),
                         tuple(group_x), tuple(group_g), tuple(group_o), xp, gp, op)


@dataclass(frozen=True)
class ScratchTiles:
    delta_tiles: torch.Tensor  # int32 [T0, 4]: layer, row block of X^T, column block, 0
    gram_tiles: torch.Tensor  # int32 [T1, 4]: layer, ti, tj, slot
    slot_gather: torch.Tensor  # int64 [L, max tiles per layer]; padding -> T1 (a zero slot)
    grad_tiles: torch.Tensor  # int32 [T2, 4]: layer, block of big, block of k, 0


@functools.lru_cache(maxsize=64)
def scratch_tiles(shapes: tuple[tuple[int, int], ...], cfg: ScratchConfig) -> ScratchTiles:
    from .layout import triangle_tiles

    delta, grad = [], []
    for layer, (rows, cols) in enumerate(shapes):
        k, big = min(rows, cols), max(rows, cols)
        stride = -(-big // 16) * 16
        delta += [(layer, ti, tb, 0) for ti in range(-(-k // cfg.delta_rows))
                  for tb in range(-(-stride // cfg.delta_cols))]
        grad += [(layer, tb, tj, 0) for tb in range(-(-big // cfg.grad_rows)) for tj in range(-(-k // cfg.grad_cols))]
    gram_tiles, gather = triangle_tiles(shapes, cfg.gram_block)
    return ScratchTiles(torch.tensor(delta, dtype=torch.int32).reshape(-1, 4), gram_tiles, gather,
                        torch.tensor(grad, dtype=torch.int32).reshape(-1, 4))


def _layer_rows(shapes, layout, w_offsets, w0_offsets) -> list[list[int]]:
    """The layer table's rows, each written by column name (:data:`LAYER_COLUMNS`)."""
    rows = []
    for i, ((r, c), dw, dw0) in enumerate(zip(shapes, w_offsets, w0_offsets)):
        row = {"w_off": dw, "w0_off": dw0, "cols": c, "k": min(r, c), "big": max(r, c), "tall": int(r >= c),
               "xt_off": layout.x_offsets[i], "gmi_off": layout.g_offsets[i],
               "xt_stride": -(-max(r, c) // 16) * 16, "grad_off": layout.o_offsets[i]}
        rows.append([row[name] for name in LAYER_COLUMNS])
    return rows


class ScratchPlan:
    """Device tables for one set of (weights, bases) tensors; rebuilt only when a tensor moves.
    Holds the "tf32" mode's per-layer scales between calls (zero: not chosen yet)."""

    def __init__(self, weights, bases, cfg: ScratchConfig):
        device = weights[0].device
        self.shapes = tuple((int(w.shape[0]), int(w.shape[1])) for w in weights)
        self.layout = scratch_layout(self.shapes)
        tiles = scratch_tiles(self.shapes, cfg)
        w_es, w0_es = weights[0].element_size(), bases[0].element_size()
        w_base, w0_base = weights[0].data_ptr(), bases[0].data_ptr()
        offsets = []
        for w, w0 in zip(weights, bases):
            dw, dw0 = w.data_ptr() - w_base, w0.data_ptr() - w0_base
            if dw % w_es or dw0 % w0_es:
                raise ValueError("weights: tensor storage is not element-aligned")
            offsets.append((dw // w_es, dw0 // w0_es))
        rows = _layer_rows(self.shapes, self.layout, *zip(*offsets))
        self.layer_table = torch.tensor(rows, dtype=torch.int64).to(device)
        self.delta_tiles = tiles.delta_tiles.to(device)
        self.gram_tiles = tiles.gram_tiles.to(device)
        self.slot_gather = tiles.slot_gather.to(device)
        self.scale = torch.zeros(len(weights), dtype=torch.float32, device=device)


class GradPlan:
    """The shape-only tables of the "tf32" gradient launch (backward has no weights)."""

    def __init__(self, shapes, cfg: ScratchConfig, device):
        layout = scratch_layout(shapes)
        zeros = [0] * len(shapes)
        self.layout = layout
        self.layer_table = torch.tensor(_layer_rows(shapes, layout, zeros, zeros), dtype=torch.int64).to(device)
        self.grad_tiles = scratch_tiles(shapes, cfg).grad_tiles.to(device)


_PLANS = PlanCache()
_GRAD_PLANS: dict = {}


def scratch_plan(weights, bases, cfg: ScratchConfig) -> ScratchPlan:
    """The cached plan for these exact tensors (validated when it is built)."""
    return pair_plan(_PLANS, weights, bases, cfg, ScratchPlan)


def grad_plan(shapes: tuple[tuple[int, int], ...], cfg: ScratchConfig, device) -> GradPlan:
    key = (shapes, cfg, str(device))
    plan = _GRAD_PLANS.get(key)
    if plan is None:
        if len(_GRAD_PLANS) >= 16:
            _GRAD_PLANS.pop(next(iter(_GRAD_PLANS)))
        plan = _GRAD_PLANS[key] = GradPlan(shapes, cfg, device)
    return plan


def _prepare(weights, bases, precision: str, config: ScratchConfig | None):
    """``(device, config, plan)`` of a launch, the precision checked."""
    device = weights[0].device
    cfg = config or default_config(check_precision(precision), device)
    return device, cfg, scratch_plan(weights, bases, cfg)


def scratch_penalty(weights, bases, precision: str, *, config: ScratchConfig | None = None):
    """Both passes with one plan lookup: ``(||G - I||_F^2 per layer, G - I, the scratch, the
    per-layer scales used, the maxima's bits)``; the last two are empty outside "tf32" mode
    (:func:`write_deltas`)."""
    device = weights[0].device
    cfg = config or default_config(check_precision(precision), device)
    plan = scratch_plan(weights, bases, cfg)
    xt, scales, amax_bits = _write_deltas(weights, bases, precision, device, cfg, plan)
    return (*_scratch_gram(xt, scales, amax_bits, precision, device, cfg, plan), xt, scales, amax_bits)


def write_deltas(weights, bases, precision: str, *, config: ScratchConfig | None = None):
    """Pass 1: ``(xt, scales, amax_bits)``: the flat scratch of every layer's ``X^T``
    (:class:`ScratchLayout`); in "tf32" mode (``xt`` holds fp16 ``X^T * scales[l]``) the fp32
    per-layer scales and an int32 ``[2 L]`` buffer whose first half holds the bits of each
    layer's ``max |D|`` (the second half is the Gram's ``max |G - I|``); empty otherwise."""
    return _write_deltas(weights, bases, precision, *_prepare(weights, bases, precision, config))


def _write_deltas(weights, bases, precision, device, cfg, plan):
    xt = torch.empty(plan.layout.x_numel, dtype=scratch_dtype(precision, device), device=device)
    layers = len(plan.shapes) if precision == "tf32" else 0
    scales = torch.empty(layers, dtype=torch.float32, device=device)
    amax_bits = torch.zeros(2 * layers, dtype=torch.int32, device=device)
    num_tiles = plan.delta_tiles.shape[0]
    passes = (False, True) if precision == "tf32" else (False,)
    for fixup in passes:
        delta_kernel[persistent_grid(num_tiles, device, 4 * cfg.programs_per_sm)](
            weights[0], bases[0], xt, plan.layer_table, plan.delta_tiles, num_tiles, plan.scale, scales, amax_bits,
            NF=LAYER_FIELDS, BR=cfg.delta_rows, BC=cfg.delta_cols, FORMAT=_format(precision),
            EMULATE_BF16=not device_info(device).is_cuda, FIXUP=fixup, num_warps=cfg.delta_warps)
    if layers:
        plan.scale.copy_(scales)  # the next call starts from this call's scales
    return xt, scales, amax_bits


def scratch_gram(weights, bases, xt: torch.Tensor, scales: torch.Tensor, amax_bits: torch.Tensor, precision: str, *,
                 config: ScratchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2: per-layer ``||G - I||_F^2`` (fp32 ``[L]``) and the flat fp32 buffer of every
    ``G - I`` (``[L_g, k, k]`` per group, :class:`ScratchLayout`); ``scales``, ``amax_bits`` from
    :func:`write_deltas` (in "tf32" mode this records ``max |G - I|`` in ``amax_bits``)."""
    return _scratch_gram(xt, scales, amax_bits, precision, *_prepare(weights, bases, precision, config))


def _scratch_gram(xt, scales, amax_bits, precision, device, cfg, plan) -> tuple[torch.Tensor, torch.Tensor]:
    num_tiles = plan.gram_tiles.shape[0]
    layers = len(plan.shapes) if precision == "tf32" else 0
    # one slot per tile and a zero slot that pads the per-layer gather
    partials = torch.empty(num_tiles + 1, dtype=torch.float32, device=device)
    gmi = torch.empty(plan.layout.g_numel, dtype=torch.float32, device=device)
    scratch_gram_kernel[persistent_grid(num_tiles, device, cfg.programs_per_sm)](
        xt, plan.layer_table, plan.gram_tiles, num_tiles, gmi, partials, scales, amax_bits[layers:], NF=LAYER_FIELDS,
        BT=cfg.gram_block, BK=cfg.gram_k, PRECISION=precision, EMULATE_BF16=not device_info(device).is_cuda,
        SCALED=precision == "tf32", num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return partials[plan.slot_gather].sum(dim=1), gmi


def scratch_grads(
    xt: torch.Tensor,
    gmi: torch.Tensor,
    scales: torch.Tensor,
    amax_bits: torch.Tensor,
    coef: torch.Tensor,
    shapes: tuple[tuple[int, int], ...],
    *,
    config: ScratchConfig | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pass 3 ("tf32" mode): the flat fp32 buffer of every layer's ``c_l X (G - I)`` as the
    weight's ``rows x cols`` (:class:`ScratchLayout` ``o_offsets``, ``[L_g, rows, cols]`` per
    group); ``coef``: fp32 ``[L]`` in layer order. With ``out`` (such a buffer), the gradients
    are added to it in place and it is returned."""
    device = xt.device
    cfg = config or default_config("tf32", device)
    plan = grad_plan(tuple(shapes), cfg, device)
    layers = len(shapes)
    accumulate = out is not None
    if accumulate and (out.dtype != torch.float32 or out.numel() != plan.layout.o_numel or not out.is_contiguous()):
        raise ValueError(
            f"out: expected a contiguous fp32 buffer of {plan.layout.o_numel} elements, got "
            f"{out.dtype} of {out.numel()}"
        )
    if not accumulate:
        out = torch.empty(plan.layout.o_numel, dtype=torch.float32, device=device)
    num_tiles = plan.grad_tiles.shape[0]
    scratch_grad_kernel[persistent_grid(num_tiles, device, cfg.programs_per_sm)](
        xt,
        gmi,
        out,
        scales,
        amax_bits[layers:],
        coef,
        plan.layer_table,
        plan.grad_tiles,
        num_tiles,
        NF=LAYER_FIELDS,
        BT=cfg.grad_rows,
        BN=cfg.grad_cols,
        BK=cfg.grad_k,
        ACCUMULATE=accumulate,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return out
