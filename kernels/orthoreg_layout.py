"""Memory layout shared by the OrthoReg kernels and their fake (meta) implementations. Pure
Python, no triton import, so fake kernels and torch.compile tracing never need triton."""
from __future__ import annotations


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def gmi_layout(shapes) -> tuple[list[int], int]:
    """Offsets of each layer's ``G - I`` (``k`` rows padded to a multiple of 16, 16-aligned)
    in one flat fp32 buffer, and the buffer length."""
    offsets, total = [], 0
    for r, c in shapes:
        k = min(r, c)
        offsets.append(total)
        total += k * round_up(k, 16)
    return offsets, total


def grad_layout(shapes) -> tuple[list[int], int]:
    """Offsets of each layer's ``out x in`` gradient (16-aligned) in one flat buffer, and
    the buffer length."""
    offsets, total = [], 0
    for r, c in shapes:
        offsets.append(total)
        total += round_up(r * c, 16)
    return offsets, total
