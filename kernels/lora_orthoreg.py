"""Exact low-rank OrthoReg of every LoRA adapter of a model: one launch for the penalties,
one for the gradients.

For an adapter ``D = s B A`` (``B: out x r``, ``A: r x in``, row-major), ``M = B^T B``,
``N = A A^T``, ``E = s^2 M N - I_r`` (all ``r x r``; docs/design.md section 1):

    ||G - I||_F^2 = sum(E * E^T) + (k - r),   dP/dB = 4 s^2 B (N E),   dP/dA = 4 s^2 (E M) A.

- :func:`lora_penalty` runs one program per adapter: it streams ``B`` by row blocks into
  ``M`` and ``A`` by column blocks into ``N`` (fp32 accumulation), forms ``E`` in registers,
  and writes the penalty and the two ``r x r`` matrices ``4 s^2 N E`` and ``4 s^2 E M``
  (padded to ``RP x RP``, the padding written as zeros).
- :func:`lora_grad` runs persistent programs over a table of row blocks of every ``B`` and
  column blocks of every ``A``: ``c B[blk] (4s^2 N E)`` and ``c (4s^2 E M) A[:, blk]``, into
  one flat buffer (all ``A`` gradients, then all ``B`` gradients).

Adapters are addressed by element offsets relative to the first ``A`` / ``B`` tensor, so
one launch covers adapters of every shape and rank (``RP`` = the largest rank, padded).
Precision: the two streaming products and the gradient products follow "ieee" / "tf32" /
"bf16"; the ``r x r`` products are always true fp32 (they cost nothing).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import PlanCache, check_precision, device_info, interpreting, mma, operand, persistent_grid

# The columns of the adapter table, one int64 row per adapter (the host writes them in this
# order; the kernels read each by its name): A's and B's first element in their storages, the
# adapter's out, in and rank r, k = min(out, in), and its A and B gradients' first elements in
# the flat gradient buffer.
ADAPTER_COLUMNS = ("a_off", "b_off", "out", "in", "r", "k", "grad_a_off", "grad_b_off")
FIELDS = len(ADAPTER_COLUMNS)
A_OFF, B_OFF, A_OUT, A_IN, A_R, A_K, GRAD_A_OFF, GRAD_B_OFF = (tl.constexpr(i) for i in range(FIELDS))
# The columns of the gradient's tile table, three int32 per tile: the adapter, the kind (0: a
# column block of grad A, 1: a row block of grad B) and the block.
TILE_ADAPTER, TILE_KIND, TILE_BLOCK = (tl.constexpr(i) for i in range(3))


@triton.jit
def lora_penalty_kernel(a_base, b_base, table, s2_ptr, values_ptr, small_ptr, NF: tl.constexpr,
                        RP: tl.constexpr, BL: tl.constexpr, PRECISION: tl.constexpr,
                        EMULATE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    arow = table + pid * NF  # this adapter's row of the table
    a = a_base + tl.load(arow + A_OFF)
    b = b_base + tl.load(arow + B_OFF)
    out, inn, r, k = tl.load(arow + A_OUT), tl.load(arow + A_IN), tl.load(arow + A_R), tl.load(arow + A_K)
    offs_r = tl.arange(0, RP)
    in_rank = offs_r < r
    m = tl.zeros((RP, RP), dtype=tl.float32)
    for o0 in range(0, out, BL):
        offs_o = o0 + tl.arange(0, BL)
        blk = tl.load(b + offs_o[:, None] * r + offs_r[None, :],
                      mask=(offs_o[:, None] < out) & in_rank[None, :], other=0.0).to(tl.float32)
        blk = operand(blk, PRECISION, EMULATE_BF16)
        m = mma(tl.trans(blk), blk, m, PRECISION, EMULATE_BF16)
    n = tl.zeros((RP, RP), dtype=tl.float32)
    for i0 in range(0, inn, BL):
        offs_i = i0 + tl.arange(0, BL)
        blk = tl.load(a + offs_r[:, None] * inn + offs_i[None, :],
                      mask=in_rank[:, None] & (offs_i[None, :] < inn), other=0.0).to(tl.float32)
        blk = operand(blk, PRECISION, EMULATE_BF16)
        n = mma(blk, tl.trans(blk), n, PRECISION, EMULATE_BF16)
    s2 = tl.load(s2_ptr + pid)
    # Rows and columns past r of M and N are zero; the identity is masked to r so E is too.
    eye = ((offs_r[:, None] == offs_r[None, :]) & in_rank[:, None]).to(tl.float32)
    e = s2 * tl.dot(m, n, input_precision="ieee") - eye
    sq = tl.sum(tl.sum(e * tl.trans(e), axis=1), axis=0) + (k - r).to(tl.float32)
    tl.store(values_ptr + pid, sq)
    idx = offs_r[:, None] * RP + offs_r[None, :]
    small = small_ptr + pid * (2 * RP * RP)
    tl.store(small + idx, (4.0 * s2) * tl.dot(n, e, input_precision="ieee"))
    tl.store(small + RP * RP + idx, (4.0 * s2) * tl.dot(e, m, input_precision="ieee"))


@triton.jit
def lora_grad_kernel(a_base, b_base, table, tiles, num_tiles, small_ptr, coef_ptr, out_ptr,
                     NF: tl.constexpr, RP: tl.constexpr, BL: tl.constexpr, PRECISION: tl.constexpr,
                     EMULATE_BF16: tl.constexpr):
    pid = tl.program_id(0)
    offs_r = tl.arange(0, RP)
    small_idx = offs_r[:, None] * RP + offs_r[None, :]
    for t in range(pid, num_tiles, tl.num_programs(0)):
        trow = tiles + t * 3  # this tile's row of the tile table
        i, kind, blk = tl.load(trow + TILE_ADAPTER), tl.load(trow + TILE_KIND), tl.load(trow + TILE_BLOCK)
        arow = table + i * NF
        r = tl.load(arow + A_R)
        in_rank = offs_r < r
        c = tl.load(coef_ptr + i)
        small = small_ptr + i * (2 * RP * RP)
        offs_l = blk * BL + tl.arange(0, BL)
        if kind == 0:  # grad A[:, blk] = (c 4s^2 E M) A[:, blk]
            em = c * tl.load(small + RP * RP + small_idx)
            inn = tl.load(arow + A_IN)
            mask_a = in_rank[:, None] & (offs_l[None, :] < inn)
            a_blk = tl.load(
                a_base + tl.load(arow + A_OFF) + offs_r[:, None] * inn + offs_l[None, :], mask=mask_a, other=0.0
            ).to(tl.float32)
            ga = mma(
                operand(em, PRECISION, EMULATE_BF16),
                operand(a_blk, PRECISION, EMULATE_BF16),
                tl.zeros((RP, BL), dtype=tl.float32),
                PRECISION,
                EMULATE_BF16,
            )
            tl.store(
                out_ptr + tl.load(arow + GRAD_A_OFF) + offs_r[:, None] * inn + offs_l[None, :],
                ga.to(out_ptr.dtype.element_ty),
                mask=mask_a,
            )
        else:  # grad B[blk, :] = B[blk, :] (c 4s^2 N E)
            ne = c * tl.load(small + small_idx)
            mask_b = (offs_l[:, None] < tl.load(arow + A_OUT)) & in_rank[None, :]
            b_blk = tl.load(
                b_base + tl.load(arow + B_OFF) + offs_l[:, None] * r + offs_r[None, :], mask=mask_b, other=0.0
            ).to(tl.float32)
            gb = mma(
                operand(b_blk, PRECISION, EMULATE_BF16),
                operand(ne, PRECISION, EMULATE_BF16),
                tl.zeros((BL, RP), dtype=tl.float32),
                PRECISION,
                EMULATE_BF16,
            )
            tl.store(
                out_ptr + tl.load(arow + GRAD_B_OFF) + offs_l[:, None] * r + offs_r[None, :],
                gb.to(out_ptr.dtype.element_ty),
                mask=mask_b,
            )


# ----------------------------------------------------------------------------- host code


@dataclass(frozen=True)
class LoRAConfig:
    block: int = 64  # BL: rows of B / columns of A per step
    num_warps: int = 4
    programs_per_sm: int = 2


def default_config(device) -> LoRAConfig:
    """The launch configuration on ``device`` (a torch.device or a ``DeviceInfo``)."""
    return LoRAConfig(block=64 if device_info(device).is_cuda else 32)


def penalty_warps(cfg: LoRAConfig, rp: int) -> int:
    """Warps of the penalty kernel: its four ``RP x RP`` fp32 products need 8 warps at
    ``RP = 64`` to stay in registers (4 spill about 1.2 KB per thread at sm_90a;
    bench/static_kernels.py)."""
    return max(cfg.num_warps, 8) if rp >= 64 else cfg.num_warps


def rank_padding(max_rank: int) -> int:
    """``RP``: the power of two >= the largest rank, at least 16 (the smallest tl.dot)."""
    return max(16, triton.next_power_of_2(max_rank))


class LoRAPlan:
    """Device tables for one set of adapter tensors; rebuilt only when a tensor moves."""

    def __init__(self, As, Bs, scales, cfg: LoRAConfig):
        device = As[0].device
        es = As[0].element_size()
        a_base, b_base = As[0].data_ptr(), Bs[0].data_ptr()
        rows, tiles = [], []
        ga, gb = 0, sum(a.numel() for a in As)
        self.a_offsets, self.b_offsets = [], []
        for i, (a, b) in enumerate(zip(As, Bs)):
            r, inn, out = int(a.shape[0]), int(a.shape[1]), int(b.shape[0])
            da, db = a.data_ptr() - a_base, b.data_ptr() - b_base
            if da % es or db % es:
                raise ValueError("As, Bs: tensor storage is not element-aligned")
            row = {
                "a_off": da // es,
                "b_off": db // es,
                "out": out,
                "in": inn,
                "r": r,
                "k": min(out, inn),
                "grad_a_off": ga,
                "grad_b_off": gb,
            }
            rows.append([row[name] for name in ADAPTER_COLUMNS])
            self.a_offsets.append(ga)
            self.b_offsets.append(gb)
            tiles += [(out + inn, i, 0, j) for j in range(-(-inn // cfg.block))]
            tiles += [(out + inn, i, 1, j) for j in range(-(-out // cfg.block))]
            ga += a.numel()
            gb += b.numel()
        tiles.sort(key=lambda t: -t[0])
        self.numel = gb
        self.rp = rank_padding(max(int(a.shape[0]) for a in As))
        self.table = torch.tensor(rows, dtype=torch.int64).to(device)
        self.tiles = torch.tensor([t[1:] for t in tiles], dtype=torch.int32).reshape(-1, 3).to(device)
        self.s2 = torch.tensor([s * s for s in scales], dtype=torch.float32).to(device)


_PLANS = PlanCache()


def _check(As, Bs, scales):
    if not As or len(As) != len(Bs) or len(scales) != len(As):
        raise ValueError("As, Bs, scales: expected non-empty lists of equal length")
    device, dtype = As[0].device, As[0].dtype
    if device.type != "cuda" and not interpreting():
        raise ValueError(
            f"the Triton backend needs CUDA tensors (got {device}); on CPU set "
            f"TRITON_INTERPRET=1 before importing triton, or use backend='torch'"
        )
    for a, b in zip(As, Bs):
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"As, Bs: expected A (r x in) and B (out x r), got {tuple(a.shape)} and {tuple(b.shape)}")
        if not (a.is_contiguous() and b.is_contiguous()):
            raise ValueError("As, Bs: expected contiguous tensors")
        if a.device != device or b.device != device or a.dtype != dtype or b.dtype != dtype:
            raise ValueError(f"As, Bs: one launch takes tensors of one dtype on one device ({dtype}, {device})")


def lora_plan(As, Bs, scales, cfg: LoRAConfig) -> LoRAPlan:
    """The cached plan for these exact tensors and scales (validated when it is built)."""

    def build():
        _check(As, Bs, scales)
        return LoRAPlan(As, Bs, scales, cfg)

    return _PLANS.get((*As, *Bs), (tuple(scales), cfg), build)


def lora_penalty(
    As, Bs, scales, precision: str, *, config: LoRAConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-adapter ``||G - I||_F^2`` (fp32 ``[L]``) and the ``[L, 2, RP, RP]`` fp32 buffer of
    ``4 s^2 N E`` and ``4 s^2 E M``."""
    check_precision(precision)
    device = As[0].device
    cfg = config or default_config(device)
    plan = lora_plan(As, Bs, scales, cfg)
    n, rp = len(As), plan.rp
    values = torch.empty(n, dtype=torch.float32, device=device)
    small = torch.empty((n, 2, rp, rp), dtype=torch.float32, device=device)
    lora_penalty_kernel[(n,)](
        As[0],
        Bs[0],
        plan.table,
        plan.s2,
        values,
        small,
        NF=FIELDS,
        RP=rp,
        BL=cfg.block,
        PRECISION=precision,
        EMULATE_BF16=device.type != "cuda",
        num_warps=penalty_warps(cfg, rp),
    )
    return values, small


def lora_grad(
    As, Bs, scales, small: torch.Tensor, coef: torch.Tensor, precision: str, *, config: LoRAConfig | None = None
) -> torch.Tensor:
    """``coef[i] *`` the gradients of every adapter into one flat buffer (all ``A`` then all
    ``B``, each in its own row-major layout; see :func:`.layout.lora_grad_views`)."""
    check_precision(precision)
    device = As[0].device
    cfg = config or default_config(device)
    plan = lora_plan(As, Bs, scales, cfg)
    num_tiles = plan.tiles.shape[0]
    out = torch.empty(plan.numel, dtype=As[0].dtype, device=device)
    grid = persistent_grid(num_tiles, device, cfg.programs_per_sm)
    lora_grad_kernel[grid](
        As[0],
        Bs[0],
        plan.table,
        plan.tiles,
        num_tiles,
        small,
        coef.to(torch.float32).contiguous(),
        out,
        NF=FIELDS,
        RP=plan.rp,
        BL=cfg.block,
        PRECISION=precision,
        EMULATE_BF16=device.type != "cuda",
        num_warps=cfg.num_warps,
    )
    return out
