"""Triton kernels of fastortho, installed as ``fastortho.kernels``. Importing this package
does not import triton; each kernel module does, on first use."""
