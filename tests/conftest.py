"""Test setup. Triton kernels run on CPU under its interpreter, which reads TRITON_INTERPRET
when triton is imported: set it here, before any test module can import triton, unless a GPU
is present (then the kernels run for real)."""
import math
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `python -m pytest` puts the working directory (the repository root) first on sys.path, where
# the kernel folder would shadow Hugging Face's "kernels" package that transformers probes for.
# The tests import fastortho as installed; the root is not needed on the path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _ROOT]

import pytest  # noqa: E402

from fastortho import reference as ref  # noqa: E402
from fastortho.ops.orthoreg import ortho_penalty  # noqa: E402

# ||out - ref|| / ||ref|| bounds (docs/design.md section 4), the one table every test uses.
# The three precision modes are those of one op against float64. The other rows are for
# results whose own dtype bounds them: a float64 computation against a float64 reference
# (only the order of sums differs); the tangent of a small fp32 network against float64
# (a chain of fp32 ops with cancellation in the tangent); a 12-block fp32 ViT-B-32 against
# an fp32 reference; a float64 gradient by a different algorithm (autograd through the naive
# loop) or a float64 tau-Jp matrix entry (a mean of per-sample norms); the same fp32
# computation compiled and eager (the order of operations differs).
TOL = {"ieee": 1e-5, "tf32": 1e-3, "bf16": 2e-2, "float64": 1e-10, "fp32-network": 1e-4, "fp32-deep": 1e-3,
       "float64-grad": 1e-8, "float64-taujp-matrix": 1e-6, "fp32-compiled": 1e-6}


