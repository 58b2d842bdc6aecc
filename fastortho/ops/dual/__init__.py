"""Per-op dual functions: each takes primal inputs and their tangents (``None`` = zero) and
returns ``(primal output, tangent output)`` (docs/design.md section 1, "linearized model").

The primal is computed without autograd: in a linearized model ``f(x; th0)`` does not depend
on the trained parameters. The tangent is computed with autograd, as ordinary differentiable
PyTorch ops that are linear in the tangents, so its backward keeps only primal activations
(never a second copy of the network's activations, as ``torch.func.jvp`` does). These
functions are the seams where fused kernels plug in.

Which file holds what:

- ``__init__.py``       the dual rules in PyTorch ops (the reference-exact path everywhere) and
                        the choice of a kernel per call (``fastortho.set_kernels``)
- ``triton_backend.py`` autograd Functions (with vmap rules) over the Triton kernels of
                        ``fastortho/kernels/dual_linear.py`` and ``attention_tangent.py``

The ``Dual`` tensor that routes a module's forward through these rules is
``fastortho/dual.py``. Reference: ``torch.func.jvp`` (``fastortho/reference.py``
``jvp_linearized``); tests ``tests/test_linearize.py`` and ``tests/test_dual_kernels.py``;
benchmarks ``bench/test_bench_linearize.py``, ``bench/test_bench_dual_kernels.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor

from ..._config import kernel_policy
from .._common import mm_accumulate_fp32, triton_available

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
    if any(d not in (torch.float32, torch.float16, torch.bfloat16) for d in dtypes):
        return "torch"  # float64 (the reference precision) stays on PyTorch ops
    if policy == "triton":
        return "triton"
    if device_type != "cuda" or not triton_available():
        return "torch"
    return "measure" if op in MEASURED_KERNELS else "torch"


def _kernel_how(op: str, *tensors: Tensor | None) -> str:
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


def _linear_key(x, dx, weight, dweight, bias, dbias) -> tuple:
    """(M, K, N, dtype, which tangent parts): plain values, cheap to hash on every call."""
    parts = (dx is not None, dweight is not None, bias is not None, dbias is not None)
    return (x.numel() // x.shape[-1], x.shape[-1], weight.shape[0], _compute_dtype(x), parts)


def linear_runs_triton(x, dx, weight, dweight, bias=None, dbias=None) -> bool:
    """:func:`measured_triton` for a dual linear, forward only (both paths' backwards are the
    same two GEMMs), without autograd."""
    def candidates():
        def timed(run):
            def once():
                with torch.no_grad():
                    return [run(x, dx, weight, dweight, bias, dbias)[1]]
            return once
        tensors = [t for t in (x, dx, weight, dweight, bias, dbias) if t is not None]
        return tensors, {"torch": timed(_library_linear), "triton": timed(_fused_linear)}
    return measured_triton("linear", _linear_key(x, dx, weight, dweight, bias, dbias), x.device, candidates)


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _fused_linear(x, dx, weight, dweight, bias, dbias):
    from .triton_backend import FusedDualLinear

    dtype = _compute_dtype(x)
    k, n = x.shape[-1], weight.shape[0]
    def cast(t):
        return None if t is None else t.to(dtype)

    x2 = cast(x).reshape(-1, k)
    dx2 = None if dx is None else cast(dx).reshape(-1, k)
    y, dy = FusedDualLinear.apply(x2, dx2, cast(weight), cast(dweight), cast(bias), cast(dbias))
    lead = x.shape[:-1]
    return y.view(*lead, n), dy.view(*lead, n)


def add_terms(*terms: Tensor | None) -> Tensor | None:
    """Sum of the terms that are not None (None if all are)."""
    out = None
    for t in terms:
        if t is not None:
            out = t if out is None else out + t
    return out


def dual_linear(x: Tensor, dx: Tensor | None, weight: Tensor, dweight: Tensor | None,
                bias: Tensor | None = None, dbias: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """``y = x W^T + b``, ``dy = x dW^T + dx W^T + db`` (docs/design.md section 1): the tangent
    as one GEMM and one accumulating GEMM (cuBLAS on CUDA), or one fused Triton kernel that
    computes both with each ``x`` and ``W`` tile loaded once: forced by
    ``set_kernels("triton")``, chosen per shape by measurement under "auto" on CUDA."""
    if (dx is not None or dweight is not None) and (dx is None or dx.shape == x.shape):
        how = _kernel_how("linear", x, dx, weight, dweight)
        if how == "triton" or (how == "measure" and linear_runs_triton(x, dx, weight, dweight, bias, dbias)):
            return _fused_linear(x, dx, weight, dweight, bias, dbias)
    return _library_linear(x, dx, weight, dweight, bias, dbias)


def _library_linear(x, dx, weight, dweight, bias, dbias):
    with torch.no_grad():
        y = F.linear(x, weight, bias)
    if dweight is not None and dx is not None and dx.shape == x.shape and x.dim() >= 2:
        # x dW^T + db, then dx W^T accumulated into it by the same GEMM (beta = 1): two library
        # calls and no separate sums (the op count of a step is what a GPU's host must issue)
        k = x.shape[-1]
        dy = torch.addmm(F.linear(x.reshape(-1, k), dweight, dbias), dx.reshape(-1, k), weight.t())
        return y, dy.view(*x.shape[:-1], dy.shape[-1])
    dy = add_terms(F.linear(x, dweight) if dweight is not None else None,
                   F.linear(dx, weight) if dx is not None else None,
                   dbias)
    return y, dy


def dual_conv2d(x, dx, weight, dweight, bias=None, dbias=None, stride=1, padding=0, dilation=1, groups=1):
    """``conv(x, W) + b`` and ``conv(x, dW) + conv(dx, W) + db``."""
    with torch.no_grad():
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
    dy = add_terms(F.conv2d(x, dweight, None, stride, padding, dilation, groups) if dweight is not None else None,
                   F.conv2d(dx, weight, None, stride, padding, dilation, groups) if dx is not None else None,
                   dbias.view(1, -1, 1, 1) if dbias is not None else None)
    return y, dy


class LayerNormTangent(torch.autograd.Function):
    """``t -> J t``, ``J`` the Jacobian of ``xh = (x - mean) * rstd`` in ``x`` over the
    normalized dims: ``J t = rstd (t - mean(t) - xh mean(t xh))``, one call of the native
    LayerNorm backward kernel (run on ``xh`` with zero mean and unit rstd, then scaled by
    ``rstd``), so only ``xh`` and ``rstd`` are kept, as an ordinary LayerNorm keeps. ``J`` is
    symmetric (docs/design.md section 7): the backward of this linear map is the same call."""
    generate_vmap_rule = True

    @staticmethod
    def forward(t, xhat, rstd, zero, one, normalized_shape):
        return _layer_norm_jacobian(t, xhat, rstd, zero, one, normalized_shape)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[1:5])  # xhat, rstd, zero, one
        ctx.normalized_shape = inputs[5]

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, zero, one = ctx.saved_tensors
        return _layer_norm_jacobian(g, xhat, rstd, zero, one, ctx.normalized_shape), None, None, None, None, None


def _layer_norm_jacobian(t, xhat, rstd, zero, one, normalized_shape):
    """``zero`` / ``one``: the per-row statistics of ``xhat`` itself (``rstd``'s shape)."""
    centred = torch.ops.aten.native_layer_norm_backward(t.contiguous(), xhat, normalized_shape, zero, one, None, None,
                                                        [True, False, False])[0]
    return centred * rstd


def _layer_norm_dtype(x: Tensor) -> torch.dtype:
    """The dtype ``F.layer_norm`` returns for ``x``: fp32 under autocast (its fp32 list)."""
    return torch.float32 if torch.is_autocast_enabled(x.device.type) and x.is_floating_point() else x.dtype


def dual_layer_norm(x, dx, normalized_shape, weight=None, dweight=None, bias=None, dbias=None, eps=1e-5):
    """LayerNorm: with ``xh = (x - mu) / sigma``,
    ``dy = w * (dx - mean(dx) - xh * mean(dx * xh)) / sigma + dw * xh + db``, the bracket one
    native LayerNorm backward call (:class:`LayerNormTangent`). Statistics in fp32 for
    half-precision inputs (as autocast runs layer_norm)."""
    normalized_shape = [int(n) for n in normalized_shape]
    with torch.no_grad():
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        xhat, mean, rstd = torch.ops.aten.native_layer_norm(xf, normalized_shape, None, None, eps)
        y = xhat
        if weight is not None:
            y = torch.addcmul(bias.to(xhat.dtype), xhat, weight.to(xhat.dtype)) if bias is not None \
                else xhat * weight.to(xhat.dtype)
        elif bias is not None:
            y = xhat + bias.to(xhat.dtype)
        y = y.to(_layer_norm_dtype(x))
        if dx is None and dweight is None:
            return y, dbias
    dxhat = None
    if dx is not None:
        with torch.no_grad():
            zero, one = torch.zeros_like(rstd), torch.ones_like(rstd)
        dxhat = LayerNormTangent.apply(dx.to(xhat.dtype), xhat, rstd, zero, one, normalized_shape)
        if weight is not None:
            dxhat = dxhat * weight
    dy = add_terms(dxhat, xhat * dweight if dweight is not None else None, dbias)
    return y, (dy.to(y.dtype) if dy is not None else None)


def dual_batch_norm(x, dx, running_mean, running_var, weight=None, dweight=None, bias=None, dbias=None,
                    training=False, momentum=0.1, eps=1e-5):
    """BatchNorm (channels on dim 1). With batch statistics (training, or no running stats)
    the tangent is LayerNorm's over the non-channel dims; with running statistics it is
    affine: ``dy = w dx / sqrt(var + eps) + dw xh + db``. The running statistics are
    updated once, by the primal."""
    with torch.no_grad():
        y = F.batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps)
        if dx is None and dweight is None:
            return y, (_channels(dbias, x) if dbias is not None else None)
        shape = [1, -1] + [1] * (x.dim() - 2)
        dims = [0] + list(range(2, x.dim()))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        batch_stats = training or running_mean is None
        if batch_stats:
            mean = xf.mean(dims, keepdim=True)
            rstd = torch.rsqrt(xf.var(dims, unbiased=False, keepdim=True) + eps)
        else:
            mean = running_mean.view(shape).to(xf.dtype)
            rstd = torch.rsqrt(running_var.view(shape).to(xf.dtype) + eps)
        xhat = (xf - mean) * rstd
    dxhat = None
    if dx is not None:
        dxf = dx.to(xhat.dtype)
        if batch_stats:
            dxhat = rstd * (dxf - dxf.mean(dims, keepdim=True) - xhat * (dxf * xhat).mean(dims, keepdim=True))
        else:
            dxhat = rstd * dxf
        if weight is not None:
            dxhat = dxhat * weight.view(shape)
    dy = add_terms(dxhat, xhat * dweight.view(shape) if dweight is not None else None,
                   _channels(dbias, x) if dbias is not None else None)
    return y, (dy.to(y.dtype) if dy is not None else None)


def _channels(t: Tensor, x: Tensor) -> Tensor:
    return t.view([1, -1] + [1] * (x.dim() - 2))


class GeluTangent(torch.autograd.Function):
    """``dx -> gelu'(x) dx``: one ``gelu_backward`` call; the map is diagonal, so its backward
    is the same call on the incoming gradient. Saves ``x`` only (an ordinary step keeps it too)."""
    generate_vmap_rule = True

    @staticmethod
    def forward(dx, x, approximate):
        return torch.ops.aten.gelu_backward(dx, x, approximate=approximate)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])
        ctx.approximate = inputs[2]

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return torch.ops.aten.gelu_backward(g, x, approximate=ctx.approximate), None, None


def dual_gelu(x, dx, approximate: str = "none"):
    with torch.no_grad():
        y = F.gelu(x, approximate=approximate)
    if dx is None:
        return y, None
    return y, GeluTangent.apply(dx.to(x.dtype), x, approximate)


def dual_pointwise(y: Tensor, dx: Tensor | None, derivative: Tensor) -> tuple[Tensor, Tensor | None]:
    """``dy = f'(x) * dx`` with the derivative computed (without autograd) by the caller."""
    return y, (dx * derivative if dx is not None else None)


def dual_softmax(x, dx, dim, dtype=None):
    with torch.no_grad():
        y = torch.softmax(x, dim, dtype=dtype)
    if dx is None:
        return y, None
    dx = dx.to(y.dtype)
    return y, y * (dx - (y * dx).sum(dim, keepdim=True))


# ----------------------------------------------------------------------------- attention

def additive_mask(mask: Tensor | None, dtype: torch.dtype, attend_when_true: bool) -> Tensor | None:
    """A float mask to add to the scores. Boolean masks: SDPA's ``True`` = attend;
    nn.MultiheadAttention's ``True`` = masked out (``attend_when_true=False``)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        blocked = ~mask if attend_when_true else mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(blocked, float("-inf"))
    return mask.to(dtype)


def _operand_dtype(t: Tensor) -> torch.dtype:
    """The attention tangent's operand format: under autocast its dtype (half operands, fp32
    accumulation, as the primal attention runs); otherwise the input's own (float64 stays)."""
    if t.dtype != torch.float64 and torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _rows(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``[..., L, D]`` as ``[B, L, D]`` in ``dtype`` (one copy if the heads are a permuted view):
    batched products on 3-D tensors are one ``bmm`` each, where ``matmul`` on 4-D views expands,
    copies and reshapes per call."""
    return t.to(dtype).reshape(-1, t.shape[-2], t.shape[-1])


def _probs(q: Tensor, k: Tensor, mask: Tensor | None, scale: float, lead: tuple) -> Tensor:
    """Softmax of ``c Q K^T + mask`` for ``[B, L, D]`` rows, in fp32 (float64 for float64
    rows); ``lead`` is the leading shape the mask broadcasts against."""
    s = mm_accumulate_fp32(q, k.transpose(1, 2)) * scale
    if mask is not None:
        s = (s.view(*lead, *s.shape[1:]) + mask).view(s.shape)
    return torch.softmax(s, dim=-1)


def _tangent_rows(q, k, v, o, dq, dk, dv, mask, scale, lead, shape, dtype):
    """``dO`` in ``shape`` and ``dtype`` from ``[B, L, D]`` rows in one operand format: the
    products take half operands (``P`` and ``P * dS`` rounded to it, as flash attention
    rounds ``P``) and accumulate in fp32; the softmax and the elementwise terms are fp32.

    The result is the output of its last op, never a view or a no-op cast of an
    intermediate: torch 2.11's dynamo drops the gradient of an autograd.Function whose
    forward returns such an alias (docs/design.md section 7)."""
    p = _probs(q, k, mask, scale, lead)
    ds = mm_accumulate_fp32(q, dk.transpose(1, 2), mm_accumulate_fp32(dq, k.transpose(1, 2))) * scale
    z = p * ds
    # (P * dS) V + P dV - rowsum(P * dS) O, the last term written straight in the output's shape
    pv = mm_accumulate_fp32(z.to(q.dtype), v, mm_accumulate_fp32(p.to(q.dtype), dv))
    rowsum = z.sum(-1, keepdim=True)
    do = torch.addcmul(pv.view(shape), rowsum.view(*shape[:-1], 1), o.view(shape), value=-1.0)
    return do if do.dtype == dtype else do.to(dtype)


def attention_tangent(q, k, v, o, dq, dk, dv, mask, scale):
    """The tangent of ``O = softmax(c Q K^T + mask) V`` (docs/design.md section 1):
    ``dS = c (dQ K^T + Q dK^T)``, ``dO = (P * dS) V - rowsum(P * dS) O + P dV``.
    Plain differentiable ops (used without autograd, e.g. under vmap); operands in the
    autocast dtype under autocast, fp32 accumulation (:func:`_tangent_rows`)."""
    dtype, lead = _operand_dtype(q), tuple(q.shape[:-2])
    with torch.autocast(q.device.type, enabled=False):  # the operand format is chosen here, not recast
        return _tangent_rows(*(_rows(t, dtype) for t in (q, k, v, o, dq, dk, dv)), mask, scale, lead, o.shape, dtype)


class AttentionTangent(torch.autograd.Function):
    """``(dQ, dK, dV) -> dO`` at fixed primal ``Q, K, V, O``, with the gradient of that linear
    map: ``g_S = P * (g V^T - rowsum(g * O))`` (the flash-attention backward's ``dS``),
    ``grad dQ = c g_S K``, ``grad dK = c g_S^T Q``, ``grad dV = P^T g``. The primal ``Q, K, V``
    are saved (as the ``[B, L, D]`` rows the products use) and ``P`` is recomputed in
    backward. ``O`` is saved only with ``keep_o`` (the caller's ``O`` is a view of a tensor
    kept anyway, e.g. the output projection's input, so saving it costs nothing); otherwise
    backward recomputes ``O = P V`` rather than hold a second copy. Operands in the autocast
    dtype under autocast, fp32 accumulation."""

    @staticmethod
    def forward(ctx, q, k, v, o, dq, dk, dv, mask, scale, keep_o=False):
        lead, dtype = tuple(q.shape[:-2]), _operand_dtype(q)
        with torch.autocast(q.device.type, enabled=False):
            q3, k3, v3 = _rows(q, dtype), _rows(k, dtype), _rows(v, dtype)
            do = _tangent_rows(q3, k3, v3, _rows(o, dtype), _rows(dq, dtype), _rows(dk, dtype), _rows(dv, dtype),
                               mask, scale, lead, o.shape, dtype)
        ctx.save_for_backward(q3, k3, v3, mask, o if keep_o else None)
        ctx.scale, ctx.lead = scale, lead
        ctx.shapes = (dq.shape, dk.shape, dv.shape)
        ctx.dtypes = (dq.dtype, dk.dtype, dv.dtype)
        return do  # fresh: see _tangent_rows

    @staticmethod
    def backward(ctx, g):
        q, k, v, mask, o = ctx.saved_tensors
        c = ctx.scale
        with torch.autocast(q.device.type, enabled=False):
            g = _rows(g, q.dtype)
            p = _probs(q, k, mask, c, ctx.lead)
            if o is None:
                rowsum = (g * mm_accumulate_fp32(p.to(q.dtype), v)).sum(-1, keepdim=True)
            else:  # O in the caller's layout: the row sums without reshaping it
                rowsum = (g.view(o.shape).to(p.dtype) * o).sum(-1, keepdim=True).view(*g.shape[:-1], 1)
            grad_dv = mm_accumulate_fp32(p.transpose(1, 2).to(q.dtype), g)
            gs = p * (mm_accumulate_fp32(g, v.transpose(1, 2)) - rowsum)
            grad_dq = mm_accumulate_fp32(gs.to(q.dtype), k) * c
            grad_dk = mm_accumulate_fp32(gs.transpose(1, 2).to(q.dtype), q) * c
        (sq, sk, sv), (tq, tk, tv) = ctx.shapes, ctx.dtypes
        return (None, None, None, None, grad_dq.view(sq).to(tq), grad_dk.view(sk).to(tk), grad_dv.view(sv).to(tv),
                None, None, None)


def _causal_mask(q: Tensor, k: Tensor) -> Tensor:
    L, S = q.shape[-2], k.shape[-2]
    keep = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    return additive_mask(keep, torch.float32, attend_when_true=True)


def _run_fused_sdpa(q, dq, k, dk, v, dv, is_causal, scale):
    from .triton_backend import FusedAttentionTangent

    dtype = _compute_dtype(q)
    zeros = torch.zeros((), dtype=dtype, device=q.device)
    tans = [(t if t is not None else zeros.expand(ref.shape)).to(dtype) for t, ref in ((dq, q), (dk, k), (dv, v))]
    o, do, _ = FusedAttentionTangent.apply(q.to(dtype), k.to(dtype), v.to(dtype), *tans, scale, is_causal)
    return o, do


def _run_torch_sdpa(q, dq, k, dk, v, dv, is_causal, scale):
    with torch.no_grad():
        o = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    return o, _sdpa_tangent(q, dq, k, dk, v, dv, o, None, is_causal, scale)


def attention_runs_triton(q, dq, k, dk, v, dv, is_causal, scale) -> bool:
    """:func:`measured_triton` for the attention tangent: forward and the backward of the
    tangent map (the two paths' backwards differ), on detached copies of the tangents with a
    fixed incoming gradient, so the caller's graph and random state are untouched."""
    def candidates():
        gen = torch.Generator(device=q.device).manual_seed(0)
        g = torch.randn(q.shape[:-1] + v.shape[-1:], generator=gen, device=q.device, dtype=_compute_dtype(q))

        def timed(run):
            def once():
                leaves = [None if t is None else t.detach().requires_grad_(True) for t in (dq, dk, dv)]
                with torch.enable_grad():
                    _, do = run(q, leaves[0], k, leaves[1], v, leaves[2], is_causal, scale)
                    do.backward(g.to(do.dtype))
                return [do.detach(), *(leaf.grad for leaf in leaves if leaf is not None)]
            return once
        tensors = [t for t in (q, dq, k, dk, v, dv) if t is not None]
        return tensors, {"torch": timed(_run_torch_sdpa), "triton": timed(_run_fused_sdpa)}

    key = (
        tuple(q.shape),
        k.shape[-2],
        v.shape[-1],
        _compute_dtype(q),
        (dq is not None, dk is not None, dv is not None),
        bool(is_causal),
    )
    return measured_triton("attention", key, q.device, candidates)


def _fused_sdpa(q, dq, k, dk, v, dv, attn_mask, is_causal, scale):
    """``(O, dO)`` from the one-pass Triton kernel where the policy takes it for this call
    (no mask other than causal, head size <= 128; forced by "triton", measured faster under
    "auto" on CUDA); otherwise None."""
    if not (attn_mask is None and q.shape[-1] <= 128 and q.dim() >= 3 and q.shape[:-2] == k.shape[:-2] == v.shape[:-2]):
        return None
    how = _kernel_how("attention", q, k, v, dq, dk, dv)
    if how == "triton" or (how == "measure" and attention_runs_triton(q, dq, k, dk, v, dv, is_causal, scale)):
        return _run_fused_sdpa(q, dq, k, dk, v, dv, is_causal, scale)
    return None


def _sdpa_tangent(q, dq, k, dk, v, dv, o, attn_mask, is_causal, scale, keep_o=False):
    """``dO`` at the primal ``O`` by PyTorch ops (differentiable in the tangents where they
    require grad); ``keep_o``: ``O`` is a view of a tensor the caller keeps (AttentionTangent)."""
    c = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    mask_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    mask = additive_mask(attn_mask, mask_dtype, attend_when_true=True)
    if is_causal:
        causal = _causal_mask(q, k).to(mask_dtype)
        mask = causal if mask is None else mask + causal
    zeros = torch.zeros((), dtype=q.dtype, device=q.device)
    dq = dq if dq is not None else zeros.expand(q.shape)
    dk = dk if dk is not None else zeros.expand(k.shape)
    dv = dv if dv is not None else zeros.expand(v.shape)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (dq, dk, dv)):
        return AttentionTangent.apply(q, k, v, o, dq, dk, dv, mask, c, keep_o)
    return attention_tangent(q, k, v, o, dq, dk, dv, mask, c)


def _check_sdpa(dropout_p, enable_gqa):
    if dropout_p:
        raise NotImplementedError("attention dropout (dropout_p > 0) in a linearized model: the tangent "
                                  "would need the primal's dropout mask; use eval mode or dropout_p=0")
    if enable_gqa:
        raise NotImplementedError("grouped-query attention (enable_gqa=True) in a linearized model")


def dual_sdpa(q, dq, k, dk, v, dv, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Scaled dot-product attention and its tangent. On CUDA (policy "auto"), without a mask
    other than causal: one Triton kernel computes ``O`` and ``dO`` in one pass. Otherwise the
    primal by ``F.scaled_dot_product_attention`` (any backend: flash, memory-efficient, math)
    and the tangent by the one-pass formula in PyTorch ops."""
    _check_sdpa(dropout_p, enable_gqa)
    has_tangent = not (dq is None and dk is None and dv is None)
    fused = _fused_sdpa(q, dq, k, dk, v, dv, attn_mask, is_causal, scale) if has_tangent else None
    if fused is not None:
        return fused
    with torch.no_grad():
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    if not has_tangent:
        return o, None
    return o, _sdpa_tangent(q, dq, k, dk, v, dv, o, attn_mask, is_causal, scale)


def _chunk3(t: Tensor | None, dim: int = 0) -> tuple:
    return (None, None, None) if t is None else t.chunk(3, dim=dim)


def dual_multi_head_attention(query, key, value, num_heads, in_proj, in_proj_bias, out_proj, out_proj_bias,
                              attn_mask=None, key_padding_mask=None, separate_proj=None, is_causal=False):
    """``nn.MultiheadAttention``'s computation (``F.multi_head_attention_forward`` without
    bias_k/bias_v, zero-attention, dropout or returned weights) on dual values. Every
    argument that can carry a tangent is a ``(primal, tangent)`` pair; ``query`` etc. are
    ``(L, N, E)`` or unbatched ``(L, E)``. ``separate_proj``: ``(q, k, v)`` weight pairs
    when nn.MultiheadAttention keeps them apart."""
    batched = query[0].dim() == 3

    def batch(pair):
        p, t = pair
        return (p, t) if batched else (p.unsqueeze(1), t.unsqueeze(1) if t is not None else None)

    same_kv, same_qk = key is value, query is key
    query, key, value = batch(query), batch(key), batch(value)
    key = query if same_qk else key
    value = key if same_kv else value
    L, N, E = query[0].shape
    S = key[0].shape[0]
    H = num_heads
    hd = E // H
    if separate_proj is not None:
        (wq, dwq), (wk, dwk), (wv, dwv) = separate_proj
    else:
        (wq, wk, wv), (dwq, dwk, dwv) = in_proj[0].chunk(3), _chunk3(in_proj[1])
    if in_proj_bias[0] is not None:
        (bq, bk, bv), (dbq, dbk, dbv) = in_proj_bias[0].chunk(3), _chunk3(in_proj_bias[1])
    else:
        bq = bk = bv = dbq = dbk = dbv = None

    def heads(t: Tensor | None, length: int) -> Tensor | None:  # (len, N, E) -> (N, H, len, hd)
        return None if t is None else t.reshape(length, N, H, hd).permute(1, 2, 0, 3)

    if separate_proj is None and query is key and key is value:
        # Self-attention: one product with the fused weight, as nn.MultiheadAttention does
        # (three would each keep their own contiguous copy of a transposed input).
        qkv, dqkv = dual_linear(*query, *in_proj, *in_proj_bias)
        (q, k, v), (dq, dk, dv) = qkv.chunk(3, dim=-1), _chunk3(dqkv, dim=-1)
    else:
        q, dq = dual_linear(*query, wq, dwq, bq, dbq)
        k, dk = dual_linear(*key, wk, dwk, bk, dbk)
        v, dv = dual_linear(*value, wv, dwv, bv, dbv)
    q, dq, k, dk, v, dv = heads(q, L), heads(dq, L), heads(k, S), heads(dk, S), heads(v, S), heads(dv, S)

    mask = None
    if attn_mask is not None:
        m = additive_mask(attn_mask, q.dtype, attend_when_true=False)
        mask = m.view(1, 1, L, S) if m.dim() == 2 else m.view(N, H, L, S)
    if key_padding_mask is not None:
        kp = additive_mask(key_padding_mask, q.dtype, attend_when_true=False).view(N, 1, 1, S)
        mask = kp if mask is None else mask + kp
    def merge(t: Tensor | None) -> Tensor | None:  # (N, H, L, hd) -> (L, N, E)
        return None if t is None else t.permute(2, 0, 1, 3).reshape(L, N, E)

    causal = is_causal and mask is None
    has_tangent = not (dq is None and dk is None and dv is None)
    fused = _fused_sdpa(q, dq, k, dk, v, dv, mask, causal, None) if has_tangent else None
    if fused is not None:
        attended, dattended = merge(fused[0]), merge(fused[1])
    else:
        with torch.no_grad():
            attended = merge(F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal))
        # The tangent sees O as a view of the output projection's input, which that projection's
        # tangent keeps for its backward when its weight is tuned: the attention backward then
        # reads it rather than computing P V again (and holds no second copy).
        dattended = merge(_sdpa_tangent(q, dq, k, dk, v, dv, heads(attended, L), mask, causal, None,
                                        keep_o=out_proj[1] is not None)) if has_tangent else None
    out, dout = dual_linear(attended, dattended, *out_proj, *out_proj_bias)
    if not batched:
        out, dout = out.squeeze(1), (dout.squeeze(1) if dout is not None else None)
    return out, dout
