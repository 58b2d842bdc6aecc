"""The fine-tuning loop of one task in any mode with any regularizer, as the papers do
(OrthoReg Sec. 5 / App. I; tau-Jp App. C): AdamW, cosine schedule with linear warm-up,
gradient accumulation, bf16 autocast, a frozen classification head, checkpoints and resume,
DDP under torchrun.

A benchmark is any object with ``tasks``, ``control``, ``encoder()`` (a fresh pretrained
image encoder), ``head(task)`` (frozen), ``train_data(task)`` and ``eval_data(split)``
(``split`` = a task name for its test split, ``f"{task}Val"`` for its validation split):
:class:`fastortho.offline.OfflineBenchmark` and :class:`fastortho.clip.ClipBenchmark`.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._files import RunLock, fingerprint
from ..clip import ImageClassifier
from ..linearize import LinearizedModel, linearize
from ..lora import add_lora, attention_only
from ..orthoreg import OrthoReg
from ..snapshot import snapshot
from ..task_vectors import TaskVector
from ..taujp import TauJpRegularizer
from . import checkpoint as checkpoints
from .config import FinetuneConfig, FinetuneResult
from .data import InputStream, batch_stream
from .memory import activation_bytes, autocast, memory_probe
from .schedule import cosine_with_warmup


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


def finetune(benchmark, task: str, cfg: FinetuneConfig, *, device="cpu", checkpoint_dir=None, resume: bool = True,
             progress: bool = True, workers: int = 0) -> FinetuneResult:
    """Fine-tune ``benchmark``'s encoder on ``task``; returns its task vector and run costs.

    With ``checkpoint_dir``, the trainable state, optimizer and schedule are saved every
    ``cfg.checkpoint_every`` steps and at the end; a later call with ``resume=True`` picks up
    from the last complete checkpoint (the batches, the tau-Jp streams included, are a function
    of ``(seed, step)``, so a resumed run sees the same data as an uninterrupted one). A
    checkpoint made with another configuration or from other base weights is refused;
    ``resume=False`` discards the folder's checkpoints and starts over. The folder is locked
    for the run: a second run on it raises :class:`fastortho.RunLockedError`.

    ``workers``: DataLoader processes that read the task's images (datasets of files; the
    in-memory offline tasks ignore it); each tau-Jp stream of another task gets up to two.
    The batches do not depend on it.
    """
    cfg.check()
    if task not in benchmark.tasks:
        raise ValueError(f"task: expected one of {benchmark.tasks}, got {task!r}")
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank = torch.distributed.get_rank() if distributed else 0
    ckpt = Path(checkpoint_dir) if checkpoint_dir else None
    # Rank 0 writes the checkpoints: it locks the folder (a second run on it refuses, naming
    # this one) after proving it writable, before any step whose work a failed save would lose.
    lock = RunLock(ckpt, "checkpoint_dir") if ckpt is not None and rank == 0 else contextlib.nullcontext()
    with lock:
        if ckpt is not None and rank == 0:
            # what killed writers left goes first; starting over drops every checkpoint
            if resume:
                checkpoints.tidy(ckpt)
            else:
                checkpoints.clear(ckpt)
        if distributed:
            torch.distributed.barrier()
        return _finetune(benchmark, task, cfg, torch.device(device), ckpt, resume, progress, workers, distributed, rank)


def _base_identity(benchmark, pretrained_state) -> dict:
    """What fine-tuning starts from, recorded in each checkpoint and checked on resume."""
    source = getattr(benchmark, "weights", None) or getattr(benchmark, "name", type(benchmark).__name__)
    return {"sha256": fingerprint(pretrained_state), "source": str(source)}


def _finetune(benchmark, task, cfg, device, ckpt, resume, progress, workers, distributed, rank) -> FinetuneResult:
    torch.manual_seed(cfg.seed)
    encoder = benchmark.encoder().to(device)
    pretrained_state = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    base = snapshot(encoder)  # before any adapter changes names
    net, trained = prepare(encoder, cfg)
    head = benchmark.head(task).to(device)
    # Under torchrun (an initialized process group): DistributedDataParallel, each rank its
    # own batches (the effective batch is world x batch_size), rank 0 writes the files.
    if distributed:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    model = ImageClassifier(net, head).train()
    data_seed = cfg.seed + 7919 * rank

    orthoreg = None
    plain = trained  # the module itself, not its DDP wrapper
    if cfg.reg == "orthoreg":
        inner = plain.model if isinstance(plain, LinearizedModel) else plain
        # precision None: bf16 under the bf16 autocast of the step, unless --ortho-precision says
        orthoreg = OrthoReg(inner, None if cfg.mode == "lora" else base, lam=cfg.lam,
                            precision=None if cfg.ortho_precision == "auto" else cfg.ortho_precision)
    taujp = None
    if cfg.reg.startswith("taujp"):
        one_pass = isinstance(plain, LinearizedModel)  # the task batch rides in the same dual pass
        lin = net if one_pass else linearize(encoder)  # (net: the DDP wrapper when distributed)
        others = [t for t in benchmark.tasks if t != task]
        sources = [InputStream(benchmark.train_data(t), cfg.taujp_batch, data_seed + 17 * i, device,
                                min(2, workers)) for i, t in enumerate(others)]
        # "released" (default): the released code's penalty, per task the mean per-sample L2 norm
        # and in strict mode their mean over the tasks; "paper": Eq. 10's sums of squares
        released = cfg.taujp_form == "released"
        taujp = TauJpRegularizer(lin, sources, mode=cfg.reg.split("-")[1], lam=cfg.lam,
                                 reduction="mean_norm" if released else "sum_sq",
                                 task_reduction="mean" if released else "sum", accumulation=cfg.accumulation)

    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, cfg.warmup, cfg.steps))
    start = 0
    base_id = _base_identity(benchmark, pretrained_state) if ckpt is not None else None
    if ckpt is not None and resume:
        start, extra = checkpoints.load_checkpoint(ckpt, trained, opt, sched, cfg, base=base_id)
        if taujp is not None and "taujp" in extra:
            taujp.load_state_dict(extra["taujp"])

    saved = [start if resume else -1]  # the step this process's state already is on disk at

    def save(step: int) -> None:
        if step == saved[0]:  # the final save right after a periodic one: nothing new
            return
        checkpoints.checkpoint(ckpt, trained, opt, sched, step, cfg, rank, distributed, base=base_id,
                               extra={"taujp": taujp.state_dict()} if taujp is not None else {})
        saved[0] = step

    batches = batch_stream(benchmark.train_data(task), cfg.batch_size, data_seed, start * cfg.accumulation,
                           cfg.steps * cfg.accumulation, workers=workers, pin_memory=device.type == "cuda")
    memory, measure = memory_probe(device)
    t0 = time.perf_counter()
    last_loss = None  # a device tensor: read once, after the last step (no sync per step)
    steps = range(start, cfg.steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{task} [{cfg.mode}, {cfg.reg}]", initial=start, total=cfg.steps)
    for step in steps:
        opt.zero_grad(set_to_none=True)
        for _micro in range(cfg.accumulation):
            x, y = next(batches)[:2]  # batch step * accumulation + _micro
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(cfg, device):
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
            last_loss = loss.detach()
        if memory is None and step == start:
            memory = activation_bytes(model, head, x, y, cfg, device)
        opt.step()
        sched.step()
        if ckpt is not None and cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0:
            save(step + 1)
    wall = time.perf_counter() - t0
    if device.type == "cuda":
        memory = torch.cuda.max_memory_allocated(device)
    if ckpt is not None:
        save(cfg.steps)
    meta = {"task": task, "mode": cfg.mode, "regularizer": cfg.reg, "lambda": cfg.lam, "steps": cfg.steps,
            "benchmark": getattr(benchmark, "name", "?")}
    if getattr(benchmark, "model_name", None):
        meta["model"] = benchmark.model_name
    if cfg.mode == "linear":
        tv = TaskVector.from_linearized(plain, meta)
    elif cfg.mode == "lora":
        tv = TaskVector.from_lora(encoder, meta)
    else:
        tv = TaskVector.from_models(pretrained_state, encoder, meta)
    final_loss = float(last_loss) * cfg.accumulation if last_loss is not None else float("nan")
    finite = torch.stack([torch.isfinite(v).all() for v in tv.values()]).tolist()  # one sync, after the run
    diverged = [k for k, ok in zip(tv, finite) if not ok]
    if diverged:
        raise FloatingPointError(f"fine-tuning {task} diverged: the task vector has NaN or infinite entries (in "
                                 f"{len(diverged)} tensor(s), e.g. {diverged[0]}; final loss {final_loss}); lower "
                                 f"--lr or lambda, or check the data")
    return FinetuneResult(tv, cfg.steps - start, wall, int(memory or 0), measure, final_loss)
