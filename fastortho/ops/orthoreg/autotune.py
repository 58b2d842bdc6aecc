"""``backend="auto"`` / ``"cuda"`` on CUDA: which implementation runs each shape group of
layers (the Triton kernels, or the CUDA extension with one of its Gram variants), by
measurement, never by guess. Each ``(candidates, shape, count, dtypes, precision, squared)``
group is timed once (forward + backward on the caller's own tensors, CUDA events, median of 5
after 2 warm-ups) and the choice cached on disk per device and library versions:
``$FASTORTHO_CACHE/backend-choice-<device>-<versions>.json`` (fastortho._config). A candidate that raises, or whose
values or gradients disagree with the first candidate's (beyond 2e-2 relative), is logged and
never chosen.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch

from ..._config import cache_dir
from ..._files import write_text

log = logging.getLogger("fastortho")

_memory: dict[str, dict[str, str]] = {}


def _cache_file(device: torch.device) -> Path:
    try:
        import triton
        tv = triton.__version__
    except ImportError:  # pragma: no cover
        tv = "none"
    name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device))
    return cache_dir() / f"backend-choice-{name}-torch{torch.__version__}-triton{tv}.json"


def _load(path: Path) -> dict[str, str]:
    key = str(path)
    if key not in _memory:
        try:
            table = json.loads(path.read_text())
        except (OSError, ValueError):
            table = {}
        if not isinstance(table, dict) or not all(isinstance(v, str) for v in table.values()):
            log.warning("fastortho: the backend-choice cache %s is not a table of choices; measuring again", path)
            table = {}
        _memory[key] = table
    return _memory[key]


def _time(fn, weights) -> tuple[float, torch.Tensor, list[torch.Tensor]]:
    """Median ms of forward + backward, and the values and gradients of the last run."""
    leaves = [w.detach().clone().requires_grad_(True) for w in weights]
    for _ in range(2):
        fn(leaves).sum().backward()
    times = []
    for _ in range(5):
        for leaf in leaves:
            leaf.grad = None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        values = fn(leaves)
        values.sum().backward()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[2], values.detach(), [leaf.grad for leaf in leaves]


def _agree(a, b, tol: float = 2e-2) -> bool:
    def close(x, y):
        return bool(torch.isfinite(x).all()) and float((x.float() - y.float()).norm()) <= tol * float(y.float().norm()) + 1e-6
    return close(a[1], b[1]) and all(close(x, y) for x, y in zip(a[2], b[2]))


def choose(weights, bases, squared: bool, precision: str, run, candidates: tuple[str, ...]) -> list[str]:
    """The backend of each layer; ``run(candidate, weights, bases)`` computes the penalties.
    The first candidate is the reference the others must agree with, and the fallback."""
    path = _cache_file(weights[0].device)
    table = _load(path)
    groups: dict[str, list[int]] = {}
    for i, (w, b) in enumerate(zip(weights, bases)):
        groups.setdefault(f"{tuple(w.shape)}:{w.dtype}:{b.dtype}", []).append(i)
    assign = [""] * len(weights)
    changed = False
    for sig, idx in groups.items():
        key = f"{'|'.join(candidates)}:{sig}:x{len(idx)}:{precision}:{'sq' if squared else 'norm'}"
        if key not in table:
            ws, bs = [weights[i] for i in idx], [bases[i] for i in idx]
            results = {}
            for c in candidates:
                try:
                    results[c] = _time(lambda leaves, c=c: run(c, leaves, bs), ws)
                except Exception as e:  # noqa: BLE001 - a failing candidate is simply not chosen
                    log.warning("fastortho: backend %r failed on %s (%s); not used", c, key, e)
            # A candidate must agree with the first before it can be chosen.
            ref = results.get(candidates[0])
            ok = {c: r for c, r in results.items() if ref is None or c == candidates[0] or _agree(r, ref)}
            for c in set(results) - set(ok):
                log.warning("fastortho: backend %r disagrees with %r on %s; not used", c, candidates[0], key)
            table[key] = min(ok, key=lambda c: ok[c][0]) if ok else candidates[0]
            changed = True
        for i in idx:
            assign[i] = table[key]
    if changed:
        write_text(path, json.dumps(table, indent=1, sort_keys=True), "backend-choice cache")
    return assign
