"""OrthoReg on weights sharded by FSDP2 (``fully_shard``) or DTensor, without gathering them.

A weight sharded along one dimension, ``D = [D_1; D_2; ...]`` by rows (``Shard(0)``, what
FSDP2 does) or ``[D_1, D_2, ...]`` by columns (``Shard(1)``), has a Gram on the OTHER side
that is a sum of local Grams: ``D^T D = sum_i D_i^T D_i`` (rows sharded),
``D D^T = sum_i D_i D_i^T`` (columns sharded). Each rank computes its partial Grams, one
all-reduce of the small matrices (all layers in size-bounded buckets) sums them, and the
gradient ``4 D_i (G - I)`` (or ``4 (G - I) D_i``) of the local block needs nothing else.

That side is the Gram of the larger side for some layers (a wide weight sharded by rows).
``||G - I||^2`` differs between the two sides only by the constant ``|out - in|``, and the
gradient not at all, so the value is corrected to the smaller-side penalty of
docs/design.md section 1: the result equals the single-process computation exactly (to rounding). When that
Gram is larger than the weight itself (ViT MLP ``c_proj``: 4096 x 4096 against 1024 x 4096),
exchanging it would cost more than the weight; such layers exchange their update's blocks
instead (gathered in forward and again in backward, never kept). ``communication_bytes``
gives the figures.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..._config import EXCHANGES, exchange_policy, set_exchange
from .._common import bmm, upstream_coefficient, without_autocast

# All-reduce bucket size (bytes): large enough to amortize a collective's latency over many
# layers, small enough not to hold a second copy of every Gram at once.
BUCKET_BYTES = 64 << 20


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without DTensor
        return None
    return DTensor


def is_dtensor(t) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def shard_dim(p) -> int | None:
    """The sharded dimension of a DTensor parameter on a 1-D mesh (None if replicated);
    anything else raises a ValueError saying what is supported."""
    from torch.distributed.tensor import Replicate, Shard

    if p.device_mesh.ndim != 1 or len(p.placements) != 1:
        raise ValueError(f"a DTensor weight on a {p.device_mesh.ndim}-D mesh with placements {p.placements}: "
                         f"sharded OrthoReg supports 1-D meshes (FSDP2 fully_shard, one Shard or Replicate)")
    placement = p.placements[0]
    if isinstance(placement, Replicate):
        return None
    if isinstance(placement, Shard) and placement.dim in (0, 1, -1, -2):
        return placement.dim % 2
    raise ValueError(f"DTensor placement {placement} is not supported by sharded OrthoReg")


def local_base(base, p) -> Tensor:
    """The local block of the base tensor of DTensor parameter ``p``: from a DTensor with the
    same placements, or sliced (no communication) from a full tensor of the global shape."""
    if is_dtensor(base):
        if base.placements != p.placements or base.device_mesh != p.device_mesh:
            raise ValueError(f"base: a DTensor with placements {base.placements} for a weight sharded as "
                             f"{p.placements}; use the same sharding or a full tensor")
        return base.to_local()
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(base.detach().to(p.device_mesh.device_type), p.device_mesh, p.placements,
                             src_data_rank=None).to_local()


def _all_reduce_bucketed(tensors: list[Tensor], group) -> list[Tensor]:
    """Sum every tensor across the group, flattened into buckets of at most BUCKET_BYTES."""
    out: list[Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    start = 0
    while start < len(tensors):
        end, size = start, 0
        while end < len(tensors) and (end == start or size + tensors[end].numel() * 4 <= BUCKET_BYTES):
            size += tensors[end].numel() * 4
            end += 1
        flat = torch.cat([t.reshape(-1) for t in tensors[start:end]])
        dist.all_reduce(flat, group=group)
        pos = 0
        for i in range(start, end):
            n = tensors[i].numel()
            out[i] = flat[pos:pos + n].view_as(tensors[i])
            pos += n
        start = end
    return out


def chunk_bounds(size: int, world: int, rank: int) -> tuple[int, int]:
    """The ``[start, stop)`` of rank ``rank``'s block of ``size`` rows under DTensor's
    ``Shard`` (torch.chunk semantics: blocks of ``ceil(size / world)``, the last ones short)."""
    block = -(-size // world)
    return min(size, rank * block), min(size, (rank + 1) * block)


def _gather(local: Tensor, dim: int, size: int, group, world: int) -> Tensor:
    """The full tensor from every rank's block along ``dim`` (uneven blocks padded for the
    collective, then trimmed)."""
    block = -(-size // world)
    pad = [0, 0, 0, 0]
    pad[3 - 2 * dim] = block - local.shape[dim]  # F.pad order: last dim first
    padded = torch.nn.functional.pad(local, pad).contiguous()
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    return torch.cat(parts, dim=dim).narrow(dim, 0, size)


__all__ = ["EXCHANGES", "set_exchange", "uses_gram_exchange", "ShardedPenalty", "sharded_ortho_penalty",
           "is_dtensor", "shard_dim", "local_base", "chunk_bounds", "communication_bytes"]


def uses_gram_exchange(shape: tuple[int, int], dim: int, policy: str | None = None) -> bool:
    """Whether a weight sharded along ``dim`` exchanges its partial Grams (all-reduce of
    ``m x m``, ``m`` the unsharded size) rather than its blocks (all-gather in forward and
    again in backward, ``rows x cols`` each): under "auto" the Gram when ``m <= `` the sharded
    size, always under "gram"."""
    if (policy or exchange_policy()) == "gram":
        return True
    return shape[1 - dim] <= shape[dim]


class ShardedPenalty(torch.autograd.Function):
    """Per-layer penalties of sharded weights from their local blocks. Gram-exchange layers:
    partial Grams and one bucketed all-reduce in forward, a local backward. Block-exchange
    layers (the unsharded side is the larger one): the update is all-gathered, the penalty
    computed on its smaller side, and gathered again in backward (nothing full is kept)."""

    @staticmethod
    def forward(ctx, squared: bool, precision: str, group, world: int, rank: int, dims: tuple[int, ...],
                shapes: tuple, n: int, *tensors: Tensor) -> Tensor:
        locals_, bases = tensors[:n], tensors[n:]
        deltas = [(w.float() - b.float()) for w, b in zip(locals_, bases)]
        gram_layers = [i for i in range(n) if uses_gram_exchange(shapes[i], dims[i])]
        partials = []
        for i in gram_layers:
            x = deltas[i].unsqueeze(0)
            # rows sharded: G = D^T D (columns); columns sharded: G = D D^T (rows)
            partials.append(bmm(x.transpose(1, 2), x, precision)[0] if dims[i] == 0 else
                            bmm(x, x.transpose(1, 2), precision)[0])
        grams = dict(zip(gram_layers, _all_reduce_bucketed(partials, group) if partials else []))
        values, gmis = [], []
        for i in range(n):
            rows, cols = shapes[i]
            if i in grams:
                g = grams[i].clone()
            else:
                full = _gather(deltas[i], dims[i], shapes[i][dims[i]], group, world).unsqueeze(0)
                g = (bmm(full.transpose(1, 2), full, precision) if rows >= cols else
                     bmm(full, full.transpose(1, 2), precision))[0]
            g.diagonal().sub_(1.0)
            # ||G - I_m||^2 on an m-side Gram = the smaller-side penalty + (m - min(rows, cols))
            values.append(g.square().sum() - float(g.shape[0] - min(rows, cols)))
            gmis.append(g)
        sq = torch.stack(values).clamp_min(0.0)
        out = sq if squared else sq.sqrt()
        ctx.squared, ctx.dims, ctx.precision, ctx.n, ctx.shapes = squared, dims, precision, n, shapes
        ctx.group, ctx.world, ctx.rank, ctx.gram_layers = group, world, rank, set(gram_layers)
        ctx.dtypes = [w.dtype for w in locals_]
        ctx.save_for_backward(out, *deltas, *gmis)
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_values):
        out, *saved = ctx.saved_tensors
        n = ctx.n
        deltas, gmis = saved[:n], saved[n:]
        coef = upstream_coefficient(out, grad_values, ctx.squared, 4.0)
        grads = []
        for i, (x, g, d) in enumerate(zip(deltas, gmis, ctx.dims)):
            gs = g * coef[i]
            rows, cols = ctx.shapes[i]
            if i in ctx.gram_layers:
                grad = x @ gs if d == 0 else gs @ x
            else:
                # grad of the full update, restricted to this rank's block
                full = _gather(x, d, ctx.shapes[i][d], ctx.group, ctx.world)
                start, stop = chunk_bounds(ctx.shapes[i][d], ctx.world, ctx.rank)
                if rows >= cols:  # 4 D (G - I): rows of D, or columns of the product
                    grad = x @ gs if d == 0 else full @ gs[:, start:stop]
                else:  # 4 (G - I) D
                    grad = gs[start:stop] @ full if d == 0 else gs @ x
            grads.append(grad.to(ctx.dtypes[i]))
        return (None,) * 8 + (*grads, *([None] * n))


def sharded_ortho_penalty(weights: list, bases: list, *, squared: bool, precision: str) -> Tensor:
    """Per-layer penalties (fp32 ``[L]``, identical on every rank) of DTensor weights sharded
    on one 1-D mesh, differentiable w.r.t. the DTensor parameters (their gradients are
    DTensors with the same placements). No weight is gathered whole except, one at a time,
    the updates of layers whose unsharded side is the larger (see :func:`uses_gram_exchange`)."""
    mesh = weights[0].device_mesh
    if any(w.device_mesh != mesh for w in weights):
        raise ValueError("model: sharded weights on different device meshes; OrthoReg takes one mesh per call")
    dims = tuple(shard_dim(w) for w in weights)
    if any(d is None for d in dims):
        raise ValueError("internal: replicated DTensors belong to the unsharded path")
    locals_ = [w.to_local() for w in weights]
    local_bases = [local_base(b, w) for b, w in zip(bases, weights)]
    shapes = tuple((int(w.shape[0]), int(w.shape[1])) for w in weights)
    group = mesh.get_group(0)
    return ShardedPenalty.apply(squared, precision, group, mesh.size(), mesh.get_local_rank(), dims, shapes,
                                len(weights), *locals_, *local_bases)


def communication_bytes(shapes, world_size: int, shard: int = 0, bytes_per_value: int = 4,
                        policy: str = "auto") -> dict[str, int]:
    """Bytes each rank sends per step (forward + backward, ring collectives) for the penalty
    of weights of ``shapes`` sharded along ``shard`` over ``world_size`` ranks:

    - ``fastortho``: the per-layer choice of :func:`sharded_ortho_penalty` (Gram all-reduce,
      ``2 (n - 1) / n`` x the Gram, or the update all-gathered twice, ``2 (n - 1) / n`` x it);
    - ``gram_only``: every layer by its unsharded-side Gram (never gathering);
    - ``gather_weights``: the unsharded way, all-gathering every weight for the penalty in
      forward and reduce-scattering its gradient in backward (``2 (n - 1) / n`` x the weights).
    """
    n = world_size
    f = (n - 1) / n
    gram_only = sum((c if shard == 0 else r) ** 2 for r, c in shapes) * bytes_per_value
    weights = sum(r * c for r, c in shapes) * bytes_per_value
    chosen = 0
    for r, c in shapes:
        if uses_gram_exchange((r, c), shard, policy):
            chosen += 2 * f * (c if shard == 0 else r) ** 2 * bytes_per_value
        else:
            chosen += 2 * f * r * c * bytes_per_value
    return {"fastortho": int(chosen), "gram_only": int(2 * f * gram_only), "gather_weights": int(2 * f * weights),
            "weight_bytes": weights}
