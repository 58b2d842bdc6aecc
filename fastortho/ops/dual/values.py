"""The value a linearized forward carries, and what every dual rule needs to read and make
one: :class:`Dual` (a primal tensor with its tangent), ``split`` / ``wrap``, argument binding,
and the ``torch.func.jvp`` fallback that is correct for any op. The rules live in
``rules.py`` and ``attention.py`` (the ops with fused kernels) and ``fastortho/dual.py`` (the
generic op classes and the dispatch table, which it installs here as :data:`dispatch`)."""
from __future__ import annotations

import inspect

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

# Names of the ops that went through the torch.func.jvp fallback (for tests and diagnostics).
FALLBACK_OPS: set[str] = set()

# The dispatch of every torch function a Dual meets: fastortho.dual._dispatch, set when that
# module is imported (it imports this one; a module global read per call, not an import).
dispatch = None


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
            return dispatch(func, args, kwargs or {})


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


def flat_args(args, kwargs):
    flat, spec = tree_flatten((args, kwargs))
    return flat, spec, [i for i, v in enumerate(flat) if isinstance(v, Dual)]


def call(func, flat, spec):
    a, k = tree_unflatten(flat, spec)
    return func(*a, **k)


def primal_call(func, flat, spec):
    with torch.no_grad():
        return call(func, [primal_of(v) for v in flat], spec)


def parameters(fn) -> tuple[tuple[str, ...], dict]:
    """Parameter names and defaults of ``fn``, read once at import: the rules bind arguments
    with plain dict operations, which torch.compile can trace (inspect.signature it cannot)."""
    params = inspect.signature(fn).parameters
    return tuple(params), {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}


def bind(spec, args, kwargs) -> dict:
    names, defaults = spec
    bound = dict(defaults)
    bound.update(zip(names, args))
    bound.update(kwargs)
    return bound


def jvp_fallback(func, args, kwargs):
    """``torch.func.jvp`` of this one op: correct for any op, at the cost of the primal twice."""
    flat, spec, duals = flat_args(args, kwargs)
    out = primal_call(func, flat, spec)
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
        results = tree_flatten(call(func, leaves, spec))[0]
        return tuple(results[j] for j in floating)

    # jvp wants a tangent of each primal's dtype and shape
    tangents = tuple(flat[i].tangent.to(flat[i].primal.dtype).broadcast_to(flat[i].primal.shape) for i in duals)
    _, tans = torch.func.jvp(f, tuple(flat[i].primal for i in duals), tangents)
    by_position = dict(zip(floating, tans))
    return tree_unflatten([wrap(o, by_position.get(j)) for j, o in enumerate(outs)], out_spec)


__all__ = ["Dual", "FALLBACK_OPS", "bind", "call", "flat_args", "jvp_fallback", "parameters", "primal_call",
           "primal_of", "split", "tangent_of", "wrap"]
