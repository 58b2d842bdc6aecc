"""Console entry points: ``fastortho-finetune``, ``fastortho-eval``, ``fastortho-ablate``.

    fastortho-ablate --demo                        # the offline benchmark, end to end, CPU
    fastortho-finetune --benchmark clip8 --model ViT-B-32 --weights ViT-B-32.pt --data-root ~/data \\
        --mode linear --reg taujp-cyclical --out runs/
    fastortho-eval --benchmark clip8 ... --vectors runs/linear-taujp-cyclical --out results/
    torchrun --nproc_per_node 8 -m fastortho.cli finetune ...      # DDP: every option as above
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from .finetune import MODES, REGULARIZERS, FinetuneConfig, finetune, make_evaluator, pretrained_for
from .task_vectors import TaskVector, cosine_matrix, task_addition, task_negation

DEMO = dict(steps=50, batch_size=32, lr=1e-3, weight_decay=0.01, warmup=5, lam=0.1, lora_rank=8, lora_alpha=16.0,
            taujp_batch=8)
METHOD_NAMES = {"nonlinear": "Non-lin. FT", "linear": "TTA (linear FT)", "attention": "ATT-FT", "lora": "LoRA"}


# ----------------------------------------------------------------------------- shared options

def _benchmark_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", choices=["offline", "clip8"], default="offline",
                   help="offline: built-in, no download; clip8: the 8 CLIP tasks from --data-root")
    g.add_argument("--model", default="ViT-B-32", help="open_clip model name (clip8)")
    g.add_argument("--weights", help="local file of the pretrained open_clip weights (clip8; never downloaded)")
    g.add_argument("--data-root", help="root of the datasets in the task-vectors layout (clip8)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--workers", type=int, default=4,
                   help="DataLoader processes reading image files (0: the main process; in-memory data ignores it)")


def _train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (paper defaults)")
    d = FinetuneConfig()
    g.add_argument("--lam", type=float, default=d.lam, help="regularizer weight lambda")
    g.add_argument("--steps", type=int, default=d.steps)
    g.add_argument("--batch-size", type=int, default=d.batch_size)
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup", type=int, default=d.warmup)
    g.add_argument("--accumulation", type=int, default=d.accumulation, help="gradient accumulation steps")
    g.add_argument("--autocast", choices=["auto", "bf16", "none"], default=d.autocast)
    g.add_argument("--lora-targets", default=d.lora_targets, help="letters of qkvofp (OrthoReg Table 6)")
    g.add_argument("--lora-rank", type=int, default=d.lora_rank)
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha)
    g.add_argument("--taujp-batch", type=int, default=d.taujp_batch, help="images per other task per step")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)


def _config(args, mode: str, reg: str) -> FinetuneConfig:
    names = {f.name for f in fields(FinetuneConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values.update(mode=mode, reg=reg)
    return FinetuneConfig(**values).check()


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def get_benchmark(args):
    progress = not args.no_progress
    if args.benchmark == "offline":
        from .offline import OfflineBenchmark

        return OfflineBenchmark(progress=progress)
    from .clip import ClipBenchmark

    return ClipBenchmark(args.model, args.weights, args.data_root, device=_device(args.device))


# ----------------------------------------------------------------------------- finetune

def finetune_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="fastortho-finetune", description="Fine-tune task vectors (one per task).")
    _benchmark_args(p)
    p.add_argument("--tasks", default="all", help="comma-separated task names, or all")
    p.add_argument("--mode", choices=MODES, default="nonlinear")
    p.add_argument("--reg", choices=REGULARIZERS, default="none")
    p.add_argument("--out", type=Path, required=True, help="directory for task vectors and checkpoints")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints")
    _train_args(p)
    args = p.parse_args(argv)
    device, rank = _device(args.device), _init_distributed()
    if rank is not None and device.startswith("cuda"):
        import os

        import torch

        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    bench = get_benchmark(args)
    tasks = bench.tasks if args.tasks == "all" else args.tasks.split(",")
    cfg = _config(args, args.mode, args.reg)
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


def _init_distributed():
    """Under torchrun (WORLD_SIZE > 1): join the process group (NCCL on CUDA, gloo on CPU) and
    return this rank; otherwise None."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank()


# ----------------------------------------------------------------------------- eval

