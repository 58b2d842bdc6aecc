"""The "torch" backend of the OrthoReg penalty: layers grouped by shape and computed with
batched library matmuls; the CPU default and the fallback everywhere.

Forward (``fastortho::ortho_gram_torch``) forms each update ``D = W - W0`` once and its
Gram's ``G - I``, and keeps both for backward. Backward (``fastortho::ortho_grad_torch``)
folds the per-layer factor (upstream gradient x 4, or / ||G - I||) into the small ``G - I``
and writes each gradient with one product, ``D (c (G - I))``: no pass over a gradient-sized
buffer is spent on scaling. Both are ``torch.library.custom_op`` s (opaque to
torch.compile, with fake kernels); the precision flags they set act at run time only.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from .precision import fp32_matmul


@functools.lru_cache(maxsize=256)
def shape_groups(shapes: tuple[tuple[int, int], ...]) -> tuple[tuple[tuple[int, int], tuple[int, ...]], ...]:
    """Layers grouped by shape, in order of first appearance: ((shape, layer indices), ...)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(shapes):
        groups.setdefault(tuple(s), []).append(i)
    return tuple((s, tuple(idx)) for s, idx in groups.items())


def weight_shapes(weights: list[Tensor]) -> tuple[tuple[int, int], ...]:
    return tuple((int(w.shape[0]), int(w.shape[1])) for w in weights)


@functools.lru_cache(maxsize=256)
def _group_permutations(groups, device: torch.device) -> tuple[Tensor, Tensor]:
    """Device index tensors between layer order and group order (layers of group 0, then
    group 1, ...), made once: indexing with a Python list would copy the index from pageable
    host memory on every call, which waits for the GPU to drain."""
    order = [i for _, idx in groups for i in idx]
    to_groups = torch.tensor(order, dtype=torch.long)
    to_layers = torch.empty_like(to_groups)
    to_layers[to_groups] = torch.arange(len(order))
    return to_groups.to(device), to_layers.to(device)


def layer_groups(weights: list[Tensor]) -> tuple[tuple[tuple[int, int], tuple[int, ...]], ...]:
    """How the layers are batched. On CUDA, by shape: one batched product per group instead
    of one launch per layer. Elsewhere one group per layer: there is no launch overhead to
    amortize and stacking would only copy the weights."""
    shapes = weight_shapes(weights)
    if weights[0].device.type == "cuda":
        return shape_groups(shapes)
    return tuple((s, (i,)) for i, s in enumerate(shapes))


@functools.lru_cache(maxsize=None)
def _bmm_has_out_dtype(device_type: str) -> bool:
    """Whether ``torch.bmm(..., out_dtype=torch.float32)`` runs for bf16 on this device type
    (CUDA in recent PyTorch); probed once, lazily."""
    try:
        a = torch.ones(1, 2, 2, dtype=torch.bfloat16, device=device_type)
        return torch.bmm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _bmm(a: Tensor, b: Tensor, precision: str) -> Tensor:
    """fp32 batched product with the operands treated per ``precision``; fp32 result."""
    if precision == "bf16":
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        if a.device.type == "cuda" and _bmm_has_out_dtype("cuda"):
            return torch.bmm(a16, b16, out_dtype=torch.float32)
        if a.device.type == "cuda":
            return torch.bmm(a16, b16).float()
        # Exact emulation elsewhere: bf16-rounded operands, fp32 products and sums.
        with fp32_matmul("ieee", a.device.type):
            return torch.bmm(a16.float(), b16.float())
    with fp32_matmul(precision, a.device.type):
        return torch.bmm(a, b)


# Column-block width of the symmetric Gram below. Narrower blocks skip more of the lower
# triangle but run less efficient products; 256 measured best on the 2-core CPU.
SYMMETRIC_GRAM_BLOCK = 256


