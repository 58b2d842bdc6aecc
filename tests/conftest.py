"""Test setup. Triton kernels run on CPU under its interpreter, which reads TRITON_INTERPRET
when triton is imported: set it here, before any test module can import triton, unless a GPU
is present (then the kernels run for real)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastortho import reference as ref  # noqa: E402
from fastortho.ops.orthoreg import ortho_penalty  # noqa: E402

# ||out - ref|| / ||ref|| bounds per precision mode (DESIGN section 4).
TOL = {"ieee": 1e-5, "tf32": 1e-3, "bf16": 2e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error; NaN or inf anywhere in ``out`` gives inf (never passes)."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm()
    return float((out64 - ref64).norm() / (denom if denom > 0 else 1.0))


def reference_values_and_grads(weights, bases, squared):
    """Per-layer float64 penalties and closed-form gradients."""
    values, grads = [], []
    for w, w0 in zip(weights, bases):
        d = w.detach().double() - w0.detach().double()
        values.append(ref.layer_penalty(d, squared))
        grads.append(ref.layer_penalty_grad(d, squared))
    return torch.stack(values), grads


def fast_values_and_grads(weights, bases, squared, precision, upstream=None, backend="torch"):
    leaves = [w.detach().clone().requires_grad_(True) for w in weights]
    values = ortho_penalty(leaves, bases, squared=squared, precision=precision, backend=backend)
    upstream = torch.ones_like(values) if upstream is None else upstream
    (values * upstream).sum().backward()
    return values, [w.grad for w in leaves]


@pytest.fixture
def restore_matmul_precision():
    old = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(old)


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
