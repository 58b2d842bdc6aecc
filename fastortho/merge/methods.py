"""The merge methods: each maps task vectors ``tau_1..tau_T`` (same keys and shapes) to one
merged vector; the merged model is ``th0 + alpha * merged``, alpha searched on validation.

All but task arithmetic work on stacked copies of one shape group at a time
(:mod:`._chunks`): elementwise steps and the per-layer SVDs are single batched calls per chunk,
on ``device`` (default: where the vectors are). Temporaries stay under about two vector-sized
buffers: the stacked chunk is at most half a vector, its SVD factors about as much again; TIES
needs one flat vector (plus a quarter-size mask) to find each task's threshold.

Each docstring names where the method differs from FusionBench 0.2.33's implementation
(tests/test_merge.py runs both on the same vectors).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from ..ops._common import autocast_off, fp32_matmul
from ..task_vectors import _progress
from ._chunks import shape_chunks, stack, stacked_sum, unstack, vector_numel
from ._svd import polar, polar_and_values, top_svd

Vectors = Sequence[Mapping[str, Tensor]]


def _compute_dtype(vectors: Vectors) -> torch.dtype:
    # SVD has no half-precision kernels; float64 vectors (the reference tests) stay float64
    return torch.float64 if next(iter(vectors[0].values())).dtype == torch.float64 else torch.float32


def _budget(vectors: Vectors, budget: int | None) -> int:
    return max(1, vector_numel(vectors[0]) // 2) if budget is None else budget


class _Source:
    """Where the stacked entries come from: ``get(t, k)`` (a task's entry, plain or dropped by
    DARE) already on the compute ``device`` in the compute ``dtype``."""

    def __init__(self, vectors: Vectors, get: Callable[[int, str], Tensor], device, dtype):
        self.vectors, self.get, self.device, self.dtype = vectors, get, device, dtype

    def stacked(self, keys: Sequence[str]) -> Tensor:
        shape = tuple(self.vectors[0][keys[0]].shape)
        return stack(self.get, len(self.vectors), keys, shape, self.device, self.dtype)

    def summed(self, keys: Sequence[str]) -> Tensor:
        shape = tuple(self.vectors[0][keys[0]].shape)
        return stacked_sum(self.get, len(self.vectors), keys, shape, self.device, self.dtype)


def _plain(vectors: Vectors, device, dtype) -> _Source:
    return _Source(vectors, lambda t, k: vectors[t][k].to(device=device, dtype=dtype), device, dtype)


# ----------------------------------------------------------------------------- task arithmetic

def task_arithmetic(vectors: Vectors, **_) -> dict[str, Tensor]:
    """``sum_t tau_t``, added in task order (bit-identical to ``sum(task_vectors)`` and to
    FusionBench's ``TaskArithmeticAlgorithm`` at the same coefficient)."""
    out = {}
    for k in vectors[0]:
        dtype = vectors[0][k].dtype
        for v in vectors[1:]:
            dtype = torch.promote_types(dtype, v[k].dtype)  # as sum() of TaskVectors promotes
        acc = vectors[0][k].to(dtype, copy=True)
        for v in vectors[1:]:
            acc.add_(v[k].to(acc.device))  # in place: one output allocation, the same roundings
        out[k] = acc
    return out


# ----------------------------------------------------------------------------- DARE

class DropAndRescale:
    """DARE's random drop (Yu et al. 2024): each entry of each task vector is kept with
    probability ``1 - p`` and rescaled by ``1 / (1 - p)``. Draws come from one generator seeded
    with ``seed`` on the compute device, task by task, key by key: on a CPU, the same draws as
    FusionBench's ``torch.manual_seed(seed)`` followed by its ``rand_like`` loop. The generator
    state before each (task, key) is kept (a few KB each), so later passes see the same masks
    without storing them."""

    def __init__(self, vectors: Vectors, p: float, rescale: bool, seed: int, device, dtype):
        self.vectors, self.p, self.rescale, self.device, self.dtype = vectors, p, rescale, device, dtype
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)
        self.states: dict[tuple[int, str], Tensor] = {}
        self.order = [(t, k) for t in range(len(vectors)) for k in vectors[0]]

    def __call__(self, t: int, k: str) -> Tensor:
        x = self.vectors[t][k].to(device=self.device, dtype=self.dtype)
        state = self.states.get((t, k))
        if state is None:
            if len(self.states) >= len(self.order) or self.order[len(self.states)] != (t, k):
                raise RuntimeError("DropAndRescale: first pass must visit tasks then keys in order")
            self.states[(t, k)] = self.generator.get_state()
        else:
            self.generator.set_state(state)
        keep = torch.rand(x.shape, generator=self.generator, device=x.device, dtype=torch.float32) > self.p
        x = x * keep
        return x / (1 - self.p) if self.rescale else x


