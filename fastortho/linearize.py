"""Linearized ("tangent") models: ``f_lin(x; th) = f(x; th0) + J(x) (th - th0)`` (TTA,
Ortiz-Jimenez et al. 2023), computed in one dual (primal + tangent) pass through the
unmodified model (:mod:`fastortho.dual`).

- Works on current PyTorch attention: ``nn.MultiheadAttention`` and
  ``F.scaled_dot_product_attention`` get their own tangent (no MATH backend to force, no
  fast path to disable); any attention backend runs the primal.
- Memory: the primal runs without autograd and the tangent is linear in ``th - th0``, so the
  backward keeps only primal activations, as ordinary fine-tuning does.
- Gradients flow to the trained parameters ``th``; the input and ``th0`` are constants.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten, tree_map

from .dual import Dual, primal_of


def _tree_module(tensors: Mapping[str, Tensor]) -> nn.Module:
    """Buffers at the dotted paths of ``tensors`` (so state_dict keys read like the model's)."""
    root = nn.Module()
    for name, t in tensors.items():
        *path, leaf = name.split(".")
        mod = root
        for part in path:
            child = mod._modules.get(part)
            if child is None:
                child = nn.Module()
                mod.add_module(part, child)
            mod = child
        mod.register_buffer(leaf, t)
    return root


def _check_inputs(args, kwargs) -> None:
    for leaf in tree_flatten((args, kwargs))[0]:
        if isinstance(leaf, Tensor) and leaf.requires_grad:
            raise ValueError("inputs: a linearized model's gradients flow to its parameters only; pass inputs "
                             "that do not require grad (e.g. x.detach())")


class LinearizedModel(nn.Module):
    """``f(x; th0) + J(x) (th - th0)``, trained through ``th``.

    The trainable parameters are the wrapped model's own, under the prefix ``model.``
    (``named_parameters()`` yields ``model.<original name>``); the pretrained values
    ``th0`` are buffers under ``th0.<original name>``. Parameters that are frozen when the
    model is linearized stay constants (no tangent).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        if not trainable:
            raise ValueError("model: has no trainable parameter to linearize (all have requires_grad=False)")
        self.model = model
        self._names = tuple(trainable)
        self.th0 = _tree_module({n: p.detach().clone() for n, p in trainable.items()})
        self._slots_cache: list | None = None
        self._edges: list = []

    def _slots(self) -> list[tuple[str, nn.Module, str, nn.Module, str]]:
        """Per trained parameter ``(name, owner, attribute, th0 owner, th0 attribute)``: the
        tensors are read from their owners' dicts on every pass (so an assignment or ``.to()``
        is always seen); only the walk of the module tree, milliseconds per pass for a ViT,
        is done once. The tree's edges are checked on every pass (dictionary lookups, some
        microseconds): a submodule replaced after the first pass raises instead of being run
        with the old module's parameters."""
        if self._slots_cache is not None:
            for parent, name, child, path in self._edges:
                if parent._modules.get(name) is not child:
                    raise RuntimeError(f"linearize: the submodule {path!r} was replaced after the linearized model "
                                       f"first ran; its trained parameters and th0 belong to the old module. "
                                       f"Linearize the changed model again")
            return self._slots_cache
        slots, edges = [], {}
        for n in self._names:
            owner_path, _, attr = n.rpartition(".")
            owner = self.model.get_submodule(owner_path)
            base = self.th0.get_submodule(owner_path)
            if attr not in owner._parameters or attr not in base._buffers:
                raise RuntimeError(f"linearize: the trained parameter {n!r} is no longer where it was "
                                   f"(was the model's structure changed after linearize?)")
            slots.append((n, owner, attr, base, attr))
            parent, path = self.model, []
            for part in owner_path.split(".") if owner_path else []:
                child, path = parent._modules[part], path + [part]
                edges[(id(parent), part)] = (parent, part, child, ".".join(path))
                parent = child
        self._slots_cache, self._edges = slots, list(edges.values())
        return self._slots_cache

    @property
    def names(self) -> tuple[str, ...]:
        """The trained parameters, by their names in the wrapped model."""
        return self._names

    def base_values(self) -> dict[str, Tensor]:
        """``th0``: the pretrained values of the trained parameters."""
        return {n: self.th0.get_buffer(n) for n in self._names}

    def task_vector(self) -> dict[str, Tensor]:
        """``th - th0`` per trained parameter (detached), keyed by the model's names."""
        return {n: (owner._parameters[attr] - base._buffers[base_attr]).detach()
                for n, owner, attr, base, base_attr in self._slots()}

    def _dual_params(self, taus: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        if taus is None and not torch.compiler.is_compiling():
            return self._parameter_duals()
        out = {}
        for n, owner, attr, base, base_attr in self._slots():
            th0 = base._buffers[base_attr]
            # th - th0 formed where an op uses it (see Dual), not held through the pass
            out[n] = Dual(th0, (lambda p=owner._parameters[attr], p0=th0: p - p0) if taus is None else taus[n])
        return out

    def __getstate__(self):
        # the cached parameter Duals hold lambdas (not picklable) tied to this object's tensors
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_duals_cache"}

    def _parameter_duals(self) -> dict[str, Tensor]:
        """The trained parameters as Duals ``(th0, th - th0)``, made once and reused while every
        parameter and base buffer is the same object (a Dual made per parameter per step is a
        subclass construction the host pays every step); rebuilt when one was replaced
        (``load_state_dict(assign=True)``, ``.to()``, FSDP2's swaps)."""
        held = getattr(self, "_duals_cache", None)
        slots = self._slots()
        if held is not None and held[0] is slots:
            idents = held[1]
            for (_, owner, attr, base, base_attr), (p, p0) in zip(slots, idents):
                if owner._parameters[attr] is not p or base._buffers[base_attr] is not p0:
                    break
            else:
                return held[2]
        out, idents = {}, []
        for n, owner, attr, base, base_attr in slots:
            p, th0 = owner._parameters[attr], base._buffers[base_attr]
            out[n] = Dual(th0, lambda p=p, p0=th0: p - p0)
            idents.append((p, th0))
        self._duals_cache = (slots, idents, out)
        return out

    def dual(self, *args, taus: Mapping[str, Tensor] | None = None, **kwargs) -> tuple[Any, Any]:
        """One dual pass: ``(f(x; th0), J(x) tau)`` with ``tau = th - th0`` (or ``taus``:
        tangent directions keyed by parameter name). Outputs keep the model's structure;
        an output that does not depend on ``th`` gets a zero tangent."""
        _check_inputs(args, kwargs)
        out = torch.func.functional_call(self.model, self._dual_params(taus), args, kwargs)
        primal = tree_map(primal_of, out)

        def tangent(v):
            if isinstance(v, Dual):
                return v.tangent
            return torch.zeros_like(v) if isinstance(v, Tensor) and v.is_floating_point() else v
        return primal, tree_map(tangent, out)

    def forward(self, *args, return_tangent: bool = False, **kwargs):
        """``f(x; th0) + J(x) tau``; with ``return_tangent=True`` the pair
        ``(f(x; th0), J(x) tau)`` instead (one pass; the way to get both through a
        DistributedDataParallel wrapper, whose forward is this method)."""
        primal, tangent = self.dual(*args, **kwargs)
        if return_tangent:
            return primal, tangent
        return tree_map(lambda p, t: p + t if isinstance(p, Tensor) and p.is_floating_point() else p,
                        primal, tangent)

    def tangent(self, *args, **kwargs):
        """``J(x) (th - th0)`` alone."""
        return self.dual(*args, **kwargs)[1]

    @torch.no_grad()
    def primal(self, *args, **kwargs):
        """``f(x; th0)``: the pretrained model's output."""
        return torch.func.functional_call(self.model, self.base_values(), args, kwargs)

    # ------------------------------------------------------------------------- files

    def save(self, path, metadata: Mapping[str, str] | None = None) -> None:
        """Write the state_dict (``model.*`` = th and the model's buffers, ``th0.*``) as
        safetensors, atomically; ``metadata`` (str -> str) is stored beside it."""
        from ._files import save_safetensors
        from ._version import __version__

        seen: set[tuple[int, int]] = set()
        state = {}
        for k, v in self.state_dict().items():
            key = (v.untyped_storage().data_ptr(), v.storage_offset())
            v = v.detach()
            if key in seen or not v.is_contiguous():  # safetensors refuses shared or strided tensors
                v = v.clone().contiguous()
            seen.add(key)
            state[k] = v
        meta = {"format": "fastortho.LinearizedModel", "fastortho": __version__}
        meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
        save_safetensors(state, path, meta)

    def load(self, path, strict: bool = True) -> LinearizedModel:
        """Load a file written by :meth:`save` into this model (same architecture), in place.
        Everything is checked before anything is copied: a file of another model raises and
        leaves this one as it was."""
        from ._files import read_safetensors

        device = next(iter(self.th0.buffers())).device
        state, meta = read_safetensors(path, "path", str(device))
        kind = meta.get("format")
        if kind != "fastortho.LinearizedModel":
            raise ValueError(f"path: {path} is not a fastortho linearized-model file (format={kind!r})")
        own = self.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        shapes = [(k, tuple(state[k].shape), tuple(own[k].shape)) for k in set(own) & set(state)
                  if tuple(state[k].shape) != tuple(own[k].shape)]
        if shapes or (strict and (missing or unexpected)):
            raise ValueError(f"path: {path} is the linearized model of another architecture: missing "
                             f"{missing[:3]}, unexpected {unexpected[:3]}, shapes (file, model) {sorted(shapes)[:3]}; "
                             f"nothing was loaded")
        self.load_state_dict(state, strict=strict)
        return self


def unwrap(lin) -> tuple[LinearizedModel, object]:
    """``(the LinearizedModel, the callable to run its forward through)``: a LinearizedModel
    itself, or one wrapped by DistributedDataParallel (whose forward must be the one called,
    so that its gradient synchronization sees the pass)."""
    inner = getattr(lin, "module", None)
    if isinstance(lin, LinearizedModel):
        return lin, lin
    if isinstance(inner, LinearizedModel):
        return inner, lin
    raise TypeError(f"lin: expected a fastortho LinearizedModel (fastortho.linearize(model)), possibly "
                    f"wrapped by DistributedDataParallel, got {type(lin).__name__}")


def linearize(model: nn.Module) -> LinearizedModel:
    """``model`` linearized around its current trainable parameters (``th0``): a
    :class:`LinearizedModel` that trains ``model``'s own parameters (shared, not copied)."""
    return LinearizedModel(model)

