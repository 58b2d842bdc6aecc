"""Flat-buffer layouts shared by the kernels' launchers and the ops' fake (meta) kernels. Pure
Python with no triton import. (The OrthoReg scratch layout lives in ``orthoreg.py``, which
imports triton, so the Triton backend's fakes import triton too.)"""
from __future__ import annotations

import functools


def round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def layer_views(flat, shapes, offsets) -> list:
    """Per-layer ``rows x cols`` views into a flat buffer at the given element offsets."""
    return [flat[o:o + r * c].view(r, c) for (r, c), o in zip(shapes, offsets)]


@functools.lru_cache(maxsize=64)
def lora_grad_offsets(shapes: tuple[tuple[int, int, int], ...]) -> tuple[tuple[int, ...], tuple[int, ...], int]:
    """Offsets of each adapter's A and B gradient in the flat buffer (all ``A`` then all ``B``),
    and its length, for ``(out, in, r)`` shapes."""
    a_offs, b_offs, pos = [], [], 0
    for _out, inn, r in shapes:
        a_offs.append(pos)
        pos += r * inn
    for out, _inn, r in shapes:
        b_offs.append(pos)
        pos += out * r
    return tuple(a_offs), tuple(b_offs), pos


def lora_grad_views(flat, shapes) -> tuple[list, list]:
    """The per-adapter ``grad A`` (``r x in``) and ``grad B`` (``out x r``) views of the flat
    gradient buffer of :func:`lora_grad_offsets`."""
    a_offs, b_offs, _ = lora_grad_offsets(tuple(shapes))
    grads_a = layer_views(flat, [(r, i) for _, i, r in shapes], a_offs)
    grads_b = layer_views(flat, [(out, r) for out, _, r in shapes], b_offs)
    return grads_a, grads_b


def triangle_tiles(shapes, block: int):
    """The upper-triangle tiles ``ti <= tj`` of every layer's ``k x k`` Gram as an int32
    ``[T, 4]`` table ``(layer, ti, tj, slot)``, longest reductions first (so persistent programs
    finish together), and the int64 ``[L, max tiles per layer]`` gather of each layer's slots,
    padded with ``T`` (a zero slot the kernels write)."""
    import torch

    gram, slots = [], []
    for layer, (rows, cols) in enumerate(shapes):
        k, big = min(rows, cols), max(rows, cols)
        nt = -(-k // block)
        layer_slots = []
        for ti in range(nt):
            for tj in range(ti, nt):
                gram.append((big, layer, ti, tj))
                layer_slots.append(len(gram) - 1)
        slots.append(layer_slots)
    order = sorted(range(len(gram)), key=lambda t: -gram[t][0])
    new_slot = {old: new for new, old in enumerate(order)}
    tiles = torch.tensor([[gram[t][1], gram[t][2], gram[t][3], new_slot[t]] for t in order],
                         dtype=torch.int32).reshape(-1, 4)
    gather = torch.full((len(shapes), max(len(s) for s in slots)), len(gram), dtype=torch.int64)
    for layer, layer_slots in enumerate(slots):
        gather[layer, :len(layer_slots)] = torch.tensor([new_slot[s] for s in layer_slots])
    return tiles, gather
