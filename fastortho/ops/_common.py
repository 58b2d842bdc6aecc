"""What the op packages share: the precision of library products (docs/design.md section 4),
shape grouping, the penalty's upstream coefficient, and the one
mechanism by which a registered op's autograd definition also serves eager mode."""
from __future__ import annotations

import contextlib
import functools
import operator
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from .._config import PRECISIONS

_FROM_TORCH = {"highest": "ieee", "high": "tf32", "medium": "bf16"}


# ----------------------------------------------------------------------------- precision

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


# Inside torch.autocast the autocast dtype decides: bf16 -> "bf16"; fp16, whose significand
# is tf32's, -> "tf32" (docs/design.md section 4).
_FROM_AUTOCAST = {torch.bfloat16: "bf16", torch.float16: "tf32"}


def autocast_precision(device_type: str) -> str | None:
    """The mode an enabled ``torch.autocast`` on ``device_type`` asks for, else None."""
    if torch.is_autocast_enabled(device_type):
        return _FROM_AUTOCAST.get(torch.get_autocast_dtype(device_type))
    return None


def resolve_precision(precision: str | None, device_type: str | None = None) -> str:
    """An explicit ``precision`` wins; None follows an enabled autocast on ``device_type``,
    else ``torch.get_float32_matmul_precision()``."""
    if precision is None:
        from_autocast = autocast_precision(device_type) if device_type is not None else None
        return from_autocast or torch_default_precision()
    if precision not in PRECISIONS:
        raise ValueError(
            f"precision: expected None (follow torch.autocast, else torch.get_float32_matmul_precision()) "
            f"or one of {PRECISIONS}, got {precision!r}")
    return precision


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """No autocast inside: a backend runs its products in the operand format its precision
    mode chose, never recast behind its back (autocast would turn an fp32 ``bmm`` into bf16)."""
    with torch.autocast("cuda", enabled=False), torch.autocast("cpu", enabled=False):
        yield