def dare(vectors: Vectors, *, p: float = 0.5, rescale: bool = True, seed: int = 0, then: str = "ta",
         device=None, budget: int | None = None, progress: bool = False, **ties_options) -> dict[str, Tensor]:
    """DARE: drop each task vector's entries at rate ``p`` (rescaling the rest by
    ``1 / (1 - p)``), then merge by task arithmetic (``then="ta"``, FusionBench's
    ``DareTaskArithmetic``) or TIES (``then="ties"``, its ``DareTiesMerging``; ``ties_options``
    go to :func:`ties`). ``p = 0.5`` is FusionBench's CLIP setting (the DARE paper's language
    models tolerate 0.9). Every tensor is dropped, as FusionBench does by default
    (``only_on_linear_weights=False``). Deterministic for a given ``seed`` and device."""
    if not 0 <= p < 1:
        raise ValueError(f"p: expected a drop rate in [0, 1), got {p!r}")
    device = device or next(iter(vectors[0].values())).device
    drop = DropAndRescale(vectors, p, rescale, seed, device, _compute_dtype(vectors))
    if then == "ties":
        return _ties(vectors, _Source(vectors, drop, device, drop.dtype), device=device, budget=budget,
                     progress=progress, title="DARE + TIES", **ties_options)
    if then != "ta":
        raise ValueError(f"then: expected 'ta' or 'ties', got {then!r}")
    out: dict[str, Tensor] = {}
    # task-major: FusionBench's order of draws
    for t in _progress(range(len(vectors)), "DARE: dropping and adding task vectors", show=progress):
        for k in vectors[0]:
            x = drop(t, k)
            out[k] = x if t == 0 else out[k] + x
    like = vectors[0]
    return {k: v.to(device=like[k].device, dtype=like[k].dtype) for k, v in out.items()}


# ----------------------------------------------------------------------------- TIES

def kth_smallest(x: Tensor, rank: int) -> Tensor:
    """``x.kthvalue(rank).values`` of a flat tensor, exactly, in a few vectorized passes: a
    random sample brackets the value, one count and one selection keep the entries inside the
    bracket, and ``kthvalue`` runs on those alone (88 M entries on the 2-core CPU here: 0.76 s
    against 1.03 s for ``kthvalue``). Falls back to the full ``kthvalue`` when the bracket
    misses, which a sample of 2^20 makes a < 1e-12 event."""
    n = x.numel()
    if n <= 1 << 22:
        return x.kthvalue(rank).values
    generator = torch.Generator(device=x.device)
    generator.manual_seed(0)
    sample = x[torch.randint(n, (1 << 20,), generator=generator, device=x.device)].sort().values
    m, at = sample.numel(), int(rank / n * sample.numel())
    spread = 8 * int(m ** 0.5) + 1  # > 8 binomial standard deviations of the sample rank
    lo, hi = sample[max(0, at - spread)], sample[min(m - 1, at + spread)]
    below = int((x < lo).sum())
    inside = x[(x >= lo) & (x <= hi)]
    if below < rank <= below + inside.numel():
        return inside.kthvalue(rank - below).values
    return x.kthvalue(rank).values


