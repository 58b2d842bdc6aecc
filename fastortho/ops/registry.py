"""One backend registry per op (docs/design.md section 3, "Dispatch").

Every op with more than one implementation (the dense OrthoReg penalty, the LoRA penalty, the
dual linear, the attention tangent) owns one :class:`Registry`. A backend registers once, with
its name, what it supports and where its implementation lives; ``backend=``,
``fastortho.set_kernels`` and the measured choice all resolve through that registry, so there is
one list of what exists and one place that says why something cannot run.

A backend's implementation is one autograd definition that serves eager and compiled calls
(``ListOp`` or an ``autograd.Function`` over registered ops). Its variants (the CUDA extension's
Gram forms) are not separate backends: a :class:`Choice` is a backend plus one of its variants,
and its ``tag`` (``"cuda:gemm"``) only labels a measured choice in the on-disk cache.
"""
from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .._config import PRECISIONS, interpreting


@dataclass(eq=False)
class Backend:
    """One implementation of an op.

    ``load()`` returns the callable (imported on first use: importing fastortho never imports
    triton or builds the CUDA extension). ``unavailable(device)`` says why it cannot run on
    ``device`` (None: it can); the generic rules of ``devices`` are checked before it.
    """
    name: str
    load: Callable[[], Callable]
    devices: tuple[str, ...] | None = None  # device types (None: any); "interpreter": any under TRITON_INTERPRET=1
    dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
    precisions: tuple[str, ...] = PRECISIONS
    variants: tuple[str, ...] = ("",)
    compiles: bool = True  # its registered ops trace under torch.compile (fakes registered)
    graph_capture: bool = True  # no host synchronization: may be captured in a CUDA graph
    grad_into: bool = False  # may write its per-group gradients straight into .grad
    unavailable: Callable[[torch.device], str | None] = field(default=lambda device: None)
    _run: Callable | None = field(default=None, repr=False)  # load()'s result, once loaded

    def why_not(self, device: torch.device) -> str | None:
        """Why this backend cannot run on ``device``, or None."""
        if self.devices is not None and device.type not in self.devices and not (
                "interpreter" in self.devices and interpreting()):
            where = " or ".join(d.upper() for d in self.devices if d != "interpreter")
            extra = (" (on CPU only under the Triton interpreter: set TRITON_INTERPRET=1 before triton is "
                     "imported)") if "interpreter" in self.devices else ""
            return f"needs {where} tensors{extra}; the tensors are on {device}"
        return self.unavailable(device)

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in self.dtypes

    @property
    def run(self) -> Callable:
        """The implementation (loaded on first use; a plain attribute afterwards, which
        torch.compile traces through)."""
        if self._run is None:
            self._run = self.load()
        return self._run


class Choice:
    """A backend with one of its variants: what a plan runs for a group of layers. ``run`` is
    the backend's callable with the variant bound (``functools.partial``: no Python frame)."""

    def __init__(self, backend: Backend, variant: str = ""):
        self.backend, self.variant = backend, variant
        self.run = functools.partial(backend.run, variant=variant) if variant else backend.run

    @property
    def tag(self) -> str:
        """The label of this choice in the measured-choice cache ("triton", "cuda:gemm")."""
        return f"{self.backend.name}:{self.variant}" if self.variant else self.backend.name

    def __repr__(self) -> str:
        return f"Choice({self.tag!r})"


class Registry:
    """The backends of one op, in registration order; ``auto(device)`` names the default."""

    def __init__(self, op: str, auto: Callable[[torch.device], str]):
        self.op = op
        self._auto = auto
        self._backends: dict[str, Backend] = {}

    def register(self, backend: Backend) -> Backend:
        if backend.name in self._backends or backend.name == "auto":
            raise ValueError(f"{self.op}: backend {backend.name!r} is registered already")
        self._backends[backend.name] = backend
        return backend

    def names(self) -> tuple[str, ...]:
        """What ``backend=`` accepts: "auto" and every registered backend."""
        return ("auto", *self._backends)

    def __getitem__(self, name: str) -> Backend:
        try:
            return self._backends[name]
        except KeyError:
            raise ValueError(f"backend: expected one of {self.names()}, got {name!r}") from None

    def resolve(self, name: str, device: torch.device, param: str = "backend") -> Backend:
        """The backend that runs for ``name`` on ``device``: "auto" is the op's default there;
        an explicit backend that cannot run raises a ValueError saying why and what to use."""
        if name == "auto":
            return self._backends[self._auto(device)]
        if name not in self._backends:
            raise ValueError(f"{param}: expected one of {self.names()}, got {name!r}")
        backend = self._backends[name]
        why = backend.why_not(device)
        if why is not None:
            usable = [n for n, b in self._backends.items() if n != name and b.why_not(device) is None]
            raise ValueError(f"{param}={name!r} {why} ({self.op}); use {param}='auto'"
                             + "".join(f" or {u!r}" for u in usable))
        return backend

    def choices(self, device: torch.device, variants: Callable[[Backend], tuple[str, ...]] | None = None
                ) -> tuple[Choice, ...]:
        """Every (backend, variant) that can run on ``device``, in registration order: the
        candidates of a measured choice (the first is the reference and the fallback).
        ``variants(backend)`` may narrow a backend's variants."""
        out = []
        for backend in self._backends.values():
            if backend.why_not(device) is None:
                out += [Choice(backend, v) for v in (variants(backend) if variants else backend.variants)]
        return tuple(out)

    def choice(self, tag: str) -> Choice:
        """The choice a cache ``tag`` labels."""
        name, _, variant = tag.partition(":")
        return Choice(self[name], variant)
