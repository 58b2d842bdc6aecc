"""``fastortho-finetune``: fine-tune one task vector per task (resumes from checkpoints; DDP
under ``torchrun -m fastortho.cli finetune``)."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..train import MODES, REGULARIZERS, finetune
from ._common import benchmark_args, get_benchmark, init_distributed, resolve_device, run_config, train_args


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="fastortho-finetune", description="Fine-tune task vectors (one per task).")
    benchmark_args(p)
    p.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    p.add_argument("--mode", choices=MODES, default="nonlinear")
    p.add_argument("--reg", choices=REGULARIZERS, default="none")
    p.add_argument("--out", type=Path, required=True, help="directory for task vectors and checkpoints")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    train_args(p)
    args = p.parse_args(argv)
    device, rank = resolve_device(args.device), init_distributed()
    if rank is not None and device.startswith("cuda"):
        import os

        import torch

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    bench = get_benchmark(args)
    tasks = bench.tasks if args.tasks == "all" else args.tasks.split(",")
    cfg = run_config(args, args.mode, args.reg)
    run_dir = args.out / f"{args.mode}-{args.reg}"
    for task in tasks:
        res = finetune(bench, task, cfg, device=device, checkpoint_dir=run_dir / f"ckpt-{task}",
                       resume=not args.no_resume, progress=not args.no_progress and not rank, workers=args.workers)
        if not rank:
            res.task_vector.save(run_dir / f"{task}.safetensors")
            print(f"{task}: {res.steps} steps in {res.wall_time_s:.1f} s, final loss {res.final_loss:.4f} -> "
                  f"{run_dir / f'{task}.safetensors'}")
    if rank is not None:
        import torch.distributed as dist

        dist.destroy_process_group()