def evaluate_vectors(bench, vectors: dict[str, TaskVector], mode: str, *, device: str, out: Path | None,
                     progress: bool, negation: bool = True, workers: int = 0) -> dict:
    """Zero-shot, single-task, task addition (and negation against the control task)."""
    evaluate = make_evaluator(bench, device=device, workers=workers)
    pretrained = pretrained_for(bench, mode, device)
    tasks = list(vectors)
    results: dict = {"mode": mode, "zero_shot": {t: evaluate(pretrained, t) for t in tasks}}
    single = {}
    for t in tasks:
        model = vectors[t].apply_to(pretrained)
        single[t] = evaluate(model, t)
        single[f"{t}Val"] = evaluate(model, f"{t}Val")
    results["single_task"] = {t: single[t] for t in tasks}
    addition = task_addition(pretrained, vectors, evaluate, finetuned_accuracy=single, progress=progress)
    results["addition"] = {"alpha": addition.alpha, **addition.test, "search": addition.search}
    if negation and getattr(bench, "control", None):
        neg = {}
        for t in tasks:
            r = task_negation(pretrained, vectors[t], evaluate, t, bench.control, progress=progress)
            neg[t] = {str(k): v for k, v in r.choices.items()}
        results["negation"] = neg
        results["zero_shot_control"] = evaluate(pretrained, bench.control)
    if out is not None:
        from . import analysis

        out.mkdir(parents=True, exist_ok=True)
        analysis.plot_cosine_matrix(vectors, out / "cosine.png")
        analysis.plot_accuracy_radar({"zero-shot": results["zero_shot"], "single-task": results["single_task"],
                                      "merged": {t: addition.test[f"{t}:top1"] for t in tasks}},
                                     out / "radar.png", title=f"task addition ({mode})")
        analysis.plot_alpha_sensitivity({mode: addition.search}, out / "alpha_sensitivity.png")
        (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def eval_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="fastortho-eval", description="Single-task, task addition and negation.")
    _benchmark_args(p)
    p.add_argument("--vectors", type=Path, required=True, help="directory of {task}.safetensors task vectors")
    p.add_argument("--out", type=Path, required=True, help="directory for results.json and the plots")
    p.add_argument("--no-negation", action="store_true")
    args = p.parse_args(argv)
    bench = get_benchmark(args)
    files = {t: args.vectors / f"{t}.safetensors" for t in bench.tasks}
    missing = [str(f) for f in files.values() if not f.exists()]
    if missing:
        raise SystemExit(f"--vectors: missing task vectors {missing} (run fastortho-finetune --out first)")
    vectors = {t: TaskVector.load(f) for t, f in files.items()}
    mode = next(iter(vectors.values())).metadata.get("mode", "nonlinear")
    res = evaluate_vectors(bench, vectors, mode, device=_device(args.device), out=args.out,
                           progress=not args.no_progress, negation=not args.no_negation)
    print(json.dumps({k: v for k, v in res["addition"].items() if k != "search"}, indent=1))
    print(f"results and plots in {args.out}/")


# ----------------------------------------------------------------------------- ablate

def _run(bench, mode: str, reg: str, args, device: str, run_dir: Path) -> dict:
    cfg = _config(args, mode, reg)
    vectors, wall, memory, measure = {}, 0.0, 0, ""
    for task in bench.tasks:
        res = finetune(bench, task, cfg, device=device, checkpoint_dir=run_dir / f"ckpt-{task}",
                       progress=not args.no_progress, workers=args.workers)
        res.task_vector.save(run_dir / f"{task}.safetensors")
        vectors[task] = res.task_vector
        wall += res.wall_time_s
        memory, measure = max(memory, res.memory_bytes), res.memory_measure
    res = evaluate_vectors(bench, vectors, mode, device=device, out=run_dir, progress=False, negation=False,
                           workers=args.workers)
    add = res["addition"]
    return {"mode": mode, "reg": reg, "abs": add["avg_top1"], "norm": add["avg_normalized_top1"], "alpha": add["alpha"],
            "single_task": float(np.mean(list(res["single_task"].values()))),
            "zero_shot": float(np.mean(list(res["zero_shot"].values()))),
            "finetune_s": wall, "memory_mb": memory / 1e6, "memory_measure": measure,
            "cosine_offdiag": float(np.mean(np.abs(cosine_matrix(vectors)[~np.eye(len(vectors), dtype=bool)])))}


