"""Fine-tuning one task of a benchmark in any mode with any regularizer, as the papers do
(OrthoReg Sec. 5 / App. I; tau-Jp App. C): AdamW, cosine schedule with linear warm-up,
gradient accumulation, bf16 autocast, a frozen classification head, checkpoints and resume.

A benchmark is any object with ``tasks``, ``control``, ``encoder()`` (a fresh pretrained
image encoder), ``head(task)`` (frozen), ``train_data(task)`` and ``eval_data(split)``
(``split`` = a task name for its test split, ``f"{task}Val"`` for its validation split):
:class:`fastortho.offline.OfflineBenchmark` and :class:`fastortho.clip.ClipBenchmark`.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .clip import ImageClassifier
from .linearize import LinearizedModel, linearize
from .lora import add_lora, attention_only
from .orthoreg import OrthoReg
from .snapshot import snapshot
from .task_vectors import TaskVector
from .taujp import TauJpRegularizer

MODES = ("nonlinear", "linear", "attention", "lora")
REGULARIZERS = ("none", "orthoreg", "taujp-strict", "taujp-cyclical")


@dataclass
class FinetuneConfig:
    """The paper defaults: 2,000 steps, batch 128, lr 1e-5, weight decay 0.1, 200 warm-up steps."""
    mode: str = "nonlinear"
    reg: str = "none"
    lam: float = 0.1
    steps: int = 2000
    batch_size: int = 128
    lr: float = 1e-5
    weight_decay: float = 0.1
    warmup: int = 200
    accumulation: int = 1
    autocast: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "none"
    lora_targets: str = "qkvo"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    taujp_batch: int = 16  # images per other task per step
    seed: int = 0
    checkpoint_every: int = 0  # steps; 0 = only at the end

    def check(self) -> "FinetuneConfig":
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")
        if self.reg not in REGULARIZERS:
            raise ValueError(f"reg: expected one of {REGULARIZERS}, got {self.reg!r}")
        for name in ("steps", "batch_size", "accumulation", "lora_rank", "taujp_batch"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        if self.warmup < 0 or self.lr <= 0:
            raise ValueError("warmup must be >= 0 and lr > 0")
        if self.autocast not in ("auto", "bf16", "none"):
            raise ValueError(f"autocast: expected 'auto', 'bf16' or 'none', got {self.autocast!r}")
        return self


@dataclass
class FinetuneResult:
    task_vector: TaskVector
    steps: int
    wall_time_s: float
    memory_bytes: int
    memory_measure: str
    final_loss: float


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """The learning-rate factor: linear warm-up to 1, then cosine decay to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


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
            yield sample_batch(data, size, seed, step)
            step += 1
        return
    chunk = 10_000  # an endless stream is a chain of finite samplers
    first = start
    while stop is None or first < stop:
        last = first + chunk if stop is None else min(stop, first + chunk)
        yield from DataLoader(data, batch_sampler=SeededBatches(len(data), size, seed, first, last),
                              num_workers=workers, pin_memory=pin_memory)
        first = last


def prepare(encoder: nn.Module, cfg: FinetuneConfig) -> tuple[nn.Module, nn.Module]:
    """``(trained module, the module whose parameters the optimizer sees)`` for a mode."""
    if cfg.mode == "attention":
        attention_only(encoder)
    elif cfg.mode == "lora":
        add_lora(encoder, cfg.lora_targets, rank=cfg.lora_rank, alpha=cfg.lora_alpha)
    else:
        encoder.requires_grad_(True)
    if cfg.mode == "linear":
        lin = linearize(encoder)
        return lin, lin
    return encoder, encoder


def _autocast(cfg: FinetuneConfig, device: torch.device):
    enabled = cfg.autocast == "bf16" or (cfg.autocast == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def _save_checkpoint(path: Path, net: nn.Module, opt, sched, step: int, cfg: FinetuneConfig) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in net.state_dict().items()}
    save_file(state, str(path / "model.safetensors.tmp"), metadata={"step": str(step)})
    torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "step": step},
               path / "train_state.pt.tmp")
    (path / "model.safetensors.tmp").replace(path / "model.safetensors")
    (path / "train_state.pt.tmp").replace(path / "train_state.pt")
    (path / "config.json").write_text(json.dumps(asdict(cfg), indent=1))


def _load_checkpoint(path: Path, net, opt, sched, cfg: FinetuneConfig) -> int:
    from safetensors.torch import load_file

    saved = json.loads((path / "config.json").read_text())
    if saved != asdict(cfg):
        diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v}
        raise ValueError(f"resume: the checkpoint in {path} was made with another configuration: {diff}")
    device = next(iter(net.parameters())).device
    net.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    state = torch.load(path / "train_state.pt", map_location=device, weights_only=True)
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    return int(state["step"])


