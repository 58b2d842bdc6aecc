"""Dual tensors: a primal value and its tangent flowing through an unmodified module's forward.

:class:`Dual` is a ``torch.Tensor`` subclass (its data is the primal) whose
``__torch_function__`` computes, for every torch function the forward calls, the primal
output and its tangent:

- the rule of :mod:`fastortho.ops.dual` for the ops that matter (linear, conv2d, layer_norm,
  batch_norm, gelu, softmax, elementwise functions, scaled-dot-product attention, the whole
  ``F.multi_head_attention_forward``): binding and maths live there, once, beside the fused
  kernels' seams; this module only lists them in :data:`RULES`;
- the tangent rule of the op's class for the rest of what networks do: ops linear in their
  first argument (reshapes, indexing, sums, casts...), ops linear in each argument (mul,
  matmul, einsum), sums of arguments (add, sub, cat, stack);
- otherwise ``torch.func.jvp`` of that one op, which is correct for any op (listed in
  :data:`FALLBACK_OPS` so that a model's path can be checked).

The primal is computed without autograd, the tangent with it: the tangent is linear in the
tangents of the inputs, and the backward of that linear map needs only primal activations.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import dual as ops
from .ops.dual import attention, rules, values
from .ops.dual.values import (
    FALLBACK_OPS,
    Dual,
    bind,
    call,
    flat_args,
    jvp_fallback,
    parameters,
    primal_call,
    primal_of,
    split,
    tangent_of,
    wrap,
)

# ----------------------------------------------------------------------------- op classes

def _linear_in_first(func, args, kwargs):
    """Ops linear in their first argument; other tensors only shape, index or cast it."""
    first = args[0]
    rest_p = [primal_of(a) for a in args[1:]]
    kw_p = {k: primal_of(v) for k, v in kwargs.items()}
    with torch.no_grad():
        out = func(primal_of(first), *rest_p, **kw_p)
    t = tangent_of(first)
    return wrap(out, func(t, *rest_p, **kw_p) if t is not None else None)


def _multilinear(func, args, kwargs):
    """Ops linear in each tensor argument (mul, matmul, einsum): the product rule."""
    flat, spec, duals = flat_args(args, kwargs)
    primals = [primal_of(v) for v in flat]
    out = primal_call(func, flat, spec)
    terms = []
    for i in duals:
        leaves = list(primals)
        leaves[i] = flat[i].tangent
        terms.append(call(func, leaves, spec))
    return wrap(out, ops.add_terms(*terms))


def _zero_operand(v):
    """What stands for a constant operand of a sum in its tangent: zero."""
    if isinstance(v, Tensor) and v.is_floating_point():
        return torch.zeros((), dtype=v.dtype, device=v.device)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return 0
    return v


def _sum(func, args, kwargs):
    """add / sub (and reversed): the op applied to the tangents, constants replaced by zero
    (keyword arguments such as ``alpha`` kept)."""
    with torch.no_grad():
        out = func(*[primal_of(a) for a in args], **{k: primal_of(v) for k, v in kwargs.items()})
    if not any(isinstance(v, Dual) for v in (*args, *kwargs.values())):
        return out

    def tan(v):
        return v.tangent if isinstance(v, Dual) else _zero_operand(v)
    targs = [tan(a) for a in args[:2]] + list(args[2:])
    tkw = {k: (tan(v) if k in ("input", "other") else v) for k, v in kwargs.items()}
    return wrap(out, func(*targs, **tkw))


def _concat(func, args, kwargs):
    """cat / stack: the op on the tangents, constant pieces as zeros of their shape."""
    seq = args[0] if args else kwargs["tensors"]
    rest = args[1:]
    kw = {k: v for k, v in kwargs.items() if k != "tensors"}
    with torch.no_grad():
        out = func([primal_of(t) for t in seq], *rest, **kw)
    if not any(isinstance(t, Dual) for t in seq):
        return out
    tans = [t.tangent if isinstance(t, Dual) else torch.zeros_like(t) for t in seq]
    return wrap(out, func(tans, *rest, **kw))


def _where(func, args, kwargs):
    if kwargs or len(args) != 3:
        return jvp_fallback(func, args, kwargs)
    # torch.where(cond, a, b); the method is a.where(cond, b)
    cond, a, b = (args[1], args[0], args[2]) if func is Tensor.where else args
    cond = primal_of(cond)
    with torch.no_grad():
        out = torch.where(cond, primal_of(a), primal_of(b))
    ta, tb = tangent_of(a), tangent_of(b)
    if ta is None and tb is None:
        return out
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    return wrap(out, torch.where(cond, ta if ta is not None else zero, tb if tb is not None else zero))


def _masked_fill(func, args, kwargs):
    x, mask, value = args[0], args[1], (args[2] if len(args) > 2 else kwargs["value"])
    with torch.no_grad():
        out = func(primal_of(x), primal_of(mask), primal_of(value))
    t = tangent_of(x)
    return wrap(out, func(t, primal_of(mask), 0.0) if t is not None else None)


def _div(func, args, kwargs):
    a, b = args[0], args[1]
    if func is Tensor.__rtruediv__:
        a, b = b, a
    with torch.no_grad():
        out = torch.div(primal_of(a), primal_of(b), **kwargs)
    if kwargs.get("rounding_mode") is not None:
        return out  # piecewise constant: zero tangent
    ta, tb = tangent_of(a), tangent_of(b)
    if tb is not None:  # d(a / b) = (da - (a / b) db) / b
        return wrap(out, ops.add_terms(ta, -out * tb) / primal_of(b))
    return wrap(out, torch.div(ta, primal_of(b)) if ta is not None else None)


_PAD = parameters(F.pad)
_DROPOUT = parameters(F.dropout)


def _pad(func, args, kwargs):
    g = bind(_PAD, args, kwargs)
    x, pad, mode, value = g["input"], g["pad"], g.get("mode", "constant"), g.get("value")
    with torch.no_grad():
        out = F.pad(primal_of(x), pad, mode, value)
    t = tangent_of(x)
    return wrap(out, F.pad(t, pad, mode, 0.0 if mode == "constant" else None) if t is not None else None)


def _dropout(func, args, kwargs):
    g = bind(_DROPOUT, args, kwargs)
    x, p, training = g["input"], g["p"], g["training"]
    if not training or p == 0:
        return x
    px, tx = split(x)
    with torch.no_grad():
        keep = F.dropout(torch.ones_like(px), p, True)  # the mask, scaled by 1 / (1 - p)
    return wrap(px * keep, tx * keep if tx is not None else None)


# ----------------------------------------------------------------------------- the rest

def _nondifferentiable(func, args, kwargs):
    flat, spec, _ = flat_args(args, kwargs)
    return primal_call(func, flat, spec)


def _metadata(func, args, kwargs):
    """Queries of a tensor's metadata (dtype, shape, ...): the Dual's own data is the primal, so
    the query runs on the arguments as they are (torch functions are disabled here), with no
    tree flattening: models ask these hundreds of times per pass."""
    return func(*args, **kwargs)


def _inplace(func, args, kwargs):
    raise NotImplementedError(
        f"{torch.overrides.resolve_name(func) or func}: in-place ops on values that carry a tangent are not "
        f"supported in a linearized model (use the out-of-place op, e.g. inplace=False)")


T = Tensor
_FIRST_ARG_LINEAR = [
    T.view, T.view_as, T.reshape, T.reshape_as, T.permute, T.transpose, T.t, T.flatten, T.unflatten,
    T.squeeze, T.unsqueeze, T.expand, T.expand_as, T.repeat, T.contiguous, T.clone, T.__getitem__,
    T.narrow, T.select, T.chunk, T.split, T.unbind, T.tensor_split, T.sum, T.mean, T.roll, T.flip,
    T.to, T.float, T.double, T.half, T.bfloat16, T.type_as, T.neg, T.__neg__, T.movedim, T.diagonal,
    T.tril, T.triu, T.cumsum, T.unfold, T.__pos__,
    torch.reshape, torch.permute, torch.transpose, torch.t, torch.flatten, torch.squeeze, torch.unsqueeze,
    torch.narrow, torch.select, torch.chunk, torch.split, torch.unbind, torch.tensor_split, torch.sum,
    torch.mean, torch.roll, torch.flip, torch.neg, torch.movedim, torch.diagonal, torch.tril, torch.triu,
    torch.cumsum, torch.clone, F.adaptive_avg_pool2d, F.avg_pool2d, F.adaptive_avg_pool1d, F.avg_pool1d,
    F.pixel_shuffle, F.unfold, F.fold, F.interpolate, T.mT.__get__, T.T.__get__, T.real.__get__,
]
_MULTILINEAR = [
    T.mul, T.__mul__, T.__rmul__, torch.mul, T.matmul, T.__matmul__, T.__rmatmul__, torch.matmul,
    T.mm, torch.mm, T.bmm, torch.bmm, torch.einsum, T.outer, torch.outer, T.dot, torch.dot,
]
_SUMS = [T.add, T.__add__, T.__radd__, torch.add, T.sub, T.__sub__, T.__rsub__, torch.sub, torch.rsub]
_CONCATS = [torch.cat, torch.stack, torch.concat, torch.concatenate, torch.hstack, torch.vstack]
_NONDIFF = [
    T.detach, torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like, T.new_zeros, T.new_ones, T.new_empty, T.new_full, T.new_tensor, torch.argmax,
    torch.argmin, T.argmax, T.argmin, T.argsort, torch.argsort,
]
_METADATA = [
    T.dtype.__get__, T.shape.__get__, T.device.__get__, T.ndim.__get__, T.is_nested.__get__,
    T.requires_grad.__get__, T.is_cuda.__get__, T.layout.__get__, T.dim, T.size, T.numel, T.__len__,
    T.is_floating_point, T.is_complex, T.is_contiguous, T.stride, T.element_size, T.data_ptr, T.get_device,
]
_INPLACE = [T.add_, T.sub_, T.mul_, T.div_, T.__iadd__, T.__isub__, T.__imul__, T.__itruediv__,
            T.copy_, T.fill_, T.zero_, T.__setitem__, T.masked_fill_, T.clamp_]

RULES = {}
RULES.update({f: _linear_in_first for f in _FIRST_ARG_LINEAR})
RULES.update({f: _multilinear for f in _MULTILINEAR})
RULES.update({f: _sum for f in _SUMS})
RULES.update({f: _concat for f in _CONCATS})
RULES.update({f: _nondifferentiable for f in _NONDIFF})
RULES.update({f: _inplace for f in _INPLACE})
RULES.update({f: _metadata for f in _METADATA})
RULES.update({
    F.linear: rules.linear_rule, F.conv2d: rules.conv2d_rule, F.layer_norm: rules.layer_norm_rule,
    F.batch_norm: rules.batch_norm_rule, F.gelu: rules.gelu_rule,
    F.softmax: rules.softmax_rule, T.softmax: rules.softmax_rule, torch.softmax: rules.softmax_rule,
    F.scaled_dot_product_attention: attention.sdpa_rule, F.multi_head_attention_forward: attention.mha_rule,
    F.dropout: _dropout, F.pad: _pad,
    torch.where: _where, T.where: _where, T.masked_fill: _masked_fill, torch.masked_fill: _masked_fill,
    T.div: _div, torch.div: _div, T.__truediv__: _div, T.__rtruediv__: _div, torch.true_divide: _div,
    **{f: rules.pointwise_rule(lambda x, y: y * (1 - y)) for f in (torch.sigmoid, T.sigmoid)},
    **{f: rules.pointwise_rule(lambda x, y: 1 - y * y) for f in (torch.tanh, T.tanh)},
    **{f: rules.pointwise_rule(lambda x, y: (x > 0).to(y.dtype)) for f in (F.relu, torch.relu, T.relu)},
    **{f: rules.pointwise_rule(lambda x, y: y) for f in (torch.exp, T.exp)},
    F.silu: rules.pointwise_rule(lambda x, y: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x)))),
})


def _dispatch(func, args, kwargs):
    rule = RULES.get(func)
    if rule is not None:
        return rule(func, args, kwargs)
    return jvp_fallback(func, args, kwargs)


values.dispatch = _dispatch  # what every Dual's __torch_function__ calls


@contextlib.contextmanager
def fallback_log():
    """Collect the names of the ops that took the ``torch.func.jvp`` fallback inside the block."""
    before = set(FALLBACK_OPS)
    FALLBACK_OPS.clear()
    seen: set[str] = set()
    try:
        yield seen
    finally:
        seen |= FALLBACK_OPS
        FALLBACK_OPS.clear()
        FALLBACK_OPS.update(before | seen)


__all__ = ["Dual", "FALLBACK_OPS", "RULES", "fallback_log", "primal_of", "split", "tangent_of", "wrap"]