def ties(vectors: Vectors, *, keep: float = 0.2, merge: str = "mean", device=None, budget: int | None = None,
         progress: bool = False) -> dict[str, Tensor]:
    """TIES-merging (Yadav et al. 2023): trim each task vector to its ``keep`` fraction of
    largest-magnitude entries, over the whole vector (as the released code does: those at least
    the ``(d - int(keep d))``-th smallest magnitude, i.e. one more than ``keep d`` without ties), elect per
    entry the sign of the trimmed sum (an entry whose sum is exactly zero takes the sign of the
    sum of all elected signs), and merge the entries that agree with it: their mean
    (``merge="mean"``, the paper's disjoint mean), ``"sum"`` or signed ``"max"``.

    FusionBench's ``TiesMergingAlgorithm`` computes the same; its default ``merge_func`` is
    ``"sum"`` (with ``scaling_factor=0.3``), its ``threshold=20`` is ``keep=0.2`` here."""
    device = device or next(iter(vectors[0].values())).device
    return _ties(vectors, _plain(vectors, device, _compute_dtype(vectors)), keep=keep, merge=merge,
                 device=device, budget=budget, progress=progress)


def _ties(vectors: Vectors, source: _Source, *, keep: float = 0.2, merge: str = "mean",
          device=None, budget: int | None = None, progress: bool = False, title: str = "TIES") -> dict[str, Tensor]:
    if merge not in ("mean", "sum", "max"):
        raise ValueError(f"merge: expected 'mean', 'sum' or 'max', got {merge!r}")
    if not 0 < keep <= 1:
        raise ValueError(f"keep: expected a fraction in (0, 1], got {keep!r}")
    keys, n = list(vectors[0]), len(vectors)
    total = vector_numel(vectors[0])
    rank = total - int(total * keep)  # FusionBench's k-th smallest magnitude, kept with all above it
    thresholds = []
    for t in _progress(range(n), f"{title}: trim thresholds", show=progress):  # task-major: one flat copy at a time
        if rank < 1:
            thresholds.append(None)
            continue
        flat = torch.cat([source.get(t, k).abs().reshape(-1) for k in keys])
        thresholds.append(kth_smallest(flat, rank))
        del flat
    thr_all = None if any(x is None for x in thresholds) else torch.stack(thresholds)
    budget = _budget(vectors, budget)

    def trimmed(chunk: list[str]) -> Tensor:
        x = source.stacked(chunk)
        if thr_all is not None:
            x = x * (x.abs() >= thr_all.view(-1, *([1] * (x.dim() - 1))))
        return x

    # One pass. The elected sign of an entry whose trimmed sum is exactly zero is the sign of
    # the sum of all elected signs, known only at the end: such entries where some task is
    # nonzero (rare) keep their merge under both signs and are settled afterwards. Where every
    # task is zero, the merge is zero under any sign.
    votes = torch.zeros((), dtype=torch.float64, device=device)
    out: dict[str, Tensor] = {}
    undecided = []  # (chunk, index of the entries in the chunk, merge if +, merge if -)
    for chunk in _progress(list(shape_chunks(keys, vectors[0], n, budget)), f"{title}: sign election and merge",
                           show=progress):
        x = trimmed(chunk)
        sign = torch.sign(x.sum(0))
        votes += sign.sum(dtype=torch.float64)
        open_ = (sign == 0) & (x != 0).any(0)
        if bool(open_.any()):  # one host sync per chunk
            where = open_.nonzero(as_tuple=True)
            picked = x[(slice(None), *where)]
            ones = torch.ones(picked.shape[1:], dtype=x.dtype, device=x.device)
            undecided.append((chunk, where, _disjoint(picked, ones, merge), _disjoint(picked, -ones, merge)))
        unstack(_disjoint(x, sign, merge), chunk, out, vectors[0])  # a zero sign: as a zero majority would
    majority = float(torch.sign(votes))
    for chunk, where, plus, minus in undecided:
        if majority == 0:
            continue
        value = plus if majority > 0 else minus
        for i, k in enumerate(chunk):
            mine = where[0] == i
            out[k][tuple(w[mine] for w in where[1:])] = value[mine].to(out[k].dtype)
    return {k: out[k] for k in keys}


