"""The host side of a warm call on the CUDA code path, measured without a GPU.

A GPU step is host-bound when issuing its work costs more than running it (bench/NOTES.md,
run 4: about 2 ms of host work per OrthoReg call against 2.0 ms of GPU work). This module runs
the call on ``meta`` tensors, which carry shapes and dtypes but no data, with fastortho's
device description saying "an H100" for them, so the call takes the CUDA path: the same
backend resolution, plans, launch configurations and autograd as on a GPU. Nothing executes:

- Triton launches are recorded, not run (the interpreter's ``run`` is replaced by a recorder);
- the torch backend batches its layers by shape, as it does on CUDA (its one CUDA test on the
  "tf32" path; its bf16 products' CUDA branches are not simulated, so measure "tf32");
- ATen ops dispatch to their meta kernels (shape inference only) and are counted at the
  dispatcher, the ones that only make views excepted (no device work).

What a warm call reports (:func:`measure`):

- ``device_ops``: Triton launches + ATen ops that launch device work, forward + backward;
- ``launches`` / ``aten_ops``: the two parts;
- ``python_calls``: Python function calls made in fastortho's own modules;
- ``max_depth``: the deepest chain of fastortho frames on the stack at a launch (a Triton
  launch, or an ATen op issued from fastortho code); ``first_launch_chain``: the frames at the
  first Triton launch, outermost first;
- ``seconds``: the Python wall time of the warm call here (median).

Not included: the launch cost itself (a real Triton launch spends some microseconds binding
arguments and looking up its compiled kernel; a cuBLAS call likewise), and the non-finite
check of the penalty (``check_finite=False``: on a GPU it adds one asynchronous device-to-host
copy and one event per call). The time is this CPU's, for comparing designs, not a GPU host's.
"""
from __future__ import annotations

import contextlib
import statistics
import sys
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def _is_fastortho(frame) -> bool:
    return frame.f_globals.get("__name__", "").startswith("fastortho")


def _fastortho_depth() -> int:
    return len(fastortho_chain(3))


def fastortho_chain(skip: int = 2) -> list[str]:
    """The fastortho frames on the stack (outermost first) as ``module.function``."""
    chain, frame = [], sys._getframe(skip)
    while frame is not None:
        if _is_fastortho(frame):
            chain.append(f"{frame.f_globals['__name__']}.{frame.f_code.co_name}")
        frame = frame.f_back
    return chain[::-1]


class _Tally:
    def __init__(self):
        self.launches = 0
        self.aten_ops = 0
        self.python_calls = 0
        self.max_depth = 0
        self.by_kernel: dict[str, int] = {}
        self.by_op: dict[str, int] = {}


def _is_view(func) -> bool:
    """An op whose every output aliases an input (view, reshape-as-view, detach...): no device work."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


class _CountOps(TorchDispatchMode):
    def __init__(self, tally: _Tally):
        super().__init__()
        self.tally = tally

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not _is_view(func):
            self.tally.aten_ops += 1
            name = str(func.overloadpacket.__name__)
            self.tally.by_op[name] = self.tally.by_op.get(name, 0) + 1
            self.tally.max_depth = max(self.tally.max_depth, _fastortho_depth())
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def cuda_path_on_meta():
    """Within: ``meta`` tensors take fastortho's CUDA path (device description of an H100)
    and Triton launches are recorded (yields the list they are appended to) instead of run."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastortho.kernels import _common, attention_tangent, dual_linear, lora_orthoreg, orthoreg
    from fastortho.ops._common import shape_groups
    from fastortho.ops.orthoreg import torch_backend

    original = _common.device_info
    layer_groups = torch_backend.layer_groups

    def cuda_layer_groups(weights):
        # the torch backend batches by shape on CUDA (its one device test on the "tf32" path;
        # the bf16 products' CUDA branches are not simulated: measure "tf32")
        if weights[0].is_meta:
            return shape_groups(torch_backend.weight_shapes(weights))
        return layer_groups(weights)

    def device_info(device):
        if getattr(device, "type", None) == "meta":
            return _common.H100
        return original(device)

    launches: list[tuple[str, list[str]]] = []
    run = InterpretedFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn.__name__, fastortho_chain()))

    modules = (_common, attention_tangent, dual_linear, lora_orthoreg, orthoreg)
    try:
        for m in modules:
            m.device_info = device_info
        InterpretedFunction.run = record
        torch_backend.layer_groups = cuda_layer_groups
        yield launches
    finally:
        torch_backend.layer_groups = layer_groups
        InterpretedFunction.run = run
        for m in modules:
            m.device_info = original


def measure(call, *, warm: int = 2, reps: int = 20) -> dict:
    """Counts and times of ``call()`` (forward + backward, on meta tensors, inside
    :func:`cuda_path_on_meta`) after ``warm`` calls that build the plans."""
    with cuda_path_on_meta() as launches:
        for _ in range(warm):
            call()
        tally = _Tally()
        launches.clear()

        def profile(frame, event, arg):
            if event == "call" and _is_fastortho(frame):
                tally.python_calls += 1

        sys.setprofile(profile)
        try:
            with _CountOps(tally):
                call()
        finally:
            sys.setprofile(None)
        tally.launches = len(launches)
        first_chain = launches[0][1] if launches else []
        for name, chain in launches:
            tally.by_kernel[name] = tally.by_kernel.get(name, 0) + 1
            tally.max_depth = max(tally.max_depth, len(chain))
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
    return {"device_ops": tally.launches + tally.aten_ops, "launches": tally.launches, "aten_ops": tally.aten_ops,
            "python_calls": tally.python_calls, "max_depth": tally.max_depth, "seconds": statistics.median(times),
            "kernels": tally.by_kernel, "ops": dict(sorted(tally.by_op.items(), key=lambda kv: -kv[1])),
            "first_launch_chain": first_chain}


def shape_set(shapes, device="meta"):
    """An nn.Module holding parameters of ``shapes`` and a base state dict for them."""
    from torch import nn

    class ShapeSet(nn.Module):
        def __init__(self):
            super().__init__()
            self.weights = nn.ParameterList(nn.Parameter(torch.empty(s, device=device)) for s in shapes)

    model = ShapeSet()
    base = {n: torch.empty(p.shape, device=device) for n, p in model.named_parameters()}
    return model, base


@contextlib.contextmanager
def meta_allowed():
    """OrthoReg refuses meta parameters (they hold no values to regularize); the measurement
    wants exactly their shapes without values."""
    import fastortho.orthoreg as public

    check = public.check_materialized
    public.check_materialized = lambda what, tensors: None
    try:
        yield
    finally:
        public.check_materialized = check


from fastortho.testing import linearized_op_ratio  # noqa: E402,F401 - the harness's own name for it
