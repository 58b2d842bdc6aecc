"""``fastortho-finetune``: fine-tune one task vector per task (resumes from checkpoints; DDP
under ``torchrun -m fastortho.cli finetune``)."""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from .._files import RunLock
from ..train import MODES, REGULARIZERS, finetune
from ._common import (
    benchmark_args,
    command,
    get_benchmark,
    init_distributed,
    parser,
    resolve_device,
    run_config,
    train_args,
)


def build_parser() -> argparse.ArgumentParser:
    p = parser("fastortho-finetune", "Fine-tune task vectors (one per task).")
    benchmark_args(p)
    p.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    p.add_argument("--mode", choices=MODES, default="nonlinear",
                   help="nonlinear (full fine-tuning), linear (TTA: the linearized model), attention "
                        "(attention projections only) or lora")
    p.add_argument("--reg", choices=REGULARIZERS, default="none",
                   help="the regularizer: none, orthoreg, taujp-strict (every other task each step) or "
                        "taujp-cyclical (one other task per step)")
    p.add_argument("--out", type=Path, required=True,
                   help="directory for the task vectors ({mode}-{reg}/{task}.safetensors) and checkpoints")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    train_args(p)
    return p


@command("fastortho-finetune")
def main(argv=None) -> None:
    p = build_parser()
    args = p.parse_args(argv)
    device, rank = resolve_device(args.device), init_distributed()
    if rank is not None and device.startswith("cuda"):
        import os

        import torch

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    cfg = run_config(args, args.mode, args.reg)
    run_dir = args.out / f"{args.mode}-{args.reg}"
    # rank 0 writes: it proves --out writable (before the model is even loaded) and holds the
    # run directory for the whole run
    with RunLock(run_dir, "--out") if not rank else contextlib.nullcontext():
        chosen = None if args.tasks == "all" else args.tasks.split(",")
        # tau-Jp reads every other task's data; otherwise only the chosen tasks' data is checked
        bench = get_benchmark(args, None if args.reg.startswith("taujp") else chosen)
        tasks = bench.tasks if chosen is None else chosen
        run_tasks(args, bench, tasks, cfg, run_dir, device, rank)
    if rank is not None:
        import torch.distributed as dist

        dist.destroy_process_group()


def run_tasks(args, bench, tasks, cfg, run_dir, device, rank) -> None:
    for task in tasks:
        res = finetune(bench, task, cfg, device=device, checkpoint_dir=run_dir / f"ckpt-{task}",
                       resume=not args.no_resume, progress=not args.no_progress and not rank, workers=args.workers)
        if not rank:
            res.task_vector.save(run_dir / f"{task}.safetensors")
            print(f"{task}: {res.steps} steps in {res.wall_time_s:.1f} s, final loss {res.final_loss:.4f} -> "
                  f"{run_dir / f'{task}.safetensors'}")