def _disjoint(x: Tensor, sign: Tensor, merge: str) -> Tensor:
    """TIES' disjoint merge over the task axis (0) of the entries that agree with ``sign``
    (a zero sign keeps the negative ones, as the released code's ``where`` does)."""
    agree = x * torch.where(sign > 0, x > 0, x < 0)
    if merge == "mean":
        return agree.sum(0) / (agree != 0).sum(0).clamp_min(1)
    if merge == "sum":
        return agree.sum(0)
    return agree.abs().amax(0) * sign


# ----------------------------------------------------------------------------- SVD-based

def _matrix_keys(vectors: Vectors, exclude: Sequence[str]) -> tuple[list[str], list[str]]:
    keys = list(vectors[0])
    matrices = [k for k in keys if vectors[0][k].dim() == 2 and k not in exclude]
    return matrices, [k for k in keys if k not in set(matrices)]


def _svd_merge(vectors: Vectors, merge_matrices: Callable[[Tensor], Tensor], *, exclude: Sequence[str], device,
               budget: int | None, summed: bool = False, progress: bool = False, title: str = "") -> dict[str, Tensor]:
    """Matrices (2-D entries not in ``exclude``) through ``merge_matrices([T, L, m, n]) ->
    [L, m, n]`` (with ``summed``: of the task sum ``[L, m, n]``, never stacked), one batched
    call per chunk of a shape group; every other entry is the mean over tasks (as
    FusionBench's SVD-based methods do).

    The products run in true float32 (float64 for float64 vectors) whatever the caller's
    ``torch.set_float32_matmul_precision`` or autocast: a training script's TF32 or bf16 would
    otherwise round the merged weights to about 1e-3 on a GPU, and a merge is not a per-step cost."""
    device = torch.device(device or next(iter(vectors[0].values())).device)
    dtype = _compute_dtype(vectors)
    source, n, budget = _plain(vectors, device, dtype), len(vectors), _budget(vectors, budget)
    matrices, others = _matrix_keys(vectors, exclude)
    out: dict[str, Tensor] = {}
    with autocast_off(), fp32_matmul("ieee", device.type):
        for chunk in _progress(list(shape_chunks(matrices, vectors[0], n, budget)), f"{title}: per-layer SVDs",
                               show=progress):
            unstack(merge_matrices(source.summed(chunk) if summed else source.stacked(chunk)), chunk, out,
                    vectors[0])
    for chunk in shape_chunks(others, vectors[0], n, budget):
        unstack(source.stacked(chunk).mean(0), chunk, out, vectors[0])
    return {k: out[k] for k in vectors[0]}


def tsv_merge(vectors: Vectors, *, exclude: Sequence[str] = (), device=None, budget: int | None = None,
              progress: bool = False) -> dict[str, Tensor]:
    """TSV-M (Gargiulo et al. 2025): per matrix, each task keeps its top ``r = int(k / T)``
    singular triplets (``k = min(m, n)``); the concatenated left and right singular vectors are
    each replaced by their nearest orthogonal matrix and recombined with the kept singular
    values. Equal to FusionBench's ``TaskSingularVectorMerging`` (``compute_and_sum_svd_mem_
    reduction``), which pads the concatenation to ``k`` columns with zeros: the padding does not
    change the result, so it is left out here.

    When a task's matrix has rank below ``r`` (a LoRA delta of low rank), the singular vectors
    of its zero singular values are whatever the SVD returns, and they enter the orthogonal
    factors: the merged matrix then depends on the SVD library (in FusionBench's too)."""
    n = len(vectors)

    def merge_matrices(x: Tensor) -> Tensor:
        rank = int(min(x.shape[-2:]) / n)
        if rank == 0:
            return torch.zeros_like(x[0])
        u, s, vh = top_svd(x, rank)  # [T, L, ...]: one batched call
        u = u.permute(1, 2, 0, 3).reshape(x.shape[1], x.shape[2], n * rank)  # task-major columns
        s = s.permute(1, 0, 2).reshape(x.shape[1], n * rank)
        vh = vh.permute(1, 0, 2, 3).reshape(x.shape[1], n * rank, x.shape[3])
        return (polar(u) * s.unsqueeze(-2)) @ polar(vh)

    return _svd_merge(vectors, merge_matrices, exclude=exclude, device=device, budget=budget, progress=progress,
                      title="TSV-M")


