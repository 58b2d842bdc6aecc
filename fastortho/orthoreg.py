"""OrthoReg: ``sum_l ||G_l - I||_F^2`` over the tuned layers, ``G`` the Gram of the smaller side
of ``D = W - W0`` (docs/design.md section 1), with its analytic gradient.

``ortho_loss`` is the functional form (selects and validates the layers every call, and keeps
its op plans per model); ``OrthoReg`` selects and plans once, so a warm call issues its launches
with no Python call per layer (docs/design.md section 3, "Dispatch").
"""
from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from ._checks import check_bool, check_materialized, check_real
from .layers import LayerSpec, base_tensors, paired_bases, select_parameters
from .lora import LoRAAdapter, lora_adapters
from .ops._common import resolve_precision
from .ops.lora import LORA, lora_plan_for
from .ops.orthoreg import ORTHOREG, plan_for


def _lora_plan(model: nn.Module, base, layers) -> list[LoRAAdapter] | None:
    """The adapters to regularize when ``model`` is a LoRA model (then ``base`` must be None),
    or None for the dense penalty against ``base``."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    adapters = lora_adapters(model)
    if base is None:
        if not adapters:
            raise ValueError("base: required (the pretrained weights, e.g. fastortho.snapshot(model) taken "
                             "before fine-tuning), unless model has LoRA adapters, whose update s B A "
                             "needs no base")
        if layers != "trainable-2d":
            raise ValueError(f"layers={layers!r}: a LoRA model's penalty covers all of its adapters; "
                             f"choose the adapted projections with add_lora(targets=...) instead")
        return adapters
    if adapters:
        raise ValueError(f"base: model has {len(adapters)} LoRA adapters, whose update D = s B A is "
                         f"regularized exactly without a base; call ortho_loss(model) (base=None), or "
                         f"merge the adapters (fastortho.merge_lora) to regularize dense updates")
    return None


def _describe_non_finite(bad: list[int], names: list[str], weights: list[Tensor], bases: list[Tensor],
                         lora: bool) -> str:
    """Which tensor of each bad layer is to blame (reads the tensors: only on the error path).
    For LoRA models ``weights`` / ``bases`` are the adapters' A / B."""
    problems = []
    for i in bad[:5]:
        if not bool(torch.isfinite(weights[i]).all()):
            what = "lora_A of adapter" if lora else "model parameter"
            problems.append(f"{what} {names[i]!r} has non-finite values")
        elif not bool(torch.isfinite(bases[i]).all()):
            problems.append(f"lora_B of adapter {names[i]!r} has non-finite values" if lora
                            else f"base[{names[i]!r}] has non-finite values")
        else:
            problems.append(f"the penalty of {names[i]!r} overflows float32 (|W - W0| is too large)")
    more = f" (and {len(bad) - 5} more layers)" if len(bad) > 5 else ""
    return "; ".join(problems) + more