def tolerance(precision: str | None = None, dtype: torch.dtype = torch.float32) -> float:
    """The bound for an op run in ``precision`` mode on ``dtype`` tensors: float64 tensors are
    held to the float64 row, 16-bit ones to bf16's, fp32 to their precision mode's."""
    if dtype == torch.float64:
        return TOL["float64"]
    if dtype in (torch.float16, torch.bfloat16):
        return TOL["bf16"]
    return TOL[precision or "ieee"]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative Frobenius error; NaN or inf anywhere in ``out`` gives inf (never passes)."""
    out64, ref64 = out.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(out64).all():
        return float("inf")
    denom = ref64.norm()
    return float((out64 - ref64).norm() / (denom if denom > 0 else 1.0))


def worst_abs_diff(ours, theirs, keys=None) -> float:
    """The largest entry difference between the tensors of two state dicts (over ``keys``,
    default ``ours``); inf where either holds a NaN or an inf (Python's ``max`` over floats
    keeps a NaN only if it comes first, and ``nan <= tol`` is False only when compared)."""
    worst = 0.0
    for k in (ours if keys is None else keys):
        diff = (ours[k].detach().double().cpu() - theirs[k].detach().double().cpu()).abs()
        if not torch.isfinite(diff).all():
            return float("inf")
        worst = max(worst, float(diff.max()) if diff.numel() else 0.0)
    return worst


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


# ----------------------------------------------------------------------------- NaN poisoning

_POISONED = {}  # allocator name -> count of poisoned allocations (read by test_poisoning_is_active)


def _poisoning(name, alloc):
    """``alloc`` that NaN-fills floating outputs allocated by fastortho code (the caller's
    module is under ``fastortho.``), so an element a kernel or an op never writes shows."""
    def poisoned(*args, **kwargs):
        out = alloc(*args, **kwargs)
        if torch.compiler.is_compiling():
            return out
        caller = sys._getframe(1).f_globals.get("__name__", "")
        if (caller.startswith("fastortho.") and isinstance(out, torch.Tensor) and out.is_floating_point()
                and out.device.type != "meta" and type(out) is torch.Tensor and out.numel()):
            with torch.no_grad():
                out.fill_(math.nan)
            _POISONED[name] = _POISONED.get(name, 0) + 1
        return out
    poisoned.__wrapped__ = alloc
    return poisoned


@pytest.fixture(autouse=True)
def poison_fastortho_allocations(monkeypatch):
    """Every ``torch.empty`` / ``empty_like`` / ``Tensor.new_empty`` made inside fastortho is
    NaN-filled (the technique of flash-linear-attention's tests): kernel outputs, the attention
    backward's buffers and every op's scratch, without test-only output parameters."""
    monkeypatch.setattr(torch, "empty", _poisoning("empty", torch.empty))
    monkeypatch.setattr(torch, "empty_like", _poisoning("empty_like", torch.empty_like))
    monkeypatch.setattr(torch.Tensor, "new_empty", _poisoning("new_empty", torch.Tensor.new_empty))
    yield


@pytest.fixture
def restore_matmul_precision():
    old = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(old)


def requires_cuda(test):
    """A test that needs a CUDA device: marked ``gpu`` (bench/gpu_check.py selects these) and
    skipped without one."""
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def _interpreter_loop_problem() -> str | None:
    """Why the Triton interpreter cannot run kernels with loops here, or None. Triton < 3.7's
    interpreter turns a loop bound into a Python int with ``int()`` of a one-element array,
    which NumPy >= 2.4 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"); compiled kernels are unaffected. CI's oldest environment pins numpy < 2.4."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        import numpy
        import triton
    except ImportError:
        return None
    if _version(triton.__version__) < (3, 7) and _version(numpy.__version__) >= (2, 4):
        return (f"triton {triton.__version__}'s interpreter cannot run kernel loops with numpy {numpy.__version__} "
                f"(install numpy<2.4, or triton>=3.7, to run these kernel tests on the CPU)")
    return None


INTERPRETER_LOOP_PROBLEM = _interpreter_loop_problem()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Under the version pair above, a kernel test that fails with exactly that error is
    reported as skipped, with the reason; with any other versions the error fails the test."""
    outcome = yield
    if INTERPRETER_LOOP_PROBLEM is None or outcome.excinfo is None:
        return
    if "only 0-dimensional arrays can be converted to Python scalars" in str(outcome.excinfo[1]):
        outcome.force_exception(pytest.skip.Exception(INTERPRETER_LOOP_PROBLEM, _use_item_location=True))


def pytest_report_header(config):
    """Whether this run will compile the CUDA extension (minutes, once); whether the Triton
    interpreter can run the kernel tests."""
    from fastortho._config import cuda_build_disabled
    from fastortho.ops import cuda_ext

    try:
        import triton
        versions = f"torch {torch.__version__}, triton {triton.__version__}"
    except ImportError:
        versions = f"torch {torch.__version__}, no triton"
    lines = [f"fastortho: {versions}"]
    if cuda_build_disabled() or torch.version.cuda is None or cuda_ext.cuda_home() is None:
        lines.append("fastortho: no CUDA toolkit in use: the CUDA extension is not built in this run")
    else:
        lines.append(f"fastortho: CUDA toolkit at {cuda_ext.cuda_home()}: the CUDA extension is compiled once on "
                     f"first use (a few minutes, then cached) unless FASTORTHO_SKIP_CUDA_BUILD=1")
    if INTERPRETER_LOOP_PROBLEM:
        lines.append(f"fastortho: kernel tests that loop are SKIPPED: {INTERPRETER_LOOP_PROBLEM}")
    return lines


@pytest.fixture
def tilted_zero_shot_heads(monkeypatch):
    """fastortho.clip.zero_shot_head built for real (text tower, tokenizer and all), then tilted
    to class 0: random weights classify at chance, and a split scored 0 cannot normalize task
    addition; the tiny benchmark datasets put nearly every image in class 0."""
    from fastortho import clip
    from fastortho.offline import PrototypeHead

    real_head = clip.zero_shot_head

    def tilted_head(*args, **kwargs):
        head = real_head(*args, **kwargs)
        bias = torch.zeros(head.weight.shape[0])
        bias[0] = 1e4
        return PrototypeHead(head.weight, bias, normalize=head.normalize)
    monkeypatch.setattr(clip, "zero_shot_head", tilted_head)
