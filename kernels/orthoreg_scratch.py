"""OrthoReg over a one-step scratch copy of the updates (docs/design.md section 6): two grouped
Triton launches for the value and ``G - I``; the gradient is a cuBLAS batched product per shape
group (``fastortho/ops/orthoreg/scratch_backend.py``).

1. :func:`write_deltas`: one persistent launch over tiles of every layer writes ``X^T``
   (``k x big``, row-major; ``X = D`` for tall layers, ``D^T`` for wide ones, ``D = W - W0``)
   in the mode's operand format, bf16 for "bf16", fp32 for "tf32" and "ieee", into one flat
   scratch buffer laid out by shape group (``[L_g, k, big]`` contiguous per group, so the
   gradient's batched products take views of it). Under the interpreter the bf16 values are
   kept in fp32 (rounded by bit arithmetic), which gives the same products.
2. :func:`scratch_gram`: one persistent launch over the upper-triangle tiles ``ti <= tj`` of
   every ``G = X^T X``. Both operand tiles are plain loads of rows of ``X^T`` (contiguous along
   the reduction axis: K-major, what tensor-core products want), so the mainloop is an ordinary
   pipelined GEMM: loads in flight while the products run (fastortho.kernels.resources checks
   the sm_90a compile for it). The epilogue subtracts ``I``, writes the tile's share of
   ``||G - I||_F^2`` (doubled off the diagonal) to its own slot, and stores the tile of
   ``G - I`` and its mirror into ``[L_g, k, k]`` per group.

Traffic per element of the regularized weights: read ``W`` and ``W0`` once (8 B in fp32), write
``X^T`` once (2 B in bf16, 4 B in fp32), read it for the Gram (about ``2 k / BT`` tile passes,
mostly from L2) and once more for the gradient, write the gradient (4 B).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import PlanCache, check_precision, device_info, gram_tile_epilogue, pair_plan, mma, persistent_grid, round_to_bf16

__all__ = ["ScratchConfig", "default_config", "scratch_layout", "scratch_penalty", "write_deltas", "scratch_gram",
           "scratch_plan", "delta_kernel", "scratch_gram_kernel", "LAYER_FIELDS"]

LAYER_FIELDS = 9  # w_off, w0_off, cols, k, big, tall, x_off, g_off, row stride of X^T (big padded)


@triton.jit
def _layer(layer_table, layer, NF: tl.constexpr):
    row = layer_table + layer * NF
    # Sizes and in-layer indices are int32 (the host checks every layer has fewer than 2**31
    # elements); the offsets into the shared buffers stay int64.
    # Rows of X^T are padded to a multiple of 16 elements at 16-aligned offsets (the host lays
    # them out so): 16-byte aligned rows let the loads be asynchronous copies for bf16 too.
    return (tl.load(row + 0), tl.load(row + 1), tl.load(row + 2).to(tl.int32), tl.load(row + 3).to(tl.int32),
            tl.load(row + 4).to(tl.int32), tl.load(row + 5), tl.multiple_of(tl.load(row + 6), 16), tl.load(row + 7),
            tl.multiple_of(tl.load(row + 8).to(tl.int32), 16))


@triton.jit
def _tile(tile_table, tile):
    # A row of a tile table: (layer, block, block, slot) as four int32.
    row = tile_table + tile * 4
    return tl.load(row + 0), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)


@triton.jit
def delta_kernel(w_base, w0_base, x_ptr, layer_table, tile_table, num_tiles, NF: tl.constexpr, BR: tl.constexpr,
                 BC: tl.constexpr, TO_BF16: tl.constexpr, EMULATE_BF16: tl.constexpr):
    # X^T[i, b] = D[b, i] (tall) or D[i, b] (wide), for one (BR x BC) tile of one layer.
    pid = tl.program_id(0)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        layer, ti, tb, _ = _tile(tile_table, tile)
        w_off, w0_off, cols, k, big, tall, x_off, g_off, stride = _layer(layer_table, layer, NF)
        offs_i = ti * BR + tl.arange(0, BR)
        offs_b = tb * BC + tl.arange(0, BC)
        mask = (offs_i[:, None] < k) & (offs_b[None, :] < big)
        # the padding columns big..stride are written too, as zeros
        out_mask = (offs_i[:, None] < k) & (offs_b[None, :] < stride)
        if tall != 0:
            idx = offs_b[None, :] * cols + offs_i[:, None]
        else:
            idx = offs_i[:, None] * cols + offs_b[None, :]
        d = (tl.load(w_base + w_off + idx, mask=mask, other=0.0).to(tl.float32)
             - tl.load(w0_base + w0_off + idx, mask=mask, other=0.0).to(tl.float32))
        out = x_ptr + x_off + offs_i[:, None] * stride + offs_b[None, :]
        if TO_BF16:
            if EMULATE_BF16:
                tl.store(out, round_to_bf16(d), mask=out_mask)
            else:
                tl.store(out, d.to(tl.bfloat16), mask=out_mask)
        else:
            tl.store(out, d, mask=out_mask)


@triton.jit
def scratch_gram_kernel(x_ptr, layer_table, tile_table, num_tiles, gmi_ptr, partial_ptr, NF: tl.constexpr,
                        BT: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(partial_ptr + num_tiles, 0.0)  # the zero slot that pads the per-layer gather
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        layer, ti, tj, slot = _tile(tile_table, tile)
        w_off, w0_off, cols, k, big, tall, x_off, g_off, stride = _layer(layer_table, layer, NF)
        offs_i = ti * BT + tl.arange(0, BT)
        offs_j = tj * BT + tl.arange(0, BT)
        offs_k = tl.arange(0, BK)
        # Rows past k are clamped to the last row (no mask on them: fewer registers); their
        # products only reach entries of G past k, which the epilogue zeroes.
        rows_i = tl.minimum(offs_i, k - 1)
        rows_j = tl.minimum(offs_j, k - 1)
        x = x_ptr + x_off
        a_ptrs = x + rows_i[:, None] * stride + offs_k[None, :]
        b_ptrs = x + rows_j[:, None] * stride + offs_k[None, :]
        acc = tl.zeros((BT, BT), dtype=tl.float32)
        for b0 in range(0, stride, BK):
            # Only the reduction axis is masked (the row padding holds zeros): nothing past it adds.
            in_range = (b0 + offs_k)[None, :] < stride
            a = tl.load(a_ptrs + b0, mask=in_range, other=0.0)
            b = tl.load(b_ptrs + b0, mask=in_range, other=0.0)
            acc = mma(a, tl.trans(b), acc, PRECISION, EMULATE_BF16)
        gmi, valid = gram_tile_epilogue(acc, offs_i, offs_j, k, ti, tj, partial_ptr, slot)
        g = gmi_ptr + g_off
        tl.store(g + offs_i[:, None] * k + offs_j[None, :], gmi, mask=valid)
        if ti != tj:
            tl.store(g + offs_j[:, None] * k + offs_i[None, :], tl.trans(gmi), mask=tl.trans(valid))


# ----------------------------------------------------------------------------- host code

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


def default_config(precision: str, device) -> ScratchConfig:
    """The launch configuration on ``device`` (a torch.device or a ``DeviceInfo``): on a GPU
    128 x 128 Gram tiles with three pipeline stages (bf16 steps 64 deep along the reduction,
    fp32 32: the same bytes per stage)."""
    if not device_info(device).is_cuda:
        # The interpreter: small tiles keep its numpy products cheap on small layers.
        return ScratchConfig(32, 32, 32, 32, num_warps=4, num_stages=1)
    return ScratchConfig(gram_k=64 if precision == "bf16" else 32)


def scratch_dtype(precision: str, device) -> torch.dtype:
    """The format of ``X^T`` in the scratch buffer: bf16 for "bf16" (kept in fp32 under the
    interpreter, which has no bf16 arithmetic), fp32 for "tf32" and "ieee"."""
    if precision == "bf16" and device_info(device).is_cuda:
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class ScratchLayout:
    """Where each layer's ``X^T`` (``k`` rows of ``stride = round_up(big, 16)`` elements, the
    padding zeros) and ``G - I`` (``k x k``) live, shape group by shape group."""
    groups: tuple  # ((rows, cols), layer indices) in order of first appearance
    x_offsets: tuple[int, ...]  # per layer, into the scratch
    g_offsets: tuple[int, ...]  # per layer, into the G - I buffer
    group_x: tuple[int, ...]  # per group, its first element in the scratch
    group_g: tuple[int, ...]
    x_numel: int
    g_numel: int


@functools.lru_cache(maxsize=64)
def scratch_layout(shapes: tuple[tuple[int, int], ...]) -> ScratchLayout:
    from .layout import round_up

    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s), []).append(i)
    x_off, g_off = [0] * len(shapes), [0] * len(shapes)
    group_x, group_g, xp, gp = [], [], 0, 0
    for (r, c), idx in groups.items():
        k, stride = min(r, c), round_up(max(r, c), 16)
        group_x.append(xp)
        group_g.append(gp)
        for i in idx:
            x_off[i], g_off[i] = xp, gp
            xp, gp = xp + k * stride, gp + k * k
        xp, gp = round_up(xp, 16), round_up(gp, 16)  # each group 16-element aligned
    return ScratchLayout(tuple((s, tuple(i)) for s, i in groups.items()), tuple(x_off), tuple(g_off),
                         tuple(group_x), tuple(group_g), xp, gp)


@dataclass(frozen=True)
class ScratchTiles:
    delta_tiles: torch.Tensor  # int32 [T0, 4]: layer, row block of X^T, column block, 0
    gram_tiles: torch.Tensor  # int32 [T1, 4]: layer, ti, tj, slot
    slot_gather: torch.Tensor  # int64 [L, max tiles per layer]; padding -> T1 (a zero slot)


@functools.lru_cache(maxsize=64)
def scratch_tiles(shapes: tuple[tuple[int, int], ...], cfg: ScratchConfig) -> ScratchTiles:
    from .layout import triangle_tiles

    delta = []
    for layer, (rows, cols) in enumerate(shapes):
        k, stride = min(rows, cols), -(-max(rows, cols) // 16) * 16
        delta += [(layer, ti, tb, 0) for ti in range(-(-k // cfg.delta_rows))
                  for tb in range(-(-stride // cfg.delta_cols))]
    gram_tiles, gather = triangle_tiles(shapes, cfg.gram_block)
    return ScratchTiles(torch.tensor(delta, dtype=torch.int32).reshape(-1, 4), gram_tiles, gather)


class ScratchPlan:
    """Device tables for one set of (weights, bases) tensors; rebuilt only when a tensor moves."""

    def __init__(self, weights, bases, cfg: ScratchConfig):
        device = weights[0].device
        self.shapes = tuple((int(w.shape[0]), int(w.shape[1])) for w in weights)
        self.layout = scratch_layout(self.shapes)
        tiles = scratch_tiles(self.shapes, cfg)
        w_es, w0_es = weights[0].element_size(), bases[0].element_size()
        w_base, w0_base = weights[0].data_ptr(), bases[0].data_ptr()
        rows = []
        for i, ((r, c), w, w0) in enumerate(zip(self.shapes, weights, bases)):
            dw, dw0 = w.data_ptr() - w_base, w0.data_ptr() - w0_base
            if dw % w_es or dw0 % w0_es:
                raise ValueError("weights: tensor storage is not element-aligned")
            rows.append([dw // w_es, dw0 // w0_es, c, min(r, c), max(r, c), int(r >= c), self.layout.x_offsets[i],
                         self.layout.g_offsets[i], -(-max(r, c) // 16) * 16])
        self.layer_table = torch.tensor(rows, dtype=torch.int64).to(device)
        self.delta_tiles = tiles.delta_tiles.to(device)
        self.gram_tiles = tiles.gram_tiles.to(device)
        self.slot_gather = tiles.slot_gather.to(device)


_PLANS = PlanCache()


def scratch_plan(weights, bases, cfg: ScratchConfig) -> ScratchPlan:
    """The cached plan for these exact tensors (validated when it is built)."""
    return pair_plan(_PLANS, weights, bases, cfg, ScratchPlan)


def _prepare(weights, bases, precision: str, config: ScratchConfig | None):
    """``(device, config, plan)`` of a launch, the precision checked."""
    device = weights[0].device
    cfg = config or default_config(check_precision(precision), device)
    return device, cfg, scratch_plan(weights, bases, cfg)


def scratch_penalty(weights, bases, precision: str, *,
                    config: ScratchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Both passes with one plan lookup: ``(||G - I||_F^2 per layer, the scratch, G - I)``."""
    prepared = _prepare(weights, bases, precision, config)
    x = _write_deltas(weights, bases, precision, *prepared)
    return (*_scratch_gram(x, precision, *prepared), x)


