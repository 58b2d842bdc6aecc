"""How a dual op runs: the kernel policy (``fastortho.set_kernels``) resolved through each op's
backend registry, and the per-shape measurement of "auto" on CUDA (docs/design.md section 5).

``DUAL_LINEAR`` and ``ATTENTION_TANGENT`` are the registries of the two dual ops with a Triton
kernel (``ops/registry.py``): "torch" (library ops, any dtype and device) and "triton" (fp32 /
fp16 / bf16, CUDA or the interpreter). The policy names a backend, or "auto".
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor

from ..._config import kernel_policy
from .._common import triton_available
from ..registry import Backend, Registry


def _auto(device: torch.device) -> str:
    return "triton" if device.type == "cuda" and triton_available() else "torch"


def _load(module: str, name: str):
    def load():
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{module}"), name)
    return load


# The rules call these implementations directly (their own argument lists: a dual op has no
# list arguments to plan); the registries say what exists and what each supports.
_HALF_AND_FP32 = (torch.float32, torch.float16, torch.bfloat16)
DUAL_LINEAR = Registry("dual linear", _auto)
DUAL_LINEAR.register(Backend("torch", _load("rules", "_library_linear")))
DUAL_LINEAR.register(Backend("triton", _load("rules", "_fused_linear"), devices=("cuda", "interpreter"),
                             dtypes=_HALF_AND_FP32))
ATTENTION_TANGENT = Registry("attention tangent", _auto)
ATTENTION_TANGENT.register(Backend("torch", _load("attention", "_run_torch_sdpa")))
ATTENTION_TANGENT.register(Backend("triton", _load("attention", "_run_fused_sdpa"), devices=("cuda", "interpreter"),
                                   dtypes=_HALF_AND_FP32))
REGISTRIES = {"linear": DUAL_LINEAR, "attention": ATTENTION_TANGENT}


# On CUDA under "auto" both ops with a Triton kernel are measured per shape against the PyTorch
# path: the dual linear is compute-bound at ViT shapes, where sharing the x0 / W0 loads may gain
# nothing against cuBLAS (one GEMM and an accumulating one); the attention tangent's one-pass
# kernel competes with SDPA plus batched products in the autocast dtype.
MEASURED_KERNELS = ("linear", "attention")


def kernel_choice(op: str, policy: str, device_type: str, dtypes) -> str:
    """How a dual ``op`` ("linear", "attention") runs under ``policy``: "triton" (its kernel),
    "torch" (library ops: cuBLAS on CUDA), or "measure" (the faster of the two for this shape,
    measured once: :func:`measured_triton`)."""
    if policy == "torch":
        return "torch"
    if not all(REGISTRIES[op]["triton"].supports(d) for d in dtypes):
        return "torch"  # float64 (the reference precision) stays on PyTorch ops
    if policy == "triton":
        return "triton"
    if device_type != "cuda" or not triton_available():
        return "torch"
    return "measure" if op in MEASURED_KERNELS else "torch"


def kernel_how(op: str, *tensors: Tensor | None) -> str:
    """:func:`kernel_choice` for this call under the current policy (fastortho.set_kernels)."""
    ts = [t for t in tensors if t is not None]
    return kernel_choice(op, kernel_policy(), ts[0].device.type, [t.dtype for t in ts])


# (op, device, key of plain values: shape, dtype, tangent parts) -> "triton" | "torch", this process
_choices: dict[tuple, str] = {}


def _time_dual(op: str, candidate: str, run) -> tuple[float, list[Tensor]]:
    """Median ms of ``run()`` (one dual ``op`` by ``candidate``) and its outputs to compare (a
    seam for CPU tests)."""
    from .._measure import median_ms

    ms, outs = median_ms(run)
    return ms, list(outs)


def _key_text(v) -> str:
    """A key value as the cache file spells it: tuples joined by "x", flags 1 / 0, dtypes bare."""
    if isinstance(v, tuple):
        return "x".join(_key_text(e) for e in v)
    if isinstance(v, bool):
        return str(int(v))
    return str(v).removeprefix("torch.")


def measured_triton(op: str, key: tuple, device: torch.device, candidates) -> bool:
    """Under "auto" on CUDA, whether ``op``'s Triton kernel serves this call: the faster of it
    and the PyTorch path on this ``key`` (shape, dtype, which tangents), measured once on the
    caller's tensors and cached on disk (``fastortho/ops/_measure.py``). ``candidates()``
    (called only to measure) returns the call's tensors and ``{"torch": run, "triton": run}``,
    callables returning the outputs to compare. Where measuring cannot run (CUDA-graph
    capture, compilation, inside vmap, or ``FASTORTHO_AUTOTUNE=0``) an unmeasured shape takes
    the PyTorch path and nothing is recorded."""
    choice = _choices.get((op, device, key))
    if choice is not None:  # every call after the first: one dict lookup
        return choice == "triton"
    if torch.compiler.is_compiling():
        return False  # no file reads while tracing; not recorded, so a later eager call measures
    from ..._config import autotune_enabled
    from .._measure import cache_file, fastest, load_table, save_table

    path = cache_file(device)
    table = load_table(path)
    stored = f"dual_{op}:torch|triton:" + ":".join(_key_text(v) for v in key)
    if stored not in table:
        tensors, runs = candidates()
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if not autotune_enabled() or capturing or any(is_functorch_wrapped_tensor(t) for t in tensors):
            return False  # not recorded: a later eager call measures
        fastest(stored, ("torch", "triton"), lambda c: _time_dual(op, c, runs[c]), table)
        save_table(path)
    _choices[(op, device, key)] = table[stored]
    return table[stored] == "triton"


def compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype
