"""The dual rules of the layers a ViT is made of, in PyTorch ops (the reference-exact path
everywhere): linear (with its fused Triton kernel, chosen by ``policy.py``), conv2d, LayerNorm,
BatchNorm, GELU, softmax and elementwise ops. Each takes primal inputs and their tangents
(``None`` = zero) and returns ``(primal output, tangent output)``."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._C._functorch import is_functorch_wrapped_tensor

from .policy import compute_dtype, kernel_how, measured_triton
from .values import Dual, bind, jvp_fallback, parameters, primal_of, split, wrap


def _linear_key(x, dx, weight, dweight, bias, dbias) -> tuple:
    """(M, K, N, dtype, which tangent parts): plain values, cheap to hash on every call."""
    parts = (dx is not None, dweight is not None, bias is not None, dbias is not None)
    return (x.numel() // x.shape[-1], x.shape[-1], weight.shape[0], compute_dtype(x), parts)


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


def _fused_linear(x, dx, weight, dweight, bias, dbias):
    from .triton_backend import FusedDualLinear

    dtype = compute_dtype(x)
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
        how = kernel_how("linear", x, dx, weight, dweight)
        if how == "triton" or (how == "measure" and linear_runs_triton(x, dx, weight, dweight, bias, dbias)):
            return _fused_linear(x, dx, weight, dweight, bias, dbias)
    return _library_linear(x, dx, weight, dweight, bias, dbias)


def _library_linear(x, dx, weight, dweight, bias, dbias):
    if dweight is not None and dx is not None and dx.shape == x.shape and x.dim() >= 2:
        # x as rows once, shared by the primal and the tangent (a strided x, e.g. attention's
        # transposed sequence, is copied once, not once per product); x dW^T + db, then dx W^T
        # accumulated into it by the same GEMM (beta = 1): no separate sums (the op count of a
        # step is what a GPU's host must issue)
        k, lead = x.shape[-1], x.shape[:-1]
        rows = x.reshape(-1, k)
        with torch.no_grad():
            y = F.linear(rows, weight, bias)
        dy = torch.addmm(F.linear(rows, dweight, dbias), dx.reshape(-1, k), weight.t())
        return y.view(*lead, y.shape[-1]), dy.view(*lead, dy.shape[-1])
    with torch.no_grad():
        y = F.linear(x, weight, bias)
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


# (shape, dtype, device) -> (zeros, ones) in the statistics' shape, made once: every LayerNorm
# of a model has the same statistics shape, so a step issues no op for them. Never written to.
_UNIT_STATISTICS: dict[tuple, tuple[Tensor, Tensor]] = {}


def _unit_statistics(rstd: Tensor) -> tuple[Tensor, Tensor]:
    """The mean 0 and rstd 1 of ``xhat`` itself, in ``rstd``'s shape (the native LayerNorm
    backward reads them as dense tensors). Kept per shape in eager mode; made fresh under
    torch.compile, inside vmap or CUDA-graph capture (no tensor made there may outlive it)."""
    if (torch.compiler.is_compiling() or is_functorch_wrapped_tensor(rstd)
            or (rstd.is_cuda and torch.cuda.is_current_stream_capturing())):
        with torch.no_grad():
            return torch.zeros_like(rstd), torch.ones_like(rstd)
    key = (tuple(rstd.shape), rstd.dtype, rstd.device)
    pair = _UNIT_STATISTICS.get(key)
    if pair is None:
        if len(_UNIT_STATISTICS) >= 32:  # a few shapes per process (batch sizes); bound it anyway
            _UNIT_STATISTICS.clear()
        with torch.no_grad():
            pair = _UNIT_STATISTICS[key] = (torch.zeros_like(rstd), torch.ones_like(rstd))
    return pair


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
    # dy = (J dx) w + xh dw + db, each product accumulated by addcmul (three ops, not five)
    dy = dbias
    if dweight is not None:
        dy = xhat * dweight if dy is None else torch.addcmul(dy, xhat, dweight)
    if dx is not None:
        zero, one = _unit_statistics(rstd)
        dxhat = LayerNormTangent.apply(dx.to(xhat.dtype), xhat, rstd, zero, one, normalized_shape)
        if weight is None:
            dy = add_terms(dy, dxhat)
        else:
            dy = dxhat * weight if dy is None else torch.addcmul(dy, dxhat, weight)
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


# ----------------------------------------------------------------------------- torch-function rules
# Each binds a torch function's arguments and calls the dual rule above: the entries of
# fastortho.dual.RULES for these ops (one layer of rules per op, here).

_LAYER_NORM = parameters(F.layer_norm)
_BATCH_NORM = parameters(F.batch_norm)


def linear_rule(func, args, kwargs):
    a = dict(zip(("input", "weight", "bias"), args), **kwargs)
    return wrap(*dual_linear(*split(a["input"]), *split(a["weight"]), *split(a.get("bias"))))


def conv2d_rule(func, args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a = dict(zip(names, args), **kwargs)
    return wrap(*dual_conv2d(*split(a["input"]), *split(a["weight"]), *split(a.get("bias")),
                                 a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1), a.get("groups", 1)))


def layer_norm_rule(func, args, kwargs):
    g = bind(_LAYER_NORM, args, kwargs)
    return wrap(*dual_layer_norm(*split(g["input"]), g["normalized_shape"], *split(g["weight"]),
                                     *split(g["bias"]), g["eps"]))


def batch_norm_rule(func, args, kwargs):
    g = bind(_BATCH_NORM, args, kwargs)
    if isinstance(g["running_mean"], Dual) or isinstance(g["running_var"], Dual):
        return jvp_fallback(func, args, kwargs)
    return wrap(*dual_batch_norm(*split(g["input"]), g["running_mean"], g["running_var"], *split(g["weight"]),
                                     *split(g["bias"]), g["training"], g["momentum"], g["eps"]))


def gelu_rule(func, args, kwargs):
    return wrap(*dual_gelu(*split(args[0]), kwargs.get("approximate", args[1] if len(args) > 1 else "none")))


def softmax_rule(func, args, kwargs):
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        raise ValueError("softmax on a dual tensor needs an explicit dim")
    dtype = kwargs.get("dtype")
    if dtype is None and len(args) > (3 if func is F.softmax else 2):
        dtype = args[3 if func is F.softmax else 2]
    return wrap(*dual_softmax(*split(x), dim, dtype))


def pointwise_rule(derivative):
    """Unary elementwise ops ``y = f(x)`` with ``f'`` from ``(x, y)``."""

    def rule(func, args, kwargs):
        x, tx = split(args[0])
        with torch.no_grad():
            y = func(x, *[primal_of(a) for a in args[1:]], **kwargs)
            d = derivative(x, y) if tx is not None else None
        return wrap(*dual_pointwise(y, tx, d))
    return rule
