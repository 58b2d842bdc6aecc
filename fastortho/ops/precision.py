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
    Under torch.compile the value is read once, at trace time (dynamo cannot put a string
    returned by a torch function in a graph): a compiled step keeps the precision that was
    set when it was compiled.
    """
    try:
        return _FROM_TORCH[torch.get_float32_matmul_precision()]
    except RuntimeError:
        flag = torch.backends.cuda.matmul.fp32_precision
        return flag if flag in PRECISIONS else "ieee"


# What torch.compiler.assume_constant_result sets; applied by hand because that function
# imports torch._dynamo (and with it triton), about a second at `import fastortho`.
# tests/test_orthoreg.py compiles with precision=None to keep this honest.
torch_default_precision._dynamo_marked_constant = True


def resolve_precision(precision: str | None) -> str:
    if precision is None:
        return torch_default_precision()
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision: expected None (follow torch.get_float32_matmul_precision()) or one of "
            f"{PRECISIONS}, got {precision!r}")
    return precision


@contextlib.contextmanager
def fp32_matmul(precision: str, device_type: str) -> Iterator[None]:
    """Run fp32 library products (cuBLAS on CUDA, oneDNN on CPU) inside the block as
    ``precision`` ("tf32" is honoured on CUDA only; everything else is true fp32), restoring
    the caller's flag after. Needed because ``torch.set_float32_matmul_precision("medium")``
    lets even CPU fp32 products round to bf16. Uses only the new ``fp32_precision`` flags and
    puts back their exact previous value (also "none"), so the legacy getters keep working."""
    flags = {"cuda": torch.backends.cuda.matmul, "cpu": torch.backends.mkldnn.matmul}.get(device_type)
    if flags is None:
        yield
        return
    wanted = "tf32" if (precision == "tf32" and device_type == "cuda") else "ieee"
    old = flags.fp32_precision
    if old == wanted:
        yield
        return
    flags.fp32_precision = wanted
    try:
        yield
    finally:
        flags.fp32_precision = old