def iso_c(vectors: Vectors, *, exclude: Sequence[str] = (), device=None, budget: int | None = None,
          progress: bool = False) -> dict[str, Tensor]:
    """Iso-C (Marczak et al. 2025): per matrix, the sum of the task matrices with its singular
    values all replaced by their mean, ``mean(S) U V^T``. Equal to FusionBench's ``ISO_C_Merge``
    (its ``scaling_factor=1.0`` default is the coefficient here)."""
    def merge_matrices(total: Tensor) -> Tensor:
        factor, s = polar_and_values(total)
        return factor * s.mean(-1)[:, None, None]

    return _svd_merge(vectors, merge_matrices, exclude=exclude, device=device, budget=budget, summed=True,
                      progress=progress, title="Iso-C")


def iso_cts(vectors: Vectors, *, common: float = 0.8, exclude: Sequence[str] = (), device=None,
            budget: int | None = None, progress: bool = False) -> dict[str, Tensor]:
    """Iso-CTS (Marczak et al. 2025): per matrix, the top ``common`` fraction of the summed
    matrix's singular directions, plus each task's top directions orthogonal to them (an equal
    share each), re-orthogonalized, with isotropic (mean) singular values. Equal to
    FusionBench's ``ISO_CTS_Merge`` (``common_space_fraction=0.8``)."""
    if not 0 <= common <= 1:
        raise ValueError(f"common: expected a fraction in [0, 1], got {common!r}")
    n = len(vectors)

    def merge_matrices(x: Tensor) -> Tensor:
        k = min(x.shape[-2:])
        per_task = round((k - int(k * common)) / n)
        n_common = k - per_task * n
        if n_common < 0:  # FusionBench's indexing fails here too
            raise ValueError(f"common: {common!r} leaves each of {n} tasks round({k - int(k * common)} / {n}) = "
                             f"{per_task} directions of a matrix with {k}: more than it has; raise common")
        uc, sc, vc = top_svd(x.sum(0), n_common)
        parts_u, parts_s, parts_v = [], [], []
        if per_task:
            own = x - uc @ (uc.mT @ x)  # each task without the common subspace
            ut, st, vt = top_svd(own, per_task)
            layers = x.shape[1]
            parts_u.append(ut.permute(1, 2, 0, 3).reshape(layers, x.shape[2], n * per_task))
            parts_s.append(st.permute(1, 0, 2).reshape(layers, n * per_task))
            parts_v.append(vt.permute(1, 0, 2, 3).reshape(layers, n * per_task, x.shape[3]))
        u_all = torch.cat([*parts_u, uc], -1)
        s_all = torch.cat([*parts_s, sc], -1)
        v_all = torch.cat([*parts_v, vc], -2)
        return (polar(u_all) @ polar(v_all)) * s_all.mean(-1)[:, None, None]

    # each chunk has three chunk-sized companions here (the projected tasks and both SVD
    # factors), twice that in the float64 retry: quarter-vector chunks keep them under two vectors
    budget = max(1, vector_numel(vectors[0]) // 4) if budget is None else budget
    return _svd_merge(vectors, merge_matrices, exclude=exclude, device=device, budget=budget, progress=progress,
                      title="Iso-CTS")