def without_autocast(fn: Callable) -> Callable:
    """``fn`` run under :func:`autocast_off` (a backward runs in the caller's thread on a CPU,
    where the caller's autocast would apply)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_off():
            return fn(*args, **kwargs)
    return wrapper


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


@functools.cache
def _bmm_has_out_dtype(device_type: str, dtype: torch.dtype = torch.bfloat16) -> bool:
    """Whether ``torch.bmm`` and ``torch.baddbmm`` take ``out_dtype=torch.float32`` for ``dtype``
    operands on this device type (CUDA in recent PyTorch); probed once, lazily."""
    try:
        a = torch.ones(1, 2, 2, dtype=dtype, device=device_type)
        c = torch.zeros(1, 2, 2, device=device_type)
        return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32 \
            and torch.baddbmm(c, a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def mm_accumulate_fp32(a: Tensor, b: Tensor, add: Tensor | None = None) -> Tensor:
    """``a @ b (+ add)`` batched over 3-D operands. Half operands stay half and are accumulated
    and returned in fp32 (cuBLAS with ``out_dtype`` on CUDA; elsewhere the exact emulation: fp32
    products of the half values); fp32 and float64 operands as they are."""
    if a.dtype in (torch.float16, torch.bfloat16):
        b = b.to(a.dtype)
        if a.device.type == "cuda" and _bmm_has_out_dtype("cuda", a.dtype):
            if add is None:
                return torch.bmm(a, b, out_dtype=torch.float32)
            return torch.baddbmm(add.float(), a, b, out_dtype=torch.float32)
        a, b = a.float(), b.float()
    b = b.to(a.dtype)
    return torch.bmm(a, b) if add is None else torch.baddbmm(add.to(a.dtype), a, b)


def bmm(a: Tensor, b: Tensor, precision: str) -> Tensor:
    """fp32 batched product with the operands treated per ``precision``; fp32 result."""
    if precision == "bf16":
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        if a.device.type == "cuda" and _bmm_has_out_dtype("cuda"):
            return torch.bmm(a16, b16, out_dtype=torch.float32)
        if a.device.type == "cuda":
            return torch.bmm(a16, b16).float()
        # Exact emulation elsewhere: bf16-rounded operands, fp32 products and sums.
        with fp32_matmul("ieee", a.device.type):
            return torch.bmm(a16.float(), b16.float())
    with fp32_matmul(precision, a.device.type):
        return torch.bmm(a, b)


# Whether cuBLAS's fp32-output bf16 baddbmm accepts out= aliasing its input (not checkable
# without a GPU; the first refusal switches to a product plus an add for the process).
_inplace_out_dtype_ok = True


def _refuse_inplace_out_dtype() -> None:
    global _inplace_out_dtype_ok
    _inplace_out_dtype_ok = False
    warnings.warn("this PyTorch refuses torch.baddbmm(out, ..., out_dtype=torch.float32, out=out); bf16-mode "
                  "OrthoReg gradients are accumulated into .grad by a product and an add (one pass more)",
                  RuntimeWarning, stacklevel=3)


def bmm_accumulate(out: Tensor, a: Tensor, b: Tensor, precision: str) -> None:
    """``out += a @ b`` in place (fp32 ``out``), the operands treated per ``precision`` as in
    :func:`bmm`: one product that reads and writes ``out``, no temporary of its size."""
    if precision == "bf16":
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        if a.device.type == "cuda" and _bmm_has_out_dtype("cuda"):
            if _inplace_out_dtype_ok:
                try:
                    torch.baddbmm(out, a16, b16, out_dtype=torch.float32, out=out)
                    return
                except RuntimeError:  # out= aliasing the input refused: checked before any launch
                    _refuse_inplace_out_dtype()
            out.add_(torch.bmm(a16, b16, out_dtype=torch.float32))
        elif a.device.type == "cuda":
            out.add_(torch.bmm(a16, b16))
        else:
            with fp32_matmul("ieee", a.device.type):
                out.baddbmm_(a16.float(), b16.float())
        return
    with fp32_matmul(precision, a.device.type):
        out.baddbmm_(a, b)


def penalty_product(d: Tensor, m: Tensor, precision: str, out: Tensor | None = None) -> Tensor:
    """The OrthoReg gradient's product for updates ``d`` ``[L, rows, cols]`` and the small
    ``m = c (G - I)``: ``d m`` for tall layers, ``m d`` for wide ones; a fresh fp32 buffer, or
    added to ``out`` in place (:func:`bmm_accumulate`)."""
    a, b = (d, m) if d.shape[1] >= d.shape[2] else (m, d)
    if out is None:
        return bmm(a, b, precision)
    bmm_accumulate(out, a, b, precision)
    return out


# ----------------------------------------------------------------------------- backends

_triton_available: bool | None = None


def triton_available() -> bool:
    """Whether triton imports (probed once, on first use, never at import of fastortho).
    A module flag rather than functools.lru_cache, which torch.compile warns about."""
    global _triton_available
    if _triton_available is None:
        try:
            import triton  # noqa: F401
            _triton_available = True
        except ImportError:
            _triton_available = False
    return _triton_available


_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def needs_grad(*lists: list[Tensor]) -> bool:
    """Whether grad mode is on and a tensor of ``lists`` requires grad (a ``map`` over a C getter
    in eager mode: no Python call per tensor; a generator under torch.compile, which cannot
    trace ``attrgetter``)."""
    if not torch.is_grad_enabled():
        return False
    if torch.compiler.is_compiling():
        return any(t.requires_grad for ts in lists for t in ts)
    return any(any(map(_REQUIRES_GRAD, ts)) for ts in lists)


def contiguous(ts: list[Tensor]) -> list[Tensor]:
    """Kernel inputs: a gradient from ``.sum().backward()`` may arrive with stride 0."""
    return [t if t.is_contiguous() else t.contiguous() for t in ts]


# ----------------------------------------------------------------------------- grouping

@functools.lru_cache(maxsize=256)
def shape_groups(shapes: tuple[tuple[int, ...], ...]) -> tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]:
    """Layers grouped by shape, in order of first appearance: ((shape, layer indices), ...)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s), []).append(i)
    return tuple((s, tuple(idx)) for s, idx in groups.items())


