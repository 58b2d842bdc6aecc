"""OrthoReg penalty and gradient for every regularized layer of a model, in two grouped,
persistent Triton launches.

Notation (docs/design.md section 1): a layer's update ``D = W - W0`` (out x in, row-major). ``X`` is
``D`` for tall layers (out >= in) and ``D^T`` for wide ones, so ``G = X^T X`` is always the
Gram of the smaller side, ``k x k``, and the gradient is ``grad_X = c X (G - I)``.

- Phase 1 (:func:`gram_penalty`): one program per upper-triangle tile ``(ti <= tj)`` of each
  layer's ``G``. It forms ``D`` tiles on the fly from ``W`` and ``W0`` (``D`` is never written),
  accumulates ``X^T X`` in fp32, subtracts ``I`` on diagonal tiles, writes the tile of
  ``G - I`` and its mirror, and writes the tile's share of ``||G - I||_F^2`` (doubled off the
  diagonal) to its own slot; the per-layer sums are a deterministic gather + sum on the host.
- Phase 2 (:func:`penalty_grad`): one program per ``(rows, cols)`` tile of each layer's
  gradient, ``c_l * X (G - I)`` with ``D`` again formed on the fly, stored in the layer's own
  layout into one flat buffer.

Layers are described by a table of element offsets relative to the first weight / base
tensor (the launch's pointer arguments), so one launch serves layers of every shape. Programs
are persistent (about one per SM) and walk a tile table sorted by cost, largest first.

Precision: the modes of docs/design.md section 4, through :func:`._common.operand` and
:func:`._common.mma`; fp32 accumulation always.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import PlanCache, check_precision, device_info, gram_tile_epilogue, pair_plan, mma, operand, persistent_grid
from .layout import gmi_layout, grad_layout, layer_views, round_up, triangle_tiles

__all__ = ["KernelConfig", "default_config", "gram_penalty", "penalty_grad", "layer_views", "launch_plan",
           "gram_penalty_kernel", "penalty_grad_kernel", "LAYER_FIELDS"]


# ----------------------------------------------------------------------------- device code


@triton.jit
def _delta_tile(w_ptr, w0_ptr, rows, cols, offs_r, offs_c, cols_stride, MASK_R: tl.constexpr, MASK_C: tl.constexpr):
    # D[offs_r, offs_c] in fp32. A masked axis reads zeros past the matrix (a reduction axis:
    # those terms must vanish); an unmasked one clamps its index to the last row / column, so
    # the tile holds copies of real entries there, which only reach outputs that the caller
    # masks out (rows / columns of G or of the gradient past k or big). Fewer masks, fewer
    # registers (a mask costs one per element).
    if MASK_R:
        r_ok = offs_r < rows
    else:
        offs_r = tl.minimum(offs_r, rows - 1)
    if MASK_C:
        c_ok = offs_c < cols
    else:
        offs_c = tl.minimum(offs_c, cols - 1)
    idx = offs_r[:, None] * cols_stride + offs_c[None, :]
    if MASK_R:
        if MASK_C:
            mask = r_ok[:, None] & c_ok[None, :]
        else:
            mask = r_ok[:, None]
        w = tl.load(w_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        w0 = tl.load(w0_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        if MASK_C:
            w = tl.load(w_ptr + idx, mask=c_ok[None, :], other=0.0).to(tl.float32)
            w0 = tl.load(w0_ptr + idx, mask=c_ok[None, :], other=0.0).to(tl.float32)
        else:
            w = tl.load(w_ptr + idx).to(tl.float32)
            w0 = tl.load(w0_ptr + idx).to(tl.float32)
    return w - w0


@triton.jit
def _layer(layer_table, layer, NF: tl.constexpr, ALIGNED: tl.constexpr):
    row = layer_table + layer * NF
    w_off = tl.load(row + 0)
    w0_off = tl.load(row + 1)
    # Sizes and in-layer element indices are int32 (the host checks every layer has fewer
    # than 2**31 elements): 64-bit index tensors cost twice the registers in every tile.
    cols = tl.load(row + 2).to(tl.int32)
    k = tl.load(row + 3).to(tl.int32)
    big = tl.load(row + 4).to(tl.int32)
    tall = tl.load(row + 5)
    # G - I is stored with rows padded to kp, a multiple of 16, at 16-aligned offsets, so
    # its tiles load and store vectorized whatever k is.
    g_off = tl.multiple_of(tl.load(row + 6), 16)
    kp = tl.multiple_of(tl.load(row + 7).to(tl.int32), 16)
    out_off = tl.load(row + 8)
    if ALIGNED:
        # Host checked: every weight offset and row length is a multiple of 16 elements.
        w_off = tl.multiple_of(w_off, 16)
        w0_off = tl.multiple_of(w0_off, 16)
        cols = tl.multiple_of(cols, 16)
        out_off = tl.multiple_of(out_off, 16)
    return w_off, w0_off, cols, k, big, tall, g_off, kp, out_off


@triton.jit
def _gram_tile(w_ptr, w0_ptr, cols, k, big, offs_i, offs_j, TALL: tl.constexpr, DIAG: tl.constexpr,
               BT: tl.constexpr, BK: tl.constexpr, PRECISION: tl.constexpr,
               EMULATE_BF16: tl.constexpr):
    # sum over b of X[b, i] X[b, j] for the tile (offs_i, offs_j) of G = X^T X. A diagonal
    # tile (offs_i == offs_j) loads its one block of D once and uses it for both operands.
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    for b0 in range(0, big, BK):
        offs_b = b0 + tl.arange(0, BK)
        # Only the reduction axis b is masked: entries of G past k are never stored or summed.
        if TALL:  # X = D: D[b, i], contiguous along i
            d_i = _delta_tile(w_ptr, w0_ptr, big, k, offs_b, offs_i, cols, True, False)
            if DIAG:
                d_j = d_i
            else:
                d_j = _delta_tile(w_ptr, w0_ptr, big, k, offs_b, offs_j, cols, True, False)
            a = tl.trans(d_i)
            b = d_j
        else:  # X = D^T: D[i, b], contiguous along b
            d_i = _delta_tile(w_ptr, w0_ptr, k, big, offs_i, offs_b, cols, False, True)
            if DIAG:
                d_j = d_i
            else:
                d_j = _delta_tile(w_ptr, w0_ptr, k, big, offs_j, offs_b, cols, False, True)
            a = d_i
            b = tl.trans(d_j)
        acc = mma(operand(a, PRECISION, EMULATE_BF16), operand(b, PRECISION, EMULATE_BF16),
                   acc, PRECISION, EMULATE_BF16)
    return acc


@triton.jit
def gram_penalty_kernel(w_base, w0_base, layer_table, tile_table, num_tiles, gmi_ptr, partial_ptr,
                        NF: tl.constexpr, BT: tl.constexpr, BK: tl.constexpr,
                        PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    if pid == 0:
        tl.store(partial_ptr + num_tiles, 0.0)  # the zero slot that pads the per-layer gather
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        layer = tl.load(tile_table + tile * 4 + 0)
        ti = tl.load(tile_table + tile * 4 + 1)
        tj = tl.load(tile_table + tile * 4 + 2)
        slot = tl.load(tile_table + tile * 4 + 3)
        w_off, w0_off, cols, k, big, tall, g_off, kp, out_off = _layer(layer_table, layer, NF, ALIGNED)
        offs_i = ti * BT + tl.arange(0, BT)
        offs_j = tj * BT + tl.arange(0, BT)
        w = w_base + w_off
        w0 = w0_base + w0_off
        if tall != 0:
            if ti == tj:
                acc = _gram_tile(w, w0, cols, k, big, offs_i, offs_j, True, True, BT, BK, PRECISION, EMULATE_BF16)
            else:
                acc = _gram_tile(w, w0, cols, k, big, offs_i, offs_j, True, False, BT, BK, PRECISION, EMULATE_BF16)
        else:
            if ti == tj:
                acc = _gram_tile(w, w0, cols, k, big, offs_i, offs_j, False, True, BT, BK, PRECISION, EMULATE_BF16)
            else:
                acc = _gram_tile(w, w0, cols, k, big, offs_i, offs_j, False, False, BT, BK, PRECISION, EMULATE_BF16)
        # past k the tile holds products of clamped copies (see _delta_tile): zeroed there
        gmi, _ = gram_tile_epilogue(acc, offs_i, offs_j, k, ti, tj, partial_ptr, slot)
        # Columns k..kp of a row are padding; this tile's values there are zeros (above), and
        # writing them keeps the whole buffer defined.
        g = gmi_ptr + g_off
        tl.store(g + offs_i[:, None] * kp + offs_j[None, :], gmi,
                 mask=(offs_i[:, None] < k) & (offs_j[None, :] < kp))
        if ti != tj:
            tl.store(g + offs_j[:, None] * kp + offs_i[None, :], tl.trans(gmi),
                     mask=(offs_j[:, None] < k) & (offs_i[None, :] < kp))


@triton.jit
def penalty_grad_kernel(w_base, w0_base, layer_table, tile_table, num_tiles, gmi_ptr, coef_ptr,
                        out_ptr, NF: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                        BK: tl.constexpr, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
                        ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    for tile in range(pid, num_tiles, tl.num_programs(0)):
        layer = tl.load(tile_table + tile * 4 + 0)
        bi = tl.load(tile_table + tile * 4 + 1)
        bj = tl.load(tile_table + tile * 4 + 2)
        w_off, w0_off, cols, k, big, tall, g_off, kp, out_off = _layer(layer_table, layer, NF, ALIGNED)
        c = tl.load(coef_ptr + layer)
        offs_b = bi * BM + tl.arange(0, BM)  # rows of grad_X (the long side)
        offs_j = bj * BN + tl.arange(0, BN)  # columns of grad_X (the Gram side)
        w = w_base + w_off
        w0 = w0_base + w0_off
        g = gmi_ptr + g_off
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for i0 in range(0, k, BK):
            offs_i = i0 + tl.arange(0, BK)
            gm_mask = (offs_i[:, None] < k) & (offs_j[None, :] < k)
            # G - I is symmetric: read the tile (i, j) from rows j so that it is contiguous
            # along the reduction axis i (the operand order tf32 tensor-core products want).
            gm = tl.load(g + offs_j[None, :] * kp + offs_i[:, None], mask=gm_mask, other=0.0)
            # The reduction axis i is masked; the output rows b are clamped (masked at the store).
            if tall != 0:
                x = _delta_tile(w, w0, big, k, offs_b, offs_i, cols, False, True)
            else:
                x = tl.trans(_delta_tile(w, w0, k, big, offs_i, offs_b, cols, True, False))
            acc = mma(operand(x, PRECISION, EMULATE_BF16), operand(gm, PRECISION, EMULATE_BF16),
                       acc, PRECISION, EMULATE_BF16)
        acc = acc * c
        o = out_ptr + out_off
        # (no variable shared by the two branches: their tile shapes differ when BM != BN)
        if tall != 0:
            tl.store(o + offs_b[:, None] * cols + offs_j[None, :], acc.to(out_ptr.dtype.element_ty),
                     mask=(offs_b[:, None] < big) & (offs_j[None, :] < k))
        else:
            tl.store(o + offs_j[:, None] * cols + offs_b[None, :], tl.trans(acc).to(out_ptr.dtype.element_ty),
                     mask=(offs_j[:, None] < k) & (offs_b[None, :] < big))


# ----------------------------------------------------------------------------- host code

LAYER_FIELDS = 9  # w_off, w0_off, cols, k, big, tall, g_off, kp, out_off


@dataclass(frozen=True)
class KernelConfig:
    gram_block: int = 128  # BT: Gram tile edge
    gram_k: int = 32  # BK of phase 1
    grad_m: int = 128  # BM of phase 2 (long side)
    grad_n: int = 128  # BN of phase 2 (Gram side)
    grad_k: int = 32  # BK of phase 2
    num_warps: int = 8
    num_stages: int = 3
    programs_per_sm: int = 1


def default_config(precision: str, device) -> KernelConfig:
    """The launch configuration on ``device`` (a torch.device or a ``DeviceInfo``)."""
    if not device_info(device).is_cuda:
        # The interpreter: small tiles keep its numpy products cheap on small layers.
        return KernelConfig(32, 32, 32, 32, 32, num_warps=4, num_stages=1)
    return KernelConfig()


@dataclass(frozen=True)
class ShapePlan:
    """Everything that depends only on the layer shapes and block sizes."""
    gram_tiles: torch.Tensor  # int32 [T1, 4]: layer, ti, tj, slot (CPU)
    grad_tiles: torch.Tensor  # int32 [T2, 4]: layer, bi, bj, 0 (CPU)
    slot_gather: torch.Tensor  # int64 [L, max tiles per layer]; padding -> T1 (a zero slot)
    g_offsets: tuple[int, ...]
    g_numel: int
    out_offsets: tuple[int, ...]
    out_numel: int


@functools.lru_cache(maxsize=64)
def shape_plan(shapes: tuple[tuple[int, int], ...], gram_block: int, grad_m: int, grad_n: int) -> ShapePlan:
    g_offsets, g_total = gmi_layout(shapes)
    out_offsets, out_total = grad_layout(shapes)
    gram_tiles, gather = triangle_tiles(shapes, gram_block)
    grad = []
    for layer, (rows, cols) in enumerate(shapes):
        k, big = min(rows, cols), max(rows, cols)
        grad += [(big * k, layer, bi, bj) for bi in range(-(-big // grad_m)) for bj in range(-(-k // grad_n))]
    # Largest first, so the persistent programs finish together.
    grad_sorted = sorted(grad, key=lambda t: -t[0])
    grad_tiles = torch.tensor([[t[1], t[2], t[3], 0] for t in grad_sorted], dtype=torch.int32).reshape(-1, 4)
    return ShapePlan(gram_tiles, grad_tiles, gather, tuple(g_offsets), g_total, tuple(out_offsets), out_total)


class LaunchPlan:
    """Device-side tables for one set of (weights, bases) tensors; rebuilt only when a
    tensor's storage moves."""

    def __init__(self, weights: list[torch.Tensor], bases: list[torch.Tensor], cfg: KernelConfig):
        device = weights[0].device
        shapes = tuple((int(w.shape[0]), int(w.shape[1])) for w in weights)
        self.shape = shape_plan(shapes, cfg.gram_block, cfg.grad_m, cfg.grad_n)
        w_es, w0_es = weights[0].element_size(), bases[0].element_size()
        w_base, w0_base = weights[0].data_ptr(), bases[0].data_ptr()
        rows = []
        aligned = True
        for i, ((r, c), w, w0) in enumerate(zip(shapes, weights, bases)):
            dw, dw0 = w.data_ptr() - w_base, w0.data_ptr() - w0_base
            if dw % w_es or dw0 % w0_es:
                raise ValueError("weights: tensor storage is not element-aligned")
            k = min(r, c)
            rows.append([dw // w_es, dw0 // w0_es, c, k, max(r, c), int(r >= c),
                         self.shape.g_offsets[i], round_up(k, 16), self.shape.out_offsets[i]])
            aligned &= (dw // w_es) % 16 == 0 and (dw0 // w0_es) % 16 == 0 and c % 16 == 0
        aligned &= w_base % 16 == 0 and w0_base % 16 == 0
        self.aligned = bool(aligned)
        self.layer_table = torch.tensor(rows, dtype=torch.int64).to(device)
        self.gram_tiles = self.shape.gram_tiles.to(device)
        self.grad_tiles = self.shape.grad_tiles.to(device)
        self.slot_gather = self.shape.slot_gather.to(device)


_PLANS = PlanCache()
# The compiled kernel of the latest launch of each phase (registers, spills, shared memory,
# PTX), for bench/diagnose_orthoreg.py.
last_launch: dict[str, object] = {}


def launch_plan(weights, bases, cfg: KernelConfig) -> LaunchPlan:
    """The cached plan for these exact tensors (validated when it is built)."""
    return pair_plan(_PLANS, weights, bases, cfg, LaunchPlan)


def gram_penalty(weights: list[torch.Tensor], bases: list[torch.Tensor], precision: str, *,
                 config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Phase 1. Returns ``(sq, gmi)``: per-layer ``||G - I||_F^2`` (fp32 ``[L]``) and the flat
    fp32 buffer of every layer's ``G - I`` (layer ``l`` at ``plan.g_offsets[l]``, ``k`` rows
    of stride ``round_up(k, 16)``, the padding columns zero)."""
    check_precision(precision)
    device = weights[0].device
    cfg = config or default_config(precision, device)
    plan = launch_plan(weights, bases, cfg)
    num_tiles = plan.gram_tiles.shape[0]
    gmi = torch.empty(plan.shape.g_numel, dtype=torch.float32, device=device)
    partials = torch.empty(num_tiles + 1, dtype=torch.float32, device=device)
    last_launch["gram"] = gram_penalty_kernel[persistent_grid(num_tiles, device, cfg.programs_per_sm)](
        weights[0], bases[0], plan.layer_table, plan.gram_tiles, num_tiles, gmi, partials,
        NF=LAYER_FIELDS, BT=cfg.gram_block, BK=cfg.gram_k, PRECISION=precision,
        EMULATE_BF16=device.type != "cuda", ALIGNED=plan.aligned,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    sq = partials[plan.slot_gather].sum(dim=1)
    return sq, gmi


def penalty_grad(weights: list[torch.Tensor], bases: list[torch.Tensor], gmi: torch.Tensor,
                 coef: torch.Tensor, precision: str, *, config: KernelConfig | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Phase 2. ``coef[l] * X (G - I)`` for every layer (``coef`` is the whole per-layer
    factor, e.g. ``4 * upstream`` for the squared penalty) into one flat buffer, layer ``l``
    at ``plan.out_offsets[l]`` in its own ``out x in`` layout."""
    check_precision(precision)
    device = weights[0].device
    cfg = config or default_config(precision, device)
    plan = launch_plan(weights, bases, cfg)
    num_tiles = plan.grad_tiles.shape[0]
    out = torch.empty(plan.shape.out_numel, dtype=out_dtype or weights[0].dtype, device=device)
    last_launch["grad"] = penalty_grad_kernel[persistent_grid(num_tiles, device, cfg.programs_per_sm)](
        weights[0], bases[0], plan.layer_table, plan.grad_tiles, num_tiles, gmi,
        coef.to(torch.float32).contiguous(), out,
        NF=LAYER_FIELDS, BM=cfg.grad_m, BN=cfg.grad_n, BK=cfg.grad_k, PRECISION=precision,
        EMULATE_BF16=device.type != "cuda", ALIGNED=plan.aligned,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out

