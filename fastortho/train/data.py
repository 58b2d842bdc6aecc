"""Training batches: a pure function of ``(seed, step)`` (so a resumed run sees the batches an
uninterrupted one would), read in-process or by DataLoader workers."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate


def batch_indices(n: int, size: int, seed: int, step: int) -> torch.Tensor:
    """The sample indices of batch ``step``: drawn with replacement, fixed by ``(seed, step)``
    (so a resumed run sees the batches an uninterrupted one would)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (size,), generator=gen)


def sample_batch(data: Dataset, size: int, seed: int, step: int):
    """Batch ``step`` of ``data`` (see :func:`batch_indices`), read in this process."""
    idx = batch_indices(len(data), size, seed, step)
    if hasattr(data, "tensors"):
        return tuple(t[idx] for t in data.tensors)
    return default_collate([data[int(i)] for i in idx])


class SeededBatches(Sampler):
    """The index lists of batches ``start .. stop - 1`` (:func:`batch_indices`), as a
    DataLoader batch sampler: worker processes decode the images, the batches stay exactly
    those of :func:`sample_batch`."""

    def __init__(self, n: int, size: int, seed: int, start: int, stop: int):
        self.n, self.size, self.seed, self.start, self.stop = n, size, seed, start, stop

    def __iter__(self):
        for step in range(self.start, self.stop):
            yield batch_indices(self.n, self.size, self.seed, step).tolist()

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def batch_stream(data: Dataset, size: int, seed: int, start: int, stop: int | None = None, *, workers: int = 0,
                 pin_memory: bool = False):
    """Batches ``start, start + 1, ...`` (up to ``stop``, or endless) of ``data``. In-memory
    tensors are indexed directly; other datasets (image files) are read by ``workers``
    DataLoader processes when ``workers > 0``, prefetching while the GPU trains."""
    if workers < 0:
        raise ValueError(f"workers: expected a non-negative integer, got {workers!r}")
    if hasattr(data, "tensors") or workers == 0:
        step = start
        while stop is None or step < stop:
            batch = sample_batch(data, size, seed, step)
            # pinned, so that the host-to-GPU copy is asynchronous (pageable memory waits)
            yield tuple(t.pin_memory() for t in batch) if pin_memory else batch
            step += 1
        return
    chunk = 10_000  # an endless stream is a chain of finite samplers
    first = start
    while stop is None or first < stop:
        last = first + chunk if stop is None else min(stop, first + chunk)
        yield from DataLoader(data, batch_sampler=SeededBatches(len(data), size, seed, first, last),
                              num_workers=workers, pin_memory=pin_memory)
        first = last


class InputStream:
    """Endless batches of one task's inputs for the tau-Jp penalty (labels dropped). Batch
    ``k`` is a function of ``(seed, k)``; :meth:`seek` makes the next iteration start at
    batch ``k`` (how a resumed run continues each stream where it was)."""

    def __init__(self, data: Dataset, batch: int, seed: int, device, workers: int = 0):
        self.data, self.batch, self.seed, self.device, self.workers = data, batch, seed, device, workers
        self.start = 0

    def seek(self, position: int) -> None:
        if isinstance(position, bool) or not isinstance(position, int) or position < 0:
            raise ValueError(f"position: expected a non-negative batch index, got {position!r}")
        self.start = position

    def __iter__(self):
        return self._batches(self.start)  # the start is read now, not at the first batch

    def _batches(self, start: int):
        cuda = torch.device(self.device).type == "cuda"
        for batch in batch_stream(self.data, self.batch, self.seed, start, workers=self.workers, pin_memory=cuda):
            yield batch[0].to(self.device, non_blocking=True)
