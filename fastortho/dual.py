"""Dual tensors: a primal value and its tangent flowing through an unmodified module's forward.

:class:`Dual` is a ``torch.Tensor`` subclass (its data is the primal) whose
``__torch_function__`` computes, for every torch function the forward calls, the primal
output and its tangent:

- a per-op dual function of :mod:`fastortho.ops.dual` for the ops that matter (linear,
  conv2d, layer_norm, batch_norm, gelu, softmax, scaled-dot-product attention, the whole
  ``F.multi_head_attention_forward``), the seams for fused kernels;
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
import inspect

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from .ops import dual as ops

# Names of the ops that went through the torch.func.jvp fallback (for tests and diagnostics).
FALLBACK_OPS: set[str] = set()


class Dual(Tensor):
    """A primal tensor (the object's own data) carrying ``.tangent``.

    ``tangent`` may be a zero-argument function instead of a tensor: it is then called on
    every access, so a parameter's tangent ``th - th0`` exists only while an op uses it
    (instead of a second copy of every trained parameter living through the step)."""

    @staticmethod
    def __new__(cls, primal: Tensor, tangent):
        obj = Tensor._make_subclass(cls, primal)
        obj.primal = primal
        obj._tangent = tangent
        return obj

    @property
    def tangent(self) -> Tensor:
        t = self._tangent
        return t() if callable(t) else t

    def __repr__(self) -> str:
        with torch._C.DisableTorchFunctionSubclass():
            return f"Dual(primal={self.primal!r}, tangent={self.tangent!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        with torch._C.DisableTorchFunctionSubclass():
            return _dispatch(func, args, kwargs or {})


def primal_of(v):
    return v.primal if isinstance(v, Dual) else v


def tangent_of(v):
    return v.tangent if isinstance(v, Dual) else None


def split(v):
    """``(primal, tangent or None)`` of a value."""
    return (v.primal, v.tangent) if isinstance(v, Dual) else (v, None)


def wrap(out, tan):
    """Dual outputs from primal outputs and their tangents (None: no tangent)."""
    if isinstance(out, Tensor):
        if tan is None or not (out.is_floating_point() or out.is_complex()):
            return out
        if tan.shape != out.shape:  # the tangent of a broadcast operand
            tan = tan.broadcast_to(out.shape)
        if tan.dtype != out.dtype:
            tan = tan.to(out.dtype)
        return Dual(out, tan)
    if isinstance(out, (tuple, list)):
        tans = tan if isinstance(tan, (tuple, list)) else [None] * len(out)
        items = [wrap(o, t) for o, t in zip(out, tans)]
        if hasattr(out, "_fields"):  # a namedtuple
            return type(out)(*items)
        return type(out)(items)
    return out


# ----------------------------------------------------------------------------- op classes

def _flat(args, kwargs):
    flat, spec = tree_flatten((args, kwargs))
    return flat, spec, [i for i, v in enumerate(flat) if isinstance(v, Dual)]


def _call(func, flat, spec):
    a, k = tree_unflatten(flat, spec)
    return func(*a, **k)


def _primal_call(func, flat, spec):
    with torch.no_grad():
        return _call(func, [primal_of(v) for v in flat], spec)


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
    flat, spec, duals = _flat(args, kwargs)
    primals = [primal_of(v) for v in flat]
    out = _primal_call(func, flat, spec)
    terms = []
    for i in duals:
        leaves = list(primals)
        leaves[i] = flat[i].tangent
        terms.append(_call(func, leaves, spec))
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
        return _jvp_fallback(func, args, kwargs)
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


def _parameters(fn) -> tuple[tuple[str, ...], dict]:
    """Parameter names and defaults of ``fn``, read once at import: the rules bind arguments
    with plain dict operations, which torch.compile can trace (inspect.signature it cannot)."""
    params = inspect.signature(fn).parameters
    return tuple(params), {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def _bind(spec, args, kwargs) -> dict:
    names, defaults = spec
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


_PAD = _parameters(F.pad)
_DROPOUT = _parameters(F.dropout)
_LAYER_NORM = _parameters(F.layer_norm)
_BATCH_NORM = _parameters(F.batch_norm)


def _pad(func, args, kwargs):
    g = _bind(_PAD, args, kwargs)
    x, pad, mode, value = g["input"], g["pad"], g.get("mode", "constant"), g.get("value")
    with torch.no_grad():
        out = F.pad(primal_of(x), pad, mode, value)
    t = tangent_of(x)
    return wrap(out, F.pad(t, pad, mode, 0.0 if mode == "constant" else None) if t is not None else None)


def _dropout(func, args, kwargs):
    g = _bind(_DROPOUT, args, kwargs)
    x, p, training = g["input"], g["p"], g["training"]
    if not training or p == 0:
        return x
    px, tx = split(x)
    with torch.no_grad():
        keep = F.dropout(torch.ones_like(px), p, True)  # the mask, scaled by 1 / (1 - p)
    return wrap(px * keep, tx * keep if tx is not None else None)


# ----------------------------------------------------------------------------- per-op rules

def _linear(func, args, kwargs):
    a = dict(zip(("input", "weight", "bias"), args), **kwargs)
    return wrap(*ops.dual_linear(*split(a["input"]), *split(a["weight"]), *split(a.get("bias"))))


def _conv2d(func, args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    a = dict(zip(names, args), **kwargs)
    return wrap(*ops.dual_conv2d(*split(a["input"]), *split(a["weight"]), *split(a.get("bias")),
                                 a.get("stride", 1), a.get("padding", 0), a.get("dilation", 1), a.get("groups", 1)))


def _layer_norm(func, args, kwargs):
    g = _bind(_LAYER_NORM, args, kwargs)
    return wrap(*ops.dual_layer_norm(*split(g["input"]), g["normalized_shape"], *split(g["weight"]),
                                     *split(g["bias"]), g["eps"]))


def _batch_norm(func, args, kwargs):
    g = _bind(_BATCH_NORM, args, kwargs)
    if isinstance(g["running_mean"], Dual) or isinstance(g["running_var"], Dual):
        return _jvp_fallback(func, args, kwargs)
    return wrap(*ops.dual_batch_norm(*split(g["input"]), g["running_mean"], g["running_var"], *split(g["weight"]),
                                     *split(g["bias"]), g["training"], g["momentum"], g["eps"]))


def _gelu(func, args, kwargs):
    return wrap(*ops.dual_gelu(*split(args[0]), kwargs.get("approximate", args[1] if len(args) > 1 else "none")))


def _softmax(func, args, kwargs):
    x = args[0]
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    if dim is None:
        raise ValueError("softmax on a dual tensor needs an explicit dim")
    dtype = kwargs.get("dtype")
    if dtype is None and len(args) > (3 if func is F.softmax else 2):
        dtype = args[3 if func is F.softmax else 2]
    return wrap(*ops.dual_softmax(*split(x), dim, dtype))


def _pointwise(derivative):
    """Unary elementwise ops ``y = f(x)`` with ``f'`` from ``(x, y)``."""

    def rule(func, args, kwargs):
        x, tx = split(args[0])
        with torch.no_grad():
            y = func(x, *[primal_of(a) for a in args[1:]], **kwargs)
            d = derivative(x, y) if tx is not None else None
        return wrap(*ops.dual_pointwise(y, tx, d))
    return rule


def _sdpa(func, args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    a = dict(zip(names, args), **kwargs)
    if isinstance(a.get("attn_mask"), Dual):
        return _jvp_fallback(func, args, kwargs)
    return wrap(*ops.dual_sdpa(*split(a["query"]), *split(a["key"]), *split(a["value"]),
                               a.get("attn_mask"), a.get("dropout_p", 0.0), a.get("is_causal", False),
                               a.get("scale"), a.get("enable_gqa", False)))


_MHA = _parameters(F.multi_head_attention_forward)


def _mha(func, args, kwargs):
    g = _bind(_MHA, args, kwargs)
    training_dropout = g["training"] and g["dropout_p"] > 0
    if training_dropout:  # a JVP would draw its own dropout mask, not the primal's
        raise NotImplementedError("nn.MultiheadAttention(dropout > 0) in train mode in a linearized model: the "
                                  "tangent would need the primal's dropout mask; use eval mode for the attention "
                                  "(module.eval()) or dropout=0")
    unsupported = (g["bias_k"] is not None or g["bias_v"] is not None or g["add_zero_attn"] or training_dropout
                   or g["need_weights"] or g["static_k"] is not None or g["static_v"] is not None
                   or isinstance(g["attn_mask"], Dual) or isinstance(g["key_padding_mask"], Dual))
    if unsupported:
        # Correct for every configuration (need_weights, bias_k, dropout...), not memory-lean.
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel(SDPBackend.MATH):
            return _jvp_fallback(func, args, kwargs)
    separate = None
    if g["use_separate_proj_weight"]:
        separate = (split(g["q_proj_weight"]), split(g["k_proj_weight"]), split(g["v_proj_weight"]))
    query = split(g["query"])
    key = query if g["key"] is g["query"] else split(g["key"])  # self-attention stays recognizable
    value = key if g["value"] is g["key"] else split(g["value"])
    out, tan = ops.dual_multi_head_attention(
        query, key, value, g["num_heads"], split(g["in_proj_weight"]),
        split(g["in_proj_bias"]), split(g["out_proj_weight"]), split(g["out_proj_bias"]),
        attn_mask=g["attn_mask"], key_padding_mask=g["key_padding_mask"], separate_proj=separate,
        is_causal=g["is_causal"])
    return wrap(out, tan), None


def _nondifferentiable(func, args, kwargs):
    flat, spec, _ = _flat(args, kwargs)
    return _primal_call(func, flat, spec)


def _metadata(func, args, kwargs):
    """Queries of a tensor's metadata (dtype, shape, ...): the Dual's own data is the primal, so
    the query runs on the arguments as they are (torch functions are disabled here), with no
    tree flattening: models ask these hundreds of times per pass."""
    return func(*args, **kwargs)


def _jvp_fallback(func, args, kwargs):
    """``torch.func.jvp`` of this one op: correct for any op, at the cost of the primal twice."""
    flat, spec, duals = _flat(args, kwargs)
    out = _primal_call(func, flat, spec)
    outs, out_spec = tree_flatten(out)
    floating = [j for j, o in enumerate(outs) if isinstance(o, Tensor) and o.is_floating_point()]
    if not floating or not duals:
        return out
    FALLBACK_OPS.add(torch.overrides.resolve_name(func) or repr(func))
    primals = [primal_of(v) for v in flat]

    def f(*ps):  # the op's floating outputs only (jvp takes no None, e.g. MHA's absent weights)
        leaves = list(primals)
        for i, p in zip(duals, ps):
            leaves[i] = p
        results = tree_flatten(_call(func, leaves, spec))[0]
        return tuple(results[j] for j in floating)

    # jvp wants a tangent of each primal's dtype and shape
    tangents = tuple(flat[i].tangent.to(flat[i].primal.dtype).broadcast_to(flat[i].primal.shape) for i in duals)
    _, tans = torch.func.jvp(f, tuple(flat[i].primal for i in duals), tangents)
    by_position = dict(zip(floating, tans))
    return tree_unflatten([wrap(o, by_position.get(j)) for j, o in enumerate(outs)], out_spec)


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
    F.linear: _linear, F.conv2d: _conv2d, F.layer_norm: _layer_norm, F.batch_norm: _batch_norm, F.gelu: _gelu,
    F.softmax: _softmax, T.softmax: _softmax, torch.softmax: _softmax,
    F.scaled_dot_product_attention: _sdpa, F.multi_head_attention_forward: _mha,
    F.dropout: _dropout, F.pad: _pad,
    torch.where: _where, T.where: _where, T.masked_fill: _masked_fill, torch.masked_fill: _masked_fill,
    T.div: _div, torch.div: _div, T.__truediv__: _div, T.__rtruediv__: _div, torch.true_divide: _div,
    torch.sigmoid: _pointwise(lambda x, y: y * (1 - y)), T.sigmoid: _pointwise(lambda x, y: y * (1 - y)),
    torch.tanh: _pointwise(lambda x, y: 1 - y * y), T.tanh: _pointwise(lambda x, y: 1 - y * y),
    F.relu: _pointwise(lambda x, y: (x > 0).to(y.dtype)), torch.relu: _pointwise(lambda x, y: (x > 0).to(y.dtype)),
    T.relu: _pointwise(lambda x, y: (x > 0).to(y.dtype)),
    torch.exp: _pointwise(lambda x, y: y), T.exp: _pointwise(lambda x, y: y),
    F.silu: _pointwise(lambda x, y: torch.sigmoid(x) * (1 + x * (1 - torch.sigmoid(x)))),
})


def _dispatch(func, args, kwargs):
    rule = RULES.get(func)
    if rule is not None:
        return rule(func, args, kwargs)
    return _jvp_fallback(func, args, kwargs)


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