def _gram(x: Tensor, precision: str) -> Tensor:
    """``x^T x`` for ``x`` of shape [L, big, k], computing only the block rows of the upper
    triangle (two thirds of the products for k = 768) and mirroring them."""
    k = x.shape[2]
    block = SYMMETRIC_GRAM_BLOCK
    if k < 2 * block:
        return _bmm(x.transpose(1, 2), x, precision)
    g = x.new_empty((x.shape[0], k, k), dtype=torch.float32)
    for i0 in range(0, k, block):
        i1 = min(k, i0 + block)
        rows = _bmm(x[:, :, i0:i1].transpose(1, 2), x[:, :, i0:], precision)
        g[:, i0:i1, i0:] = rows
        g[:, i0:, i0:i1] = rows.transpose(1, 2)
    return g


def _deltas(weights: list[Tensor], bases: list[Tensor], idx: tuple[int, ...]) -> Tensor:
    """``W - W0`` in fp32 for the layers ``idx`` of one shape, stacked ``[L_g, out, in]``:
    one pass over each pair, written straight into the stacked buffer."""
    if len(idx) == 1:
        i = idx[0]
        return (weights[i].float() - bases[i].float()).unsqueeze(0)
    w = weights[idx[0]]
    d = torch.empty((len(idx),) + tuple(w.shape), dtype=torch.float32, device=w.device)
    for j, i in enumerate(idx):
        torch.sub(weights[i].float(), bases[i].float(), out=d[j])
    return d