class FiniteMonitor:
    """The non-finite check of the per-layer penalties without a host synchronization
    (docs/design.md section 6).

    On a GPU each call's flags are copied asynchronously into pinned host memory behind an
    event; they are read at a later call, once the event has completed, so the error names the
    layer and the call it came from at most a step late (:meth:`check` waits for the last
    one). On a CPU the flags are read at once (there is no device to stall), unless ``defer``.
    """

    def __init__(self, defer: bool = False):
        self.defer = defer
        self.calls = 0
        self._pending: list[tuple] = []  # (host flags, event or None, call number, context)
        self._spare: list[Tensor] = []  # pinned buffers to reuse

    def submit(self, values: Tensor, names, weights, bases, lora: bool = False) -> None:
        self.calls += 1
        if torch.compiler.is_compiling() or (values.is_cuda and torch.cuda.is_current_stream_capturing()):
            return  # traced or captured into a CUDA graph: no host-side state can follow replays
        self._consume(wait=len(self._pending) >= 2)  # at most two calls in flight
        bad = ~torch.isfinite(values.detach())
        context = (names, weights, bases, lora)
        if bad.device.type != "cuda":
            if not self.defer:
                self._report(bad.numpy(), self.calls, context)
                return
            self._pending.append((bad.clone(), None, self.calls, context))
            return
        host = next((t for t in self._spare if t.shape == bad.shape), None)
        if host is None:
            host = torch.empty(bad.shape, dtype=torch.bool, pin_memory=True)
        else:
            self._spare.remove(host)
        host.copy_(bad, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self._pending.append((host, event, self.calls, context))

    def check(self) -> None:
        """Wait for every pending check and raise for the first non-finite one."""
        self._consume(wait=True, everything=True)

    def _consume(self, wait: bool, everything: bool = False) -> None:
        while self._pending:
            host, event, call, context = self._pending[0]
            if event is not None and not event.query():
                if not wait:
                    return
                event.synchronize()
            self._pending.pop(0)
            flags = host.numpy().copy()
            if event is not None:
                self._spare.append(host)
            self._report(flags, call, context)
            if not everything:
                wait = False

    def _report(self, flags, call: int, context) -> None:
        if not flags.any():
            return
        self._pending.clear()
        names, weights, bases, lora = context
        bad = [int(i) for i in flags.nonzero()[0]]
        when = "" if call == self.calls else f" (in call {call}, {self.calls - call} call(s) ago)"
        raise ValueError(f"ortho_loss{when}: " + _describe_non_finite(bad, names, weights, bases, lora))


# The monitors of the functional ortho_loss, one per model (a call per step is the use).
_MONITORS: weakref.WeakKeyDictionary[nn.Module, FiniteMonitor] = weakref.WeakKeyDictionary()


# The op plans of the functional ortho_loss, one dict per model (see ops.orthoreg.plan_for).
_PLANS: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _plans(model: nn.Module) -> dict:
    plans = _PLANS.get(model)
    if plans is None:
        plans = _PLANS[model] = {}
    return plans


def _monitor(model: nn.Module) -> FiniteMonitor:
    monitor = _MONITORS.get(model)
    if monitor is None:
        monitor = _MONITORS[model] = FiniteMonitor()
    return monitor


def _slot(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    prefix, _, attr = name.rpartition(".")
    return (model.get_submodule(prefix) if prefix else model), attr


class OrthoReg(nn.Module):
    """``lam * OrthoReg penalty`` of ``model`` against ``base``, with the plan built once
    (``base=None`` on a LoRA model: the exact low-rank penalty of its adapters).

    The selected parameters and their base tensors are resolved and validated at
    construction; each call only launches the penalty. Build it after moving the model to
    its device. Options are those of :func:`ortho_loss`.
    """

    def __init__(self, model: nn.Module, base=None, lam: float = 1.0, *, squared: bool = True,
                 layers: LayerSpec = "trainable-2d", precision: str | None = None,
                 backend: str = "auto", check_finite: bool = True):
        super().__init__()
        lam, squared = check_real("lam", lam, minimum=0), check_bool("squared", squared)
        self._adapters = _lora_plan(model, base, layers)
        if self._adapters is not None:
            # Plain lists: the model's parameters must not be registered a second time here.
            self._names = [a.name for a in self._adapters]
            self._weights = [a.A for a in self._adapters]
            self._bases = [a.B for a in self._adapters]
            self._scales = [float(a.scale) for a in self._adapters]  # read once, as the adapters are
        else:
            selected = select_parameters(model, layers)
            self._names = [n for n, _ in selected]
            self._weights = [p for _, p in selected]
            self._bases = paired_bases(selected, base_tensors(base, model))
        # Where each regularized parameter lives (owner module, attribute): a model whose
        # Parameter objects are replaced (load_state_dict(assign=True), a module swapped) would
        # otherwise be regularized at its old tensors, silently. Plain tuples: not registered.
        # FSDP2 swaps its sharded (DTensor) parameters in and out of the modules by design: not checked.
        self._slots = [] if self._adapters is not None else [
            (n, *_slot(model, n), w) for n, w in zip(self._names, self._weights) if type(w).__name__ != "DTensor"]
        check_materialized("model", zip(self._names, self._weights))
        self._device = self._weights[0].device
        self.lam = float(lam)
        self.squared = bool(squared)
        self.precision = None if precision is None else resolve_precision(precision)
        (ORTHOREG if self._adapters is None else LORA).resolve(backend, self._device)
        self.backend = backend
        self._plans: dict = {}  # the op's plans, per (backend, precision, squared): ops/orthoreg
        self.check_finite = bool(check_finite)
        self.monitor = FiniteMonitor()

    @property
    def names(self) -> list[str]:
        return list(self._names)

    def layer_values(self) -> Tensor:
        """Per-layer penalties (fp32 ``[L]``, in the order of :attr:`names`), differentiable."""
        if self._weights[0].device != self._device:
            raise ValueError(f"model: its parameters moved to {self._weights[0].device} after "
                             f"OrthoReg was built on {self._device}; build a new OrthoReg")
        if not torch.compiler.is_compiling():
            for name, owner, attr, w in self._slots:
                if owner._parameters.get(attr) is not w:
                    raise ValueError(f"model: parameter {name!r} was replaced after OrthoReg was built (e.g. by "
                                     f"load_state_dict(assign=True)); the penalty would be of the old tensor. "
                                     f"Build a new OrthoReg after replacing parameters")
        precision = resolve_precision(self.precision, self._device.type)
        if self._adapters is not None:
            plan = lora_plan_for(self._weights, self._bases, self.backend, self._plans)
            values = plan(self._weights, self._bases, self._scales, self.squared, precision)
        else:
            plan = plan_for(self._weights, self._bases, self.backend, precision, self.squared, self._plans)
            values = plan(self._weights, self._bases, self.squared, precision)
        if self.check_finite:
            self.monitor.submit(values, self._names, self._weights, self._bases, lora=self._adapters is not None)
        return values

    def forward(self) -> Tensor:
        return self.layer_values().sum() * self.lam

    def extra_repr(self) -> str:
        return (f"layers={len(self._names)}, lam={self.lam}, squared={self.squared}, "
                f"precision={self.precision}, backend={self.backend!r}")


def ortho_loss(model: nn.Module, base=None, *, squared: bool = True, layers: LayerSpec = "trainable-2d",
               precision: str | None = None, backend: str = "auto", check_finite: bool = True) -> Tensor:
    """The OrthoReg penalty of ``model``'s tuned layers against ``base``, a 0-dim fp32 tensor.

    Args:
        model: the model being fine-tuned.
        base: the pretrained weights: :func:`fastortho.snapshot`, a state_dict, or a module.
            Its tensors may be in another floating dtype than the model's. None for a LoRA
            model (:func:`fastortho.add_lora` or Hugging Face PEFT): each adapter's
            ``D = s B A`` is regularized exactly from ``r x r`` products, ``D`` never formed.
        squared: True is the paper's ``||G - I||_F^2``; False the released code's ``||G - I||_F``.
        layers: "trainable-2d" (default, released-code rule), "linear", "attention", or a
            predicate ``(name, param) -> bool``.
        precision: None follows an enabled ``torch.autocast`` (bf16 -> "bf16", fp16 -> "tf32"),
            else ``torch.get_float32_matmul_precision()`` ("highest" -> "ieee", "high" -> "tf32",
            "medium" -> "bf16"); or one of "ieee", "tf32", "bf16", which always wins.
            Accumulation is fp32 in every mode, and no backend's products are recast by autocast.
        backend: "auto", "torch" (any device), "triton", "cuda".
        check_finite: raise a ValueError naming the layer when the penalty is not finite (NaN
            or inf weights). No host synchronization: on a GPU the check is read at a later
            call, so it reports at most a step late (naming the call); skipped under torch.compile.

    Backward writes the analytic gradient ``4 D (G - I)`` (or ``4 (G - I) D`` for wide layers;
    divided by ``2 ||G - I||`` when not squared) into the parameters' ``.grad``.
    """
    check_bool("squared", squared)
    adapters = _lora_plan(model, base, layers)
    if adapters is not None:
        check_materialized("model", [(a.name, a.A) for a in adapters])
        As, Bs = [a.A for a in adapters], [a.B for a in adapters]
        plan = lora_plan_for(As, Bs, backend, _plans(model))
        scales = [float(a.scale) for a in adapters]
        values = plan(As, Bs, scales, squared, resolve_precision(precision, As[0].device.type))
        if check_finite:
            _monitor(model).submit(values, [a.name for a in adapters], As, Bs, lora=True)
        return values.sum()
    selected = select_parameters(model, layers)
    check_materialized("model", selected)
    bases = paired_bases(selected, base_tensors(base, model))
    weights = [p for _, p in selected]
    precision = resolve_precision(precision, weights[0].device.type)
    values = plan_for(weights, bases, backend, precision, squared, _plans(model))(weights, bases, squared, precision)
    if check_finite:
        _monitor(model).submit(values, [n for n, _ in selected], weights, bases)
    return values.sum()
