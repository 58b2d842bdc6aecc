"""What every Triton kernel of fastortho shares: the device-side operand rounding and the
precision-dispatching product, the persistent grid, and a lazily probed, cached description
of the device the launch targets (shared memory per block, compute capability, SM count).

Precision modes (docs/design.md section 4): "ieee" (fp32 products), "tf32" (tensor-core
tf32), "bf16" (operands rounded to bf16); accumulation is fp32 in all. The interpreter has no
bf16 arithmetic, so there the rounding is done by bit arithmetic on fp32 values, which gives
the same products (bf16 x bf16 is exact in fp32).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._config import PRECISIONS, check_precision, interpreting

__all__ = [
    "PRECISIONS",
    "check_precision",
    "interpreting",
    "DeviceInfo",
    "H100",
    "device_info",
    "persistent_grid",
    "dot_precision",
    "PlanCache",
    "pair_plan",
    "check_weight_pairs",
    "round_to_bf16",
    "operand",
    "mma",
]


# ----------------------------------------------------------------------------- device code

@triton.jit
def round_to_bf16(x):
    # Round-to-nearest-even to bf16, kept as fp32 (for the interpreter, which has no bf16).
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def operand(x, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """An fp32 tile as the product operand of ``PRECISION``."""
    if PRECISION == "bf16":
        if EMULATE_BF16:
            return round_to_bf16(x)
        else:
            return x.to(tl.bfloat16)
    else:
        return x


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """``acc + a @ b`` with fp32 accumulation, in the product format of ``PRECISION``."""
    if PRECISION == "tf32":
        return tl.dot(a, b, acc, input_precision="tf32")
    else:
        if PRECISION == "bf16":
            if EMULATE_BF16:  # bf16-valued fp32 operands: exact products, fp32 sums
                return tl.dot(a, b, acc, input_precision="ieee")
            else:
                return tl.dot(a, b, acc)
        else:
            return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def gram_tile_epilogue(acc, offs_i, offs_j, k, ti, tj, partial_ptr, slot):
    """``G - I`` of a Gram tile, zero outside ``k x k`` (rows past ``k`` hold products of
    clamped copies), and its share of ``||G - I||_F^2`` stored to the tile's own slot, doubled
    off the diagonal (the tile stands for its mirror too). Returns ``(G - I, valid mask)``."""
    eye = (offs_i[:, None] == offs_j[None, :]).to(tl.float32)
    valid = (offs_i[:, None] < k) & (offs_j[None, :] < k)
    gmi = tl.where(valid, acc - eye, 0.0)
    sq = tl.sum(tl.sum(gmi * gmi, axis=1), axis=0)
    tl.store(partial_ptr + slot, tl.where(ti == tj, sq, 2.0 * sq))
    return gmi, valid


# ----------------------------------------------------------------------------- host code

@dataclass(frozen=True)
class DeviceInfo:
    """What kernel configurations depend on. ``kind`` is "cuda" or "interpreter"."""
    kind: str
    capability: tuple[int, int] = (0, 0)
    sm_count: int = 4
    shared_per_block: int = 0  # bytes one block may opt in to

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"


# The H100 / H200 (sm_90): 132 SMs, 227 KiB of shared memory per block. Used by
# fastortho.kernels.resources to compile every kernel for sm_90a without a GPU.
H100 = DeviceInfo("cuda", (9, 0), 132, 232448)
# The CPU interpreter: "SMs" is the number of persistent programs, a few so that the
# persistent loops are exercised.
INTERPRETER = DeviceInfo("interpreter")

_probed: dict[int, DeviceInfo] = {}
_SHAPE, _DTYPE, _DEVICE = (operator.attrgetter(a) for a in ("shape", "dtype", "device"))


def device_info(device: torch.device | DeviceInfo) -> DeviceInfo:
    """The description of ``device``, probed on first use and cached (never at import)."""
    if isinstance(device, DeviceInfo):
        return device
    if device.type != "cuda":
        return INTERPRETER
    index = device.index if device.index is not None else torch.cuda.current_device()
    info = _probed.get(index)
    if info is None:
        props = torch.cuda.get_device_properties(index)
        shared = getattr(props, "shared_memory_per_block_optin", 0) or getattr(props, "shared_memory_per_block", 0)
        info = _probed[index] = DeviceInfo("cuda", (props.major, props.minor), props.multi_processor_count,
                                           int(shared))
    return info


class PlanCache:
    """Launch plans (device-side tables) for exact tensors: the key pins the storage, shape,
    strides, dtype and device of every tensor plus the rest of the key (the configuration), so
    a plan is built, and its inputs validated, only when a tensor moves."""

    def __init__(self, size: int = 16):
        self.size = size
        self._plans: dict = {}

    def get(self, tensors, key, build):
        """The plan for ``tensors`` and ``key`` (hashable); ``build()`` checks and makes it."""
        # map over C methods and getters: no Python call per tensor on a warm call
        full_key = (tuple(map(torch.Tensor.data_ptr, tensors)), tuple(map(_SHAPE, tensors)),
                    tuple(map(torch.Tensor.stride, tensors)), tuple(map(_DTYPE, tensors)),
                    tuple(map(_DEVICE, tensors)), key)
        plan = self._plans.get(full_key)
        if plan is None:
            plan = build()
            if len(self._plans) >= self.size:
                self._plans.pop(next(iter(self._plans)))
            self._plans[full_key] = plan
        return plan


def pair_plan(cache: PlanCache, weights, bases, cfg, make):
    """The cached plan of a grouped OrthoReg launch over ``(weights, bases)``: validated
    (:func:`check_weight_pairs`) and made (``make(weights, bases, cfg)``) when the tensors move."""
    def build():
        check_weight_pairs(weights, bases)
        return make(weights, bases, cfg)
    return cache.get((*weights, *bases), cfg, build)


def check_weight_pairs(weights, bases) -> None:
    """What one grouped OrthoReg launch takes: equal non-empty lists of contiguous 2-D pairs of
    one shape, one weight dtype and one base dtype, on one device (CUDA, or the interpreter),
    each layer under 2**31 elements (32-bit in-layer indexing)."""
    if not weights or len(weights) != len(bases):
        raise ValueError("weights, bases: expected two non-empty lists of equal length")
    device = weights[0].device
    if device.type != "cuda" and not interpreting():
        raise ValueError(f"the Triton backend needs CUDA tensors (got {device}); on CPU set "
                         f"TRITON_INTERPRET=1 before importing triton, or use backend='torch'")
    for w, b in zip(weights, bases):
        if w.dim() != 2 or w.shape != b.shape:
            raise ValueError(f"weights, bases: expected 2-D pairs of one shape, got {tuple(w.shape)} "
                             f"and {tuple(b.shape)}")
        if not (w.is_contiguous() and b.is_contiguous()):
            raise ValueError("weights, bases: expected contiguous tensors")
        if w.device != device or b.device != device:
            raise ValueError(f"weights, bases: expected every tensor on {device}")
        if w.dtype != weights[0].dtype or b.dtype != bases[0].dtype:
            raise ValueError("weights, bases: one launch takes one weight dtype and one base dtype")
        if w.numel() >= 2**31:
            raise ValueError(f"weights: a layer of {w.numel()} elements (2**31 or more) is beyond the kernels' "
                             f"32-bit in-layer indexing; use backend='torch' or 'cuda'")


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision`` for the dual kernels' operands of ``dtype``: tf32 for
    fp32 when PyTorch's CUDA matmul flag asks for it (the interpreter computes tf32 as ieee
    anyway), ieee otherwise (half-precision operands ignore it)."""
    if interpreting() or dtype != torch.float32:
        return "ieee"
    return "tf32" if torch.backends.cuda.matmul.fp32_precision == "tf32" else "ieee"


def persistent_grid(num_tiles: int, device: torch.device | DeviceInfo, programs_per_sm: int = 1) -> tuple[int]:
    """About ``programs_per_sm`` programs per SM (never more than there are tiles)."""
    info = device_info(device)
    return (max(1, min(num_tiles, info.sm_count * (programs_per_sm if info.is_cuda else 1))),)