def write_table(rows: list[dict], out: Path) -> str:
    """Markdown and CSV in the shape of the OrthoReg paper's Table 1: per method, absolute and
    normalized accuracy of task addition without and with each regularizer, and the delta."""
    base = {r["mode"]: r for r in rows if r["reg"] == "none"}
    lines = ["| method | regularizer | abs. acc | norm. acc | delta abs | delta norm | alpha | mean abs cos | "
             "fine-tune time (s) | memory (MB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    if rows:
        lines.append(f"| zero-shot | - | {100 * rows[0]['zero_shot']:.1f} | - | - | - | - | - | - | - |")
    for r in rows:
        b = base.get(r["mode"])
        da = f"{100 * (r['abs'] - b['abs']):+.1f}" if b and r["reg"] != "none" else "-"
        dn = f"{100 * (r['norm'] - b['norm']):+.1f}" if b and r["reg"] != "none" else "-"
        lines.append(f"| {METHOD_NAMES[r['mode']]} | {r['reg']} | {100 * r['abs']:.1f} | {100 * r['norm']:.1f} | {da} | "
                     f"{dn} | {r['alpha']:.2f} | {r['cosine_offdiag']:.3f} | {r['finetune_s']:.1f} | "
                     f"{r['memory_mb']:.1f} |")
    measure = rows[0]["memory_measure"] if rows else ""
    table = "\n".join(lines) + f"\n\nmemory: {measure}, largest over the tasks of a run\n"
    (out / "table.md").write_text(table)
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["mode"])
        writer.writeheader()
        writer.writerows(rows)
    return table


def ablate_main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="fastortho-ablate",
                                description="Grid of fine-tuning modes x regularizers; a Table-1-shaped result.")
    _benchmark_args(p)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--regs", default="none,orthoreg,taujp-cyclical")
    p.add_argument("--out", type=Path, default=Path("ablation"))
    p.add_argument("--demo", action="store_true",
                   help="the offline benchmark with short runs (minutes on a CPU): " +
                        ", ".join(f"{k}={v}" for k, v in DEMO.items()))
    _train_args(p)
    if p.parse_known_args(argv)[0].demo:  # demo settings as defaults; explicit options still win
        p.set_defaults(benchmark="offline", **DEMO)
    args = p.parse_args(argv)
    modes, regs = args.modes.split(","), args.regs.split(",")
    for m in modes:
        if m not in MODES:
            raise SystemExit(f"--modes: {m!r} is not one of {MODES}")
    for r in regs:
        if r not in REGULARIZERS:
            raise SystemExit(f"--regs: {r!r} is not one of {REGULARIZERS}")
    device = _device(args.device)
    bench = get_benchmark(args)
    args.out.mkdir(parents=True, exist_ok=True)
    done_file = args.out / "runs.jsonl"
    done = [json.loads(line) for line in done_file.read_text().splitlines()] if done_file.exists() else []
    settings = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(FinetuneConfig)}}
    grid = [(m, r) for m in modes for r in regs]
    t0 = time.perf_counter()
    for i, (mode, reg) in enumerate(grid):
        if any(d["mode"] == mode and d["reg"] == reg and d.get("settings") == settings for d in done):
            print(f"[{i + 1}/{len(grid)}] {mode} + {reg}: done before, skipped")
            continue
        print(f"[{i + 1}/{len(grid)}] {mode} + {reg}")
        row = _run(bench, mode, reg, args, device, args.out / f"{mode}-{reg}")
        row["settings"] = settings
        done.append(row)
        with open(done_file, "a") as f:
            f.write(json.dumps(row) + "\n")
    rows = [{k: v for k, v in d.items() if k != "settings"} for d in done
            if d.get("settings") == settings and (d["mode"], d["reg"]) in grid]
    rows.sort(key=lambda r: grid.index((r["mode"], r["reg"])))
    print(write_table(rows, args.out))
    print(f"{len(rows)} runs, {time.perf_counter() - t0:.0f} s this call; table.md, table.csv and per-run plots in "
          f"{args.out}/")


__all__ = ["ablate_main", "eval_main", "evaluate_vectors", "finetune_main", "get_benchmark", "write_table"]


if __name__ == "__main__":  # python -m fastortho.cli {finetune,eval,ablate} ... (torchrun -m works too)
    import sys

    commands = {"finetune": finetune_main, "eval": eval_main, "ablate": ablate_main}
    if len(sys.argv) < 2 or sys.argv[1] not in commands:
        raise SystemExit(f"usage: python -m fastortho.cli {{{','.join(commands)}}} [options]")
    commands[sys.argv[1]](sys.argv[2:])
