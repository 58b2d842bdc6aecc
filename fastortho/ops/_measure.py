"""Choices made by measurement, once per key, cached on disk per device and library versions
(``$FASTORTHO_CACHE/backend-choice-<device>-<versions>.json``): the OrthoReg backend of each
shape group (``orthoreg/autotune.py``) and the dual linear's implementation per shape
(``dual/__init__.py``). A candidate is timed on the caller's own tensors with CUDA events
(median of 5 after 2 warm-ups); one that raises, or disagrees with the first (the reference
and fallback) beyond 2e-2 relative, is logged and never chosen.

Measuring synchronizes the device, so it runs once per key and process (never during CUDA
graph capture or compilation: callers fall back to their default there).
"""
from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .._config import cache_dir
from .._files import write_text

log = logging.getLogger("fastortho")

_memory: dict[str, dict[str, str]] = {}


def cache_file(device: torch.device) -> Path:
    try:
        import triton
        tv = triton.__version__
    except ImportError:  # pragma: no cover
        tv = "none"
    name = re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(device))
    return cache_dir() / f"backend-choice-{name}-torch{torch.__version__}-triton{tv}.json"


def load_table(path: Path) -> dict[str, str]:
    """The cached choices in ``path`` (read once per process); a file that is not a table of
    strings is measured again, with a warning."""
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


def save_table(path: Path) -> None:
    write_text(path, json.dumps(load_table(path), indent=1, sort_keys=True), "backend-choice cache")


def median_ms(run: Callable[[], object], warmup: int = 2, reps: int = 5) -> tuple[float, object]:
    """Median CUDA-event time of ``run()`` in ms, and the result of its last call."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2], out


def close(x: torch.Tensor, y: torch.Tensor, tol: float = 2e-2) -> bool:
    """``x`` finite and within ``tol`` of ``y`` in relative Frobenius norm."""
    return (
        bool(torch.isfinite(x).all()) and float((x.float() - y.float()).norm()) <= tol * float(y.float().norm()) + 1e-6
    )


def fastest(key: str, candidates: Sequence[str], timed: Callable[[str], tuple[float, Sequence[torch.Tensor]]],
            table: dict[str, str]) -> str:
    """The fastest candidate whose outputs agree with the first's; ``timed(c)`` returns
    ``(ms, outputs)``. Records the choice in ``table`` under ``key``."""
    results = {}
    for c in candidates:
        try:
            results[c] = timed(c)
        except Exception as e:  # noqa: BLE001 - a failing candidate is simply not chosen
            log.warning("fastortho: %r failed on %s (%s); not used", c, key, e)
    ref = results.get(candidates[0])
    ok = {}
    for c, (ms, outs) in results.items():
        if ref is None or c == candidates[0] or all(close(a, b) for a, b in zip(outs, ref[1])):
            ok[c] = ms
        else:
            log.warning("fastortho: %r disagrees with %r on %s; not used", c, candidates[0], key)
    table[key] = min(ok, key=ok.__getitem__) if ok else candidates[0]
    return table[key]
