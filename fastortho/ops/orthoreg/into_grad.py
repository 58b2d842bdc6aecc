"""The penalty's gradient written straight into the weights' ``.grad`` where autograd allows
(docs/design.md section 6).

Handing a gradient to autograd costs one gradient-sized pass more than writing it where it
ends up whenever ``.grad`` already holds something: the engine first adds the penalty's
gradient to the task's (12 B per fp32 element), then AccumulateGrad adds that sum to
``.grad`` (12 B more). Written straight into ``.grad`` the penalty's product accumulates in
place (8 B instead of the 4 B of a fresh write) and only AccumulateGrad's add remains, which
saves 8 B per element under gradient accumulation or ``zero_grad(set_to_none=False)``. With
``.grad`` None (``zero_grad()``'s default) both ways cost the same; writing into ``.grad`` then
installs views of the product's buffer, so that the next micro-step finds them and accumulates.

A backward may write ``.grad`` itself, and then returns no gradient for that weight, only when
the result is the same as autograd's:

- eager mode (not torch.compile), and not ``create_graph`` (grad mode is off in backward);
- the weight is a plain fp32 leaf tensor whose AccumulateGrad this backward will run
  (``loss.backward()``, or ``backward(inputs=...)`` naming it; never ``torch.autograd.grad``),
  with no tensor hooks (a pre-hook must see the whole gradient) and no post-accumulate hooks;
- every ``.grad`` of the buffer's layers is None, or every one is exactly the view of one
  buffer at the layer's place in it (what an earlier install left);
- ``FASTORTHO_GRAD_INTO_WEIGHTS`` is not ``0``.

Anything else (a ``.grad`` that DDP made a bucket view, some None and some not, bf16
weights, a tensor subclass) takes the ordinary path: the gradient goes to autograd.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..._config import grad_into_weights_enabled

# What the buffer's layers hold: hand the gradient to autograd, write a fresh buffer and
# install views of it, or accumulate into the buffer the current .grads are views of.
AUTOGRAD, FRESH = "autograd", "fresh"


def engine_inputs(ctx, n: int) -> list[tuple[Tensor | None, bool, bool]] | None:
    """Every private autograd read this module relies on, in one place: for each of the first
    ``n`` inputs of the running backward, ``(leaf, runs, hooked)``: the leaf tensor whose
    AccumulateGrad node feeds that input (None for a non-leaf or no gradient), whether this
    backward runs that node (``torch._C._will_engine_execute_node``; ``torch.autograd.grad``
    runs none, and there the engine refuses the question for leaf nodes), and whether the leaf
    carries tensor or post-accumulate hooks. None when this PyTorch does not answer these
    questions as expected (then every gradient goes through autograd; :func:`probe`)."""
    try:
        out = []
        for node, _ in ctx.next_functions[:n]:
            if node is None or type(node).__name__ != "AccumulateGrad":
                out.append((None, False, False))
                continue
            try:
                runs = bool(torch._C._will_engine_execute_node(node))
            except RuntimeError:  # torch.autograd.grad: leaf nodes are never run
                runs = False
            w = node.variable
            hooked = bool(w._backward_hooks) or bool(getattr(w, "_post_accumulate_grad_hooks", None))
            out.append((w, runs, hooked))
        return out
    except (AttributeError, TypeError):
        return None


class _Probe(torch.autograd.Function):
    """``a * b`` whose backward records what :func:`engine_inputs` reads (for :func:`probe`)."""

    @staticmethod
    def forward(ctx, a, b, seen: list):
        ctx.seen = seen
        return a * b

    @staticmethod
    def backward(ctx, g):
        ctx.seen.append(engine_inputs(ctx, 2))
        return g, g, None


def run_probe() -> bool:
    """Whether :func:`engine_inputs` answers as this module expects, on a two-leaf graph:
    under ``backward()`` it names both leaves and says they run; under ``backward(inputs=[a])``
    that only ``a`` runs; under ``torch.autograd.grad`` that none runs; a tensor hook is seen."""
    seen: list = []
    try:
        with torch.enable_grad():
            a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
            _Probe.apply(a, b, seen).sum().backward()
            _Probe.apply(a, b, seen).sum().backward(inputs=[a])
            torch.autograd.grad(_Probe.apply(a, b, seen).sum(), [a, b])
            b.register_hook(lambda grad: grad)
            _Probe.apply(a, b, seen).sum().backward()
        full, only_a, by_grad, hooked = seen
        return bool(full is not None and full[0][0] is a and full[1][0] is b and full[0][1] and full[1][1]
                    and not full[0][2] and not full[1][2]
                    and only_a is not None and only_a[0][1] and not only_a[1][1]
                    and by_grad is not None and not by_grad[0][1] and not by_grad[1][1]
                    and hooked is not None and hooked[1][2] and not hooked[0][2])
    except Exception:  # noqa: BLE001 - any failure means: do not rely on these calls
        return False


_probe_result: list[bool] = []


def probe() -> bool:
    """:func:`run_probe`, once per process. If PyTorch changed what these calls answer, direct
    writes are turned off (one warning) and every gradient goes through autograd."""
    if not _probe_result:
        ok = run_probe()
        if not ok:
            import warnings

            warnings.warn("this PyTorch's autograd internals do not behave as fastortho expects; the OrthoReg "
                          "gradient goes through autograd (one gradient-sized pass more under accumulation)",
                          RuntimeWarning, stacklevel=2)
        _probe_result.append(ok)
    return _probe_result[0]


_PLAIN = (nn.Parameter, Tensor)


def _leaf(inputs, position: int) -> Tensor | None:
    """The plain fp32 leaf weight behind the backward's input ``position`` whose AccumulateGrad
    this backward runs and which no hook watches, else None."""
    w, runs, hooked = inputs[position]
    if w is None or not runs or hooked:
        return None
    if type(w) not in _PLAIN or w.dtype != torch.float32:
        return None
    return w


def allowed(ctx, n: int) -> bool:
    """Whether this backward may write ``.grad`` at all (checked once per backward): eager,
    no ``create_graph``, the switch on, autograd's internals as expected (:func:`probe`), and
    no weight among the first ``n`` inputs twice (a shared weight gets the sum of its terms,
    which autograd forms). Keeps what it read for :func:`plan`."""
    if not (getattr(ctx, "eager", False) and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and grad_into_weights_enabled() and probe()):
        return False
    inputs = engine_inputs(ctx, n)
    if inputs is None:
        return False
    seen = set()
    for w, _, _ in inputs:
        if w is not None:
            if id(w) in seen:
                return False
            seen.add(id(w))
    ctx.engine_inputs = inputs
    return True


def plan(ctx, layers, offsets, numel: int) -> tuple[str | Tensor, list[Tensor]]:
    """How the layers ``layers`` (the backward's input positions of their weights), whose
    gradients fill one fp32 buffer of ``numel`` elements at element ``offsets``, get them
    (after :func:`allowed` said yes):
    ``(AUTOGRAD, [])``, ``(FRESH, weights)`` or ``(buffer, weights)`` (accumulate into
    ``buffer``, whose views the weights' ``.grad`` are)."""
    weights = []
    inputs = ctx.engine_inputs
    for i in layers:  # _leaf inlined: this loop runs per layer on every backward
        w, runs, hooked = inputs[i]
        if w is None or not runs or hooked or type(w) not in _PLAIN or w.dtype != torch.float32:
            return AUTOGRAD, []
        weights.append(w)
    grads = [w.grad for w in weights]
    missing = grads.count(None)
    if missing == len(grads):
        return FRESH, weights
    if missing:
        return AUTOGRAD, []
    root = grads[0]._base
    if root is None or root.dtype != torch.float32 or root.numel() != numel or not root.is_contiguous():
        return AUTOGRAD, []
    base_ptr = root.data_ptr()
    for w, g, off in zip(weights, grads, offsets):
        if (g._base is not root or not g.is_contiguous() or g.shape != w.shape
                or g.data_ptr() != base_ptr + 4 * off):
            return AUTOGRAD, []
    return root, weights


def install(weights: list[Tensor], views: list[Tensor]) -> None:
    """Make each weight's ``.grad`` the given view of a freshly written buffer."""
    for w, v in zip(weights, views):
        w.grad = v


def group_gradients(ctx, groups, dtypes: list[torch.dtype], product: Callable, all_products: Callable) -> list:
    """The backward's per-layer gradients for autograd (None where written into ``.grad``).

    ``groups``: ``((rows, cols), layer indices)`` per shape group, whose gradients are one
    ``[L_g, rows, cols]`` buffer each. ``product(g, out)``: group ``g``'s buffer, fresh (``out``
    None) or added to ``out``; eager only. ``all_products()``: every group's buffer at once
    (the registered op: the path whenever no direct write is allowed, torch.compile included).
    """
    n = len(dtypes)
    if allowed(ctx, n):
        buffers = []
        for g, ((r, c), idx) in enumerate(groups):
            mode, weights = plan(ctx, idx, range(0, len(idx) * r * c, r * c), len(idx) * r * c)
            if isinstance(mode, Tensor):
                product(g, mode.view(len(idx), r, c))
                buffers.append(None)
            elif mode == FRESH:
                for w, v in zip(weights, product(g, None)):  # install(), inlined: runs per group every step
                    w.grad = v
                buffers.append(None)
            else:
                buffers.append(product(g, None))
    else:
        buffers = all_products()
    grads: list[Tensor | None] = [None] * n
    for buf, (_, idx) in zip(buffers, groups):
        if buf is not None:
            for j, i in enumerate(idx):
                grads[i] = buf[j] if dtypes[i] == torch.float32 else buf[j].to(dtypes[i])
    return grads


def layer_gradients(ctx, grads: list[Tensor], factors: list[Tensor]) -> list:
    """The backward's gradients ``grads[i] * factors[i]`` for autograd, per layer (a backend
    that returns one gradient tensor per layer, the CUDA extension's). Where :func:`allowed`
    and :func:`plan` allow, the product goes into ``.grad`` instead (None returned): installed
    as a view of a fresh flat buffer when ``.grad`` is None, accumulated in place (one pass,
    ``addcmul_``) when ``.grad`` is such a view from an earlier install."""
    out: list[Tensor | None] = []
    if not allowed(ctx, len(grads)):
        return [g * f for g, f in zip(grads, factors)]
    for i, (g, f) in enumerate(zip(grads, factors)):
        mode, weights = plan(ctx, [i], [0], g.numel())
        if isinstance(mode, Tensor):
            mode.view(g.shape).addcmul_(g, f)
            out.append(None)
        elif mode == FRESH:
            install(weights, [(g * f).view(g.shape)])  # a view: its _base is what plan() finds next time
            out.append(None)
        else:
            out.append(g * f)
    return out
