"""Triton kernels of fastortho, installed as ``fastortho.kernels``. Importing this package
does not import triton; each kernel module does, on first use."""
import os


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