def finetune(benchmark, task: str, cfg: FinetuneConfig, *, device="cpu", checkpoint_dir=None, resume: bool = True,
             progress: bool = True, workers: int = 0) -> FinetuneResult:
    """Fine-tune ``benchmark``'s encoder on ``task``; returns its task vector and run costs.

    With ``checkpoint_dir``, the trainable state, optimizer and schedule are saved every
    ``cfg.checkpoint_every`` steps and at the end; a later call with ``resume=True`` picks up
    from the last checkpoint (the batches are a function of ``(seed, step)``, so a resumed run
    sees the same data as an uninterrupted one).

    ``workers``: DataLoader processes that read the task's images (datasets of files; the
    in-memory offline tasks ignore it); each tau-Jp stream of another task gets up to two.
    The batches do not depend on it.
    """
    cfg.check()
    if task not in benchmark.tasks:
        raise ValueError(f"task: expected one of {benchmark.tasks}, got {task!r}")
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    encoder = benchmark.encoder().to(device)
    pretrained_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    base = snapshot(encoder)  # before any adapter changes names
    net, trained = prepare(encoder, cfg)
    head = benchmark.head(task).to(device)
    # Under torchrun (an initialized process group): DistributedDataParallel, each rank its
    # own batches (the effective batch is world x batch_size), rank 0 writes the files.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    if distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    model = ImageClassifier(net, head).train()
    data_seed = cfg.seed + 7919 * rank

    orthoreg = None
    plain = trained  # the module itself, not its DDP wrapper
    if cfg.reg == "orthoreg":
        inner = plain.model if isinstance(plain, LinearizedModel) else plain
        orthoreg = OrthoReg(inner, None if cfg.mode == "lora" else base, lam=cfg.lam)
    taujp = None
    if cfg.reg.startswith("taujp"):
        one_pass = isinstance(plain, LinearizedModel)  # the task batch rides in the same dual pass
        lin = net if one_pass else linearize(encoder)  # (net: the DDP wrapper when distributed)
        others = [t for t in benchmark.tasks if t != task]
        sources = [_InputStream(benchmark.train_data(t), cfg.taujp_batch, data_seed + 17 * i, device,
                                min(2, workers)) for i, t in enumerate(others)]
        taujp = TauJpRegularizer(lin, sources, mode=cfg.reg.split("-")[1], lam=cfg.lam)

    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, cfg.warmup, cfg.steps))
    start = 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    if ckpt is not None and resume and (ckpt / "train_state.pt").exists():
        start = _load_checkpoint(ckpt, trained, opt, sched, cfg)

    batches = batch_stream(benchmark.train_data(task), cfg.batch_size, data_seed, start * cfg.accumulation,
                           cfg.steps * cfg.accumulation, workers=workers, pin_memory=device.type == "cuda")
    memory, measure = _memory_probe(device)
    t0 = time.perf_counter()
    loss_value = float("nan")
    steps = range(start, cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{task} [{cfg.mode}, {cfg.reg}]", initial=start, total=cfg.steps)
    for step in steps:
        opt.zero_grad(set_to_none=True)
        for micro in range(cfg.accumulation):
            x, y = next(batches)[:2]  # batch step * accumulation + micro
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with _autocast(cfg, device):
                if taujp is not None and one_pass:
                    features, penalty = taujp(x)
                    logits = head(features)
                else:
                    logits = model(x)
                    penalty = taujp() if taujp is not None else 0.0
                loss = F.cross_entropy(logits.float(), y)
                if orthoreg is not None:
                    loss = loss + orthoreg()
                loss = (loss + penalty) / cfg.accumulation
            loss.backward()
            loss_value = float(loss.detach()) * cfg.accumulation
        if memory is None and step == start:
            memory = _activation_bytes(model, head, x, y, cfg, device)
        opt.step()
        sched.step()
        if ckpt is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            _checkpoint(ckpt, trained, opt, sched, step + 1, cfg, rank, distributed)
    wall = time.perf_counter() - t0
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device)
    if ckpt is not None:
        _checkpoint(ckpt, trained, opt, sched, cfg.steps, cfg, rank, distributed)
    meta = {"task": task, "mode": cfg.mode, "regularizer": cfg.reg, "lambda": cfg.lam, "steps": cfg.steps,
            "benchmark": getattr(benchmark, "name", "?")}
    if cfg.mode == "linear":
        tv = TaskVector.from_linearized(plain, meta)
    elif cfg.mode == "lora":
        tv = TaskVector.from_lora(encoder, meta)
    else:
        tv = TaskVector.from_models(pretrained_state, encoder, meta)
    return FinetuneResult(tv, cfg.steps - start, wall, int(memory or 0), measure, loss_value)


def _checkpoint(path, trained, opt, sched, step, cfg, rank, distributed) -> None:
    if rank == 0:
        _save_checkpoint(path, trained, opt, sched, step, cfg)
    if distributed:
        torch.distributed.barrier()


class _InputStream:
    """Endless batches of one task's inputs for the tau-Jp penalty (labels dropped)."""

    def __init__(self, data: Dataset, batch: int, seed: int, device, workers: int = 0):
        self.data, self.batch, self.seed, self.device, self.workers = data, batch, seed, device, workers

    def __iter__(self):
        for batch in batch_stream(self.data, self.batch, self.seed, 0, workers=self.workers):
            yield batch[0].to(self.device)


def _memory_probe(device: torch.device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return 0, "peak CUDA memory allocated"
    return None, "activation bytes saved for backward (CPU proxy)"


def _activation_bytes(model, head, x, y, cfg, device) -> int:
    from .testing import saved_activation_bytes

    statics = list(model.parameters()) + list(model.buffers())
    encoder = model.encoder.module if isinstance(model.encoder, nn.parallel.DistributedDataParallel) else model.encoder

    def loss():
        with _autocast(cfg, device):
            return F.cross_entropy(head(encoder(x)).float(), y)
    return saved_activation_bytes(loss, statics)


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