def gram_minus_identity(weights: list[Tensor], bases: list[Tensor], precision: str,
                        keep: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Per-layer ``||G - I||_F^2`` (fp32 ``[L]``) and, if ``keep``, per group the stacked
    updates ``D`` and ``G - I`` that the gradient needs."""
    groups = layer_groups(weights)
    sqs: list[Tensor] = []
    deltas: list[Tensor] = []
    gmis: list[Tensor] = []
    for (rows, cols), idx in groups:
        d = _deltas(weights, bases, idx)
        g = _gram(d if rows >= cols else d.transpose(1, 2), precision)
        g.diagonal(dim1=1, dim2=2).sub_(1.0)  # G - I without materializing I
        # square().sum() (cascaded summation) is ~100x more accurate in fp32 on a CPU than
        # linalg.vector_norm over 10^6 terms; the temporary is only k x k per layer.
        sq = g.square().sum(dim=(1, 2))
        sqs.append(sq)
        if keep:
            deltas.append(d)
            gmis.append(g)
    values = torch.cat(sqs)
    if len(groups) > 1 and any(len(idx) > 1 for _, idx in groups):
        values = values[_group_permutations(groups, values.device)[1]]
    return values, deltas, gmis


def scaled_grads(deltas: list[Tensor], gmis: list[Tensor], coefs: list[Tensor],
                 precision: str) -> list[Tensor]:
    """Per group ``D (c (G - I))`` (tall) or ``(c (G - I)) D`` (wide): the per-layer factor
    ``c`` is folded into the small ``k x k`` matrix, so the gradient is written once."""
    out = []
    for d, g, c in zip(deltas, gmis, coefs):
        gs = g * c.view(-1, 1, 1)
        out.append(_bmm(d, gs, precision) if d.shape[1] >= d.shape[2] else _bmm(gs, d, precision))
    return out


@torch.library.custom_op("fastortho::ortho_gram_torch", mutates_args=())
def ortho_gram_torch(weights: list[Tensor], bases: list[Tensor], squared: bool, precision: str,
                     need_grad: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    sq, deltas, gmis = gram_minus_identity(weights, bases, precision, keep=need_grad)
    return (sq if squared else sq.sqrt()), deltas, gmis


@ortho_gram_torch.register_fake
def _(weights, bases, squared, precision, need_grad):
    values = weights[0].new_empty(len(weights), dtype=torch.float32)
    if not need_grad:
        return values, [], []
    groups = layer_groups(weights)
    deltas = [weights[0].new_empty((len(idx), r, c), dtype=torch.float32) for (r, c), idx in groups]
    gmis = [weights[0].new_empty((len(idx), min(r, c), min(r, c)), dtype=torch.float32)
            for (r, c), idx in groups]
    return values, deltas, gmis


@torch.library.custom_op("fastortho::ortho_grad_torch", mutates_args=())
def ortho_grad_torch(deltas: list[Tensor], gmis: list[Tensor], coefs: list[Tensor],
                     precision: str) -> list[Tensor]:
    return scaled_grads(deltas, gmis, coefs, precision)


@ortho_grad_torch.register_fake
def _(deltas, gmis, coefs, precision):
    return [torch.empty_like(d) for d in deltas]


def _setup_context(ctx, inputs, output):
    weights, _, squared, precision, need_grad = inputs
    values, deltas, gmis = output
    ctx.groups = layer_groups(weights)
    ctx.dtypes = [w.dtype for w in weights]
    ctx.squared, ctx.precision, ctx.need_grad = squared, precision, need_grad
    ctx.save_for_backward(values, *deltas, *gmis)


def weight_grads(values, deltas, gmis, groups, dtypes, squared, precision, grad_values, grad_fn):
    """Per-layer gradients from what forward kept; ``grad_fn`` is :func:`scaled_grads` or
    its registered op."""
    if squared:
        coef = 4.0 * grad_values
    else:
        # d||G - I|| = 4 D (G - I) / (2 ||G - I||); zero where the norm is zero.
        coef = torch.where(values > 0, 2.0 * grad_values / values, torch.zeros_like(values))
    if any(len(idx) > 1 for _, idx in groups):
        coef = coef[_group_permutations(groups, coef.device)[0]]
    coefs = list(torch.split(coef, [len(idx) for _, idx in groups]))
    buffers = grad_fn(list(deltas), list(gmis), coefs, precision)
    grads: list[Tensor | None] = [None] * len(dtypes)
    for buf, (_, idx) in zip(buffers, groups):
        for j, i in enumerate(idx):
            grads[i] = buf[j] if dtypes[i] == torch.float32 else buf[j].to(dtypes[i])
    return grads


def _backward(ctx, grad_values, _grad_deltas, _grad_gmis):
    n = len(ctx.dtypes)
    if not ctx.need_grad:
        return [None] * n, [None] * n, None, None, None
    values, *saved = ctx.saved_tensors
    k = len(ctx.groups)
    grads = weight_grads(values, saved[:k], saved[k:], ctx.groups, ctx.dtypes, ctx.squared,
                         ctx.precision, grad_values, ortho_grad_torch)
    return grads, [None] * n, None, None, None


ortho_gram_torch.register_autograd(_backward, setup_context=_setup_context)


class TorchPenalty(torch.autograd.Function):
    """The same computation for eager mode without the custom-op dispatch, whose Python cost
    per call grows with the number of list arguments (milliseconds for a ViT's 100 tensors).
    Under torch.compile the registered ops are used instead."""

    @staticmethod
    def forward(ctx, squared: bool, precision: str, n: int, *tensors: Tensor) -> Tensor:
        weights, bases = list(tensors[:n]), list(tensors[n:])
        need_grad = any(ctx.needs_input_grad[3:3 + n])
        sq, deltas, gmis = gram_minus_identity(weights, bases, precision, keep=need_grad)
        values = sq if squared else sq.sqrt()
        ctx.groups, ctx.dtypes = layer_groups(weights), [w.dtype for w in weights]
        ctx.squared, ctx.precision, ctx.n = squared, precision, n
        ctx.save_for_backward(values, *deltas, *gmis)
        return values

    @staticmethod
    def backward(ctx, grad_values):
        values, *saved = ctx.saved_tensors
        none = [None] * ctx.n
        if not saved:
            return (None, None, None, *none, *none)
        k = len(ctx.groups)
        grads = weight_grads(values, saved[:k], saved[k:], ctx.groups, ctx.dtypes, ctx.squared,
                             ctx.precision, grad_values, scaled_grads)
        return (None, None, None, *grads, *none)
