"""Accuracy of an encoder (or a linearized one) on a benchmark split, and the model task
vectors are applied to."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from ..linearize import linearize


def make_evaluator(benchmark, *, device="cpu", batch_size: int = 256, workers: int = 0):
    """``evaluate(encoder_or_linearized, split) -> accuracy`` with the split's frozen head;
    ``workers`` DataLoader processes read datasets of files (in-memory tensors are sliced)."""
    device = torch.device(device)

    @torch.no_grad()
    def evaluate(encoder, split: str) -> float:
        head = benchmark.head(split).to(device)
        data = benchmark.eval_data(split)
        encoder = encoder.to(device).eval()
        correct = total = 0
        if hasattr(data, "tensors"):
            batches = ((t[i:i + batch_size] for t in data.tensors) for i in range(0, len(data), batch_size))
        else:
            batches = iter(DataLoader(data, batch_size=batch_size, num_workers=workers,
                                      pin_memory=device.type == "cuda"))
        for batch in batches:
            x, y = list(batch)[:2]
            logits = head(encoder(x.to(device, non_blocking=True)))
            correct += int((logits.argmax(-1).cpu() == y).sum())
            total += len(y)
        return correct / max(total, 1)
    return evaluate


def pretrained_for(benchmark, mode: str, device="cpu"):
    """The model task vectors of ``mode`` are applied to: the encoder, or its linearization
    for ``mode="linear"`` (a TTA task vector is evaluated on the linearized model)."""
    encoder = benchmark.encoder().to(device)
    return linearize(encoder) if mode == "linear" else encoder
