"""Every switch of fastortho, read in one place (docs/design.md section 5).

Environment variables (read when used, so a test or a script may set them at run time):

========================== ============================================================
``FASTORTHO_AUTOTUNE``     ``0``: never time backends; ``backend="auto"`` takes Triton on
                           CUDA and ``"cuda"`` the extension's full-GEMM Gram (default ``1``)
``FASTORTHO_CUDA_GRAM``    force the CUDA extension's Gram form: ``gemm``, ``triangle``, ``syrk``
``FASTORTHO_GRAD_INTO_WEIGHTS`` ``0``: the OrthoReg gradient always goes through autograd,
                           never straight into ``.grad`` (default ``1``;
                           ``fastortho/ops/orthoreg/into_grad.py``)
``FASTORTHO_CACHE``        folder for the backend-choice cache and the offline demo's
                           encoder (default ``~/.cache/fastortho``)
``FASTORTHO_SKIP_CUDA_BUILD`` ``1``: never build the CUDA extension (setup.py reads it too)
``FASTORTHO_OFFLINE_CONFIG`` JSON of ``EncoderConfig`` fields for the offline demo
``FASTORTHO_SVD_WORKERS``  how many SVDs of a merge's batch run at once: CPU threads (default
                           torch's intra-op thread count) or CUDA streams (default 8);
                           ``1``: one matrix after another (``fastortho/merge/_svd.py``)
``TRITON_INTERPRET``       ``1`` (before triton is imported): Triton kernels run on CPU
``TRITON_PTXAS_PATH``      the ptxas used by ``fastortho.kernels.resources``
========================== ============================================================

Runtime setters (public as ``fastortho.set_kernels`` / ``fastortho.set_exchange``):
:func:`set_kernels` picks the dual-pass kernels, :func:`set_exchange` the FSDP2 exchange.
"""
from __future__ import annotations

import os
from pathlib import Path

# Matmul precision modes of every backend (docs/design.md section 4).
PRECISIONS = ("ieee", "tf32", "bf16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: expected one of {PRECISIONS}, got {precision!r}")
    return precision


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_enabled() -> bool:
    """``FASTORTHO_AUTOTUNE`` (default on): whether backends are chosen by measurement."""
    return os.environ.get("FASTORTHO_AUTOTUNE", "1") != "0"


def grad_into_weights_enabled() -> bool:
    """``FASTORTHO_GRAD_INTO_WEIGHTS`` (default on): whether the OrthoReg backward may write its
    gradient straight into the weights' ``.grad`` where autograd allows."""
    return os.environ.get("FASTORTHO_GRAD_INTO_WEIGHTS", "1") != "0"


CUDA_GRAMS = ("gemm", "triangle", "syrk")


def forced_cuda_gram() -> str | None:
    """``FASTORTHO_CUDA_GRAM``: the one Gram form of the CUDA extension to use, or None."""
    gram = os.environ.get("FASTORTHO_CUDA_GRAM")
    if not gram:
        return None
    if gram not in CUDA_GRAMS:
        raise ValueError(f"FASTORTHO_CUDA_GRAM: expected one of {list(CUDA_GRAMS)}, got {gram!r}")
    return gram


def cuda_build_disabled() -> bool:
    return os.environ.get("FASTORTHO_SKIP_CUDA_BUILD") == "1"


def cache_dir() -> Path:
    """``FASTORTHO_CACHE`` or ``~/.cache/fastortho``."""
    return Path(os.environ.get("FASTORTHO_CACHE", Path.home() / ".cache" / "fastortho"))


def offline_config_json() -> str | None:
    return os.environ.get("FASTORTHO_OFFLINE_CONFIG")


def svd_workers() -> int | None:
    """``FASTORTHO_SVD_WORKERS``: how many SVDs of a merge run at once, or None (unset: the
    merge's own default per device)."""
    value = os.environ.get("FASTORTHO_SVD_WORKERS")
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"FASTORTHO_SVD_WORKERS: expected a positive integer, got {value!r}")
    return int(value)


# ----------------------------------------------------------------------------- runtime setters

KERNEL_POLICIES = ("auto", "triton", "torch")
EXCHANGES = ("auto", "gram")
_settings = {"kernels": "auto", "exchange": "auto"}


def set_kernels(policy: str) -> None:
    """Which implementation the dual (linearized) linear and attention functions use: "auto"
    (on CUDA, per op and shape, the faster of its Triton kernel and the PyTorch path, measured
    once and cached; PyTorch ops elsewhere), "triton" (both Triton kernels everywhere; on a
    CPU only under TRITON_INTERPRET=1), "torch" (PyTorch ops)."""
    if policy not in KERNEL_POLICIES:
        raise ValueError(f"policy: expected one of {KERNEL_POLICIES}, got {policy!r}")
    _settings["kernels"] = policy


def kernel_policy() -> str:
    return _settings["kernels"]


def set_exchange(policy: str) -> None:
    """How FSDP2-sharded layers are combined: ``"auto"`` (default) picks per layer the exchange
    that moves fewer bytes; ``"gram"`` never gathers any block (every layer exchanges its
    partial Grams, even where a Gram is larger than the weight)."""
    if policy not in EXCHANGES:
        raise ValueError(f"policy: expected one of {EXCHANGES}, got {policy!r}")
    _settings["exchange"] = policy


def exchange_policy() -> str:
    return _settings["exchange"]
