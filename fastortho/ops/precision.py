"""Matmul precision modes shared by every backend: "ieee" (true fp32), "tf32" (fp32 storage,
tf32 tensor-core products), "bf16" (operands rounded to bf16). Accumulation is fp32 in all."""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

PRECISIONS = ("ieee", "tf32", "bf16")
_FROM_TORCH = {"highest": "ieee", "high": "tf32", "medium": "bf16"}


def torch_default_precision() -> str:
    """The mode that ``torch.get_float32_matmul_precision()`` asks for.

    PyTorch >= 2.9 raises from that getter once a program has mixed the legacy
    (``allow_tf32``) and new (``fp32_precision``) flags; then read the new flag instead.
    """
    try:
        return _FROM_TORCH[torch.get_float32_matmul_precision()]
    except RuntimeError:
        flag = torch.backends.cuda.matmul.fp32_precision
        return flag if flag in PRECISIONS else "ieee"


def resolve_precision(precision: str | None) -> str:
    if precision is None:
        return torch_default_precision()
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision: expected None (follow torch.get_float32_matmul_precision()) or one of "
            f"{PRECISIONS}, got {precision!r}")
    return precision


@contextlib.contextmanager
def cuda_fp32_matmul(precision: str) -> Iterator[None]:
    """Run fp32 cuBLAS products inside the block as ``precision`` ("ieee" or "tf32"),
    restoring the caller's setting after. Uses only the new ``fp32_precision`` flag and puts
    back its exact previous value (also "none"), so the legacy getters keep working."""
    flags = torch.backends.cuda.matmul
    wanted = "tf32" if precision == "tf32" else "ieee"
    old = flags.fp32_precision
    effective = old if old in ("ieee", "tf32") else (
        "tf32" if torch_default_precision() == "tf32" else "ieee")
    if effective == wanted:
        yield
        return
    flags.fp32_precision = wanted
    try:
        yield
    finally:
        flags.fp32_precision = old
