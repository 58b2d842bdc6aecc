"""``backend="auto"`` / ``"cuda"`` on CUDA: which implementation runs each shape group of
layers (the torch backend, the Triton kernels, or the CUDA extension with one of its Gram
variants), by
measurement, never by guess. Each ``(candidates, shape, count, dtypes, precision, squared)``
group is timed once (forward + backward on the caller's own tensors, CUDA events, median of 5
after 2 warm-ups) and the choice cached on disk per device and library versions
(``fastortho/ops/_measure.py``: the table, the timing and the agreement rule shared with the
dual linear's choice). A candidate that raises, or whose values or gradients disagree with the
first candidate's (beyond 2e-2 relative), is logged and never chosen.
"""
from __future__ import annotations

from .._measure import cache_file, fastest, load_table, median_ms, save_table


def _timed(candidate: str, fn, weights):
    """``(median ms, [values, *gradients])`` of ``candidate``'s forward + backward on fresh leaves."""
    leaves = [w.detach().clone().requires_grad_(True) for w in weights]

    def step():
        for leaf in leaves:
            leaf.grad = None
        values = fn(leaves)
        values.sum().backward()
        return values.detach()

    ms, values = median_ms(step)
    return ms, [values, *(leaf.grad for leaf in leaves)]


def choose(weights, bases, squared: bool, precision: str, run, candidates: tuple[str, ...]) -> list[str]:
    """The backend of each layer; ``run(candidate, weights, bases)`` computes the penalties.
    The first candidate is the reference the others must agree with, and the fallback."""
    path = cache_file(weights[0].device)
    table = load_table(path)
    groups: dict[str, list[int]] = {}
    for i, (w, b) in enumerate(zip(weights, bases)):
        groups.setdefault(f"{tuple(w.shape)}:{w.dtype}:{b.dtype}", []).append(i)
    assign = [""] * len(weights)
    changed = False
    for sig, idx in groups.items():
        key = f"{'|'.join(candidates)}:{sig}:x{len(idx)}:{precision}:{'sq' if squared else 'norm'}"
        if key not in table:
            ws, bs = [weights[i] for i in idx], [bases[i] for i in idx]
            fastest(key, candidates, lambda c, ws=ws, bs=bs: _timed(c, lambda leaves: run(c, leaves, bs), ws), table)
            changed = True
        for i in idx:
            assign[i] = table[key]
    if changed:
        save_table(path)
    return assign