def write_deltas(weights, bases, precision: str, *, config: ScratchConfig | None = None) -> torch.Tensor:
    """Pass 1: the flat scratch of every layer's ``X^T`` (:class:`ScratchLayout`)."""
    return _write_deltas(weights, bases, precision, *_prepare(weights, bases, precision, config))


def _write_deltas(weights, bases, precision, device, cfg, plan) -> torch.Tensor:
    x = torch.empty(plan.layout.x_numel, dtype=scratch_dtype(precision, device), device=device)
    num_tiles = plan.delta_tiles.shape[0]
    delta_kernel[persistent_grid(num_tiles, device, 4 * cfg.programs_per_sm)](
        weights[0], bases[0], x, plan.layer_table, plan.delta_tiles, num_tiles, NF=LAYER_FIELDS,
        BR=cfg.delta_rows, BC=cfg.delta_cols, TO_BF16=precision == "bf16", EMULATE_BF16=not device_info(device).is_cuda,
        num_warps=cfg.delta_warps)
    return x


def scratch_gram(weights, bases, x: torch.Tensor, precision: str, *,
                 config: ScratchConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 2: per-layer ``||G - I||_F^2`` (fp32 ``[L]``) and the flat fp32 buffer of every
    ``G - I`` (``[L_g, k, k]`` per group, :class:`ScratchLayout`)."""
    return _scratch_gram(x, precision, *_prepare(weights, bases, precision, config))


def _scratch_gram(x, precision, device, cfg, plan) -> tuple[torch.Tensor, torch.Tensor]:
    num_tiles = plan.gram_tiles.shape[0]
    # one slot per tile and a zero slot that pads the per-layer gather
    partials, gmi = (torch.empty(n, dtype=torch.float32, device=device) for n in (num_tiles + 1, plan.layout.g_numel))
    scratch_gram_kernel[persistent_grid(num_tiles, device, cfg.programs_per_sm)](
        x, plan.layer_table, plan.gram_tiles, num_tiles, gmi, partials, NF=LAYER_FIELDS, BT=cfg.gram_block,
        BK=cfg.gram_k, PRECISION=precision, EMULATE_BF16=not device_info(device).is_cuda,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return partials[plan.slot_gather].sum(dim=1), gmi
