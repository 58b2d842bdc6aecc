"""The learning-rate schedule of the papers: linear warm-up, then cosine decay."""
from __future__ import annotations

import math


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor: linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