@functools.lru_cache(maxsize=256)
def group_permutations(groups, device: torch.device) -> tuple[Tensor, Tensor]:
    """Device index tensors between layer order and group order (layers of group 0, then
    group 1, ...), made once: indexing with a Python list would copy the index from pageable
    host memory on every call, which waits for the GPU to drain."""
    order = [i for _, idx in groups for i in idx]
    to_groups = torch.tensor(order, dtype=torch.long)
    to_layers = torch.empty_like(to_groups)
    to_layers[to_groups] = torch.arange(len(order))
    return to_groups.to(device), to_layers.to(device)


def to_layer_order(values: Tensor, groups) -> Tensor:
    """Per-layer values computed group by group, back in layer order."""
    if len(groups) > 1 and any(len(idx) > 1 for _, idx in groups):
        return values[group_permutations(groups, values.device)[1]]
    return values


def to_group_order(values: Tensor, groups) -> list[Tensor]:
    """Per-layer values split per group (the inverse of :func:`to_layer_order`)."""
    if any(len(idx) > 1 for _, idx in groups):
        values = values[group_permutations(groups, values.device)[0]]
    return list(torch.split(values, [len(idx) for _, idx in groups]))


def upstream_coefficient(values: Tensor, grad_values: Tensor, squared: bool, scale: float) -> Tensor:
    """The per-layer factor of a penalty's gradient ``scale * dP``: ``scale * g`` for the
    squared penalty ``P``, and for ``sqrt(P)``, whose gradient is ``dP / (2 sqrt(P))``,
    ``scale * g / (2 value)`` (zero where the value is zero). ``scale`` is 4 for the dense
    penalty (``dP = 4 X (G - I)``) and 1 where the kernels fold the 4 in already (LoRA)."""
    if squared:
        return scale * grad_values.float()
    return torch.where(values > 0, (0.5 * scale) * grad_values / values, torch.zeros_like(values))


# ----------------------------------------------------------------------------- eager twin

def grad_op(ctx, plain: Callable, registered: Callable) -> Callable:
    """In a backward: the plain gradient function on the eager path (``ListOp``), its
    registered op under torch.compile (traceable with its fake)."""
    return plain if getattr(ctx, "eager", False) else registered


class ListOp:
    """A registered op whose leading arguments are tensor lists, with its one autograd
    definition (``setup_context`` / ``backward`` as given to ``register_autograd``).

    :meth:`__call__` runs it. Under torch.compile that is the registered op (opaque to
    tracing, with its fake); in eager mode it is an ``autograd.Function`` over the same
    implementation, ``setup_context`` and ``backward``, without the custom-op dispatch, whose
    Python cost grows with the number of list arguments (milliseconds for a ViT's 100 tensors).
    ``backward`` reads ``ctx.eager`` to call the plain gradient function instead of its
    registered op there. The op's first output is the differentiable one. ``num_args``: the
    op's own argument count; a call's further arguments are dropped (the plans pass every
    backend the same ones).
    """

    def __init__(self, op, impl: Callable, setup_context: Callable, backward: Callable, num_lists: int,
                 num_args: int | None = None):
        self.op, self.impl, self.num_lists, self.num_args = op, impl, num_lists, num_args
        self.setup_context, self.backward = setup_context, backward
        op.register_autograd(backward, setup_context=setup_context)

    def __call__(self, *args):
        if self.num_args is not None:  # arguments past the op's own (a plan's common ones) are dropped
            args = args[:self.num_args]
        if torch.compiler.is_compiling():
            return self.op(*args)[0]
        lists, statics = args[:self.num_lists], args[self.num_lists:]
        sizes = tuple(len(x) for x in lists)
        return _EagerListOp.apply(self, sizes, statics, *[t for x in lists for t in x])


class _EagerListOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, op: ListOp, sizes, statics, *tensors):
        lists, pos = [], 0
        for n in sizes:
            lists.append(list(tensors[pos:pos + n]))
            pos += n
        inputs = (*lists, *statics)
        output = op.impl(*inputs)
        ctx.eager, ctx.list_op, ctx.sizes, ctx.num_outputs = True, op, sizes, len(output)
        op.setup_context(ctx, inputs, output)
        return output[0]

    @staticmethod
    def backward(ctx, grad):
        grads = ctx.list_op.backward(ctx, grad, *([None] * (ctx.num_outputs - 1)))
        flat = []
        for g, n in zip(grads[:len(ctx.sizes)], ctx.sizes):
            flat.extend(g if g is not None else [None] * n)
        return (None, None, None, *flat)
