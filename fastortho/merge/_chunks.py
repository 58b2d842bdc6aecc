"""Stacking task-vector entries for batched merging: one tensor per shape group, in chunks
that keep the stacked copy under a memory budget (docs/design.md section 9)."""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor


def vector_numel(vector: Mapping[str, Tensor]) -> int:
    return sum(v.numel() for v in vector.values())


def shape_chunks(keys: Sequence[str], vector: Mapping[str, Tensor], n_tasks: int, budget: int,
                 ) -> Iterator[list[str]]:
    """Runs of keys whose tensors share a shape, each small enough that all tasks' copies of
    it, stacked, hold at most ``budget`` elements (a single tensor larger than that is a chunk
    of its own). Within a run, keys keep their order; runs come in order of first appearance."""
    groups: dict[tuple[int, ...], list[str]] = {}
    for k in keys:
        groups.setdefault(tuple(vector[k].shape), []).append(k)
    for shape, group in groups.items():
        per_key = max(1, math.prod(shape)) * n_tasks
        step = max(1, budget // per_key)
        for i in range(0, len(group), step):
            yield group[i:i + step]


def stack(get: Callable[[int, str], Tensor], n_tasks: int, keys: Sequence[str], shape, device, dtype) -> Tensor:
    """``[n_tasks, len(keys), *shape]``: entry ``get(t, k)`` of every task ``t`` for each of
    ``keys``, in one allocation on ``device`` (each entry is produced, and copied, once)."""
    out = torch.empty((n_tasks, len(keys), *shape), device=device, dtype=dtype)
    for t in range(n_tasks):
        for i, k in enumerate(keys):
            out[t, i].copy_(get(t, k))
    return out


def stacked_sum(get: Callable[[int, str], Tensor], n_tasks: int, keys: Sequence[str], shape, device, dtype,
                ) -> Tensor:
    """``[len(keys), *shape]``: the sum over tasks of ``get(t, k)``, accumulated task by task
    (FusionBench's order) without stacking the tasks."""
    out = torch.empty((len(keys), *shape), device=device, dtype=dtype)
    for i, k in enumerate(keys):
        out[i].copy_(get(0, k))
    for t in range(1, n_tasks):
        for i, k in enumerate(keys):
            out[i].add_(get(t, k))
    return out


def unstack(merged: Tensor, keys: Sequence[str], out: dict[str, Tensor], like: Mapping[str, Tensor]) -> None:
    """Write ``merged[i]`` as entry ``keys[i]`` of ``out``, on the device and in the dtype of
    ``like[key]`` (the first task's vector)."""
    for i, k in enumerate(keys):
        out[k] = merged[i].to(device=like[k].device, dtype=like[k].dtype, copy=True)
