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


def handed(mode) -> bool:
    """Whether a :func:`plan` says: hand the gradients to autograd."""
    return isinstance(mode, str) and mode == AUTOGRAD


def _will_accumulate(node) -> bool:
    """Whether this backward runs ``node`` (an AccumulateGrad). torch.autograd.grad runs none:
    there the engine refuses the question for leaf nodes."""
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:
        return False


def _leaf(ctx, position: int) -> Tensor | None:
    """The plain fp32 leaf weight behind the backward's input ``position`` whose AccumulateGrad
    this backward runs and which no hook watches, else None."""
    node = ctx.next_functions[position][0]
    if node is None or type(node).__name__ != "AccumulateGrad" or not _will_accumulate(node):
        return None
    w = node.variable
    if type(w) not in (nn.Parameter, Tensor) or w.dtype != torch.float32:
        return None
    if w._backward_hooks or getattr(w, "_post_accumulate_grad_hooks", None):
        return None
    return w


def allowed(ctx, n: int) -> bool:
    """Whether this backward may write ``.grad`` at all (checked once per backward): eager,
    no ``create_graph``, the switch on, and no weight among the first ``n`` inputs twice (a
    shared weight gets the sum of its terms, which autograd forms)."""
    if not (getattr(ctx, "eager", False) and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and grad_into_weights_enabled()):
        return False
    seen = set()
    for node, _ in ctx.next_functions[:n]:
        w = getattr(node, "variable", None)
        if w is not None:
            if id(w) in seen:
                return False
            seen.add(id(w))
    return True


def plan(ctx, layers: list[int], offsets: list[int], numel: int) -> tuple[str | Tensor, list[Tensor]]:
    """How the layers ``layers`` (the backward's input positions of their weights), whose
    gradients fill one fp32 buffer of ``numel`` elements at element ``offsets``, get them:
    ``(AUTOGRAD, [])``, ``(FRESH, weights)`` or ``(buffer, weights)`` (accumulate into
    ``buffer``, whose views the weights' ``.grad`` are)."""
    weights = []
    for i in layers:
        w = _leaf(ctx, i)
        if w is None:
            return AUTOGRAD, []
        weights.append(w)
    grads = [w.grad for w in weights]
    if all(g is None for g in grads):
        return FRESH, weights
    if any(g is None for g in grads):
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
            mode, weights = plan(ctx, list(idx), [j * r * c for j in range(len(idx))], len(idx) * r * c)
            if isinstance(mode, Tensor):
                product(g, mode.view(len(idx), r, c))
            elif mode == FRESH:
                install(weights, list(product(g, None)))
            buffers.append(product(g, None) if handed(mode) else None)
    else:
        buffers = all_products()
    grads: list[Tensor | None] = [None] * n
    for buf, (_, idx) in zip(buffers, groups):
        if buf is not None:
            for j, i in enumerate(idx):
                grads[i] = buf[j] if dtypes[i] == torch.float32 else buf[j].to(dtypes[i])
    return grads
