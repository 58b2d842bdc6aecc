"""What the three commands share: the benchmark and fine-tuning options, the configuration
they build, the device and the process group under torchrun."""
from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import fields
from pathlib import Path

from .._files import RunLockedError
from ..train import FinetuneConfig

# What a user can cause (a missing or damaged file, a bad value, a folder in use): reported as
# one line naming the option, exit status 2. Anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, RunLockedError, FloatingPointError)


class InputProblems(ValueError):
    """Every problem found with a command's inputs, reported together."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def command(prog: str):
    """Wrap a command's ``main(argv)``: a user error prints ``prog: error: ...`` on stderr and
    exits with status 2 (``--debug``: the traceback instead)."""
    def wrap(main):
        @functools.wraps(main)
        def run(argv=None):
            argv = sys.argv[1:] if argv is None else list(argv)
            try:
                return main(argv)
            except USER_ERRORS as e:
                if "--debug" in argv:
                    raise
                lines = e.problems if isinstance(e, InputProblems) else [str(e)]
                for line in lines:
                    print(f"{prog}: error: {line}", file=sys.stderr)
                print(f"{prog}: (--debug shows the traceback)", file=sys.stderr)
                raise SystemExit(2) from None
        return run
    return wrap


def benchmark_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--benchmark", choices=["offline", "clip8"], default="offline",
                   help="offline: built-in, no download; clip8: the 8 CLIP tasks from --data-root")
    g.add_argument("--model", default="ViT-B-32", help="open_clip model name (clip8)")
    g.add_argument("--weights", help="local file of the pretrained open_clip weights, or an open_clip hub folder "
                                     "(open_clip_config.json beside the weights) (clip8; never downloaded)")
    g.add_argument("--pretrained", help="the open_clip pretrained tag the --weights are (e.g. openai, "
                                        "laion2b_s34b_b79k): its architecture options follow (QuickGELU for openai)")
    g.add_argument("--allow-torchscript", action="store_true",
                   help="accept a TorchScript archive as --weights (OpenAI's format; loading it runs code from the "
                        "file): better, convert it once with python -m fastortho.clip convert")
    g.add_argument("--data-root", help="root of the datasets: the task-vectors layout or Hugging Face datasets (clip8)")
    g.add_argument("--data-format", choices=["auto", "folder", "hf"], default="auto",
                   help="how each dataset under --data-root is read: folder (the task-vectors layout), hf (Hugging "
                        "Face datasets: save_to_disk folders or the hub's parquet snapshot, e.g. <root>/sun397), or "
                        "auto (per dataset, whichever is there)")
    g.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--workers", type=int, default=4,
                   help="DataLoader processes reading image files (0: the main process; in-memory data ignores it)")


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """A command's parser: every option's help shows its default."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return p


def train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning (paper defaults)")
    d = FinetuneConfig()
    g.add_argument("--lam", type=float, default=d.lam, help="regularizer weight lambda (>= 0)")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per task")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per micro-batch")
    g.add_argument("--lr", type=float, default=d.lr, help="AdamW peak learning rate")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    g.add_argument("--warmup", type=int, default=d.warmup,
                   help="linear warm-up steps before the cosine decay (0: none)")
    g.add_argument("--accumulation", type=int, default=d.accumulation,
                   help="micro-batches per optimizer step (gradient accumulation)")
    g.add_argument("--autocast", choices=["auto", "bf16", "none"], default=d.autocast,
                   help="bf16 autocast of the step: auto = on CUDA only")
    g.add_argument("--lora-targets", default=d.lora_targets,
                   help="for --mode lora: letters of qkvofp, the projections to adapt (OrthoReg Table 6)")
    g.add_argument("--lora-rank", type=int, default=d.lora_rank, help="for --mode lora: adapter rank r")
    g.add_argument("--lora-alpha", type=float, default=d.lora_alpha,
                   help="for --mode lora: scale alpha (the update is alpha / r * B A)")
    g.add_argument("--taujp-batch", type=int, default=d.taujp_batch, help="images per other task per step")
    g.add_argument("--taujp-form", choices=["released", "paper"], default=d.taujp_form,
                   help="tau-Jp penalty: released = the released code's (per task the mean per-sample L2 "
                        "norm; strict mode averages the tasks), paper = Eq. 10 (sums of squared norms)")
    g.add_argument("--ortho-precision", choices=["auto", "ieee", "tf32", "bf16"], default=d.ortho_precision,
                   help="matmul mode of the OrthoReg penalty: auto follows the step's autocast (bf16 under "
                        "--autocast bf16), else torch's float32 matmul precision")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of the initialization and of the batches")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                   help="save a resumable checkpoint every N steps (0: only at the end)")


def run_config(args, mode: str, reg: str) -> FinetuneConfig:
    names = {f.name for f in fields(FinetuneConfig)}
    values = {k: v for k, v in vars(args).items() if k in names and v is not None}
    values.update(mode=mode, reg=reg)
    return FinetuneConfig(**values).check()


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def get_benchmark(args, tasks: list[str] | None = None):
    """The benchmark of ``--benchmark``; ``tasks``: the only tasks whose data this run reads
    (checked up front; None: all of them)."""
    progress = not args.no_progress
    if args.benchmark == "offline":
        from ..offline import OfflineBenchmark

        return OfflineBenchmark(progress=progress)
    from ..clip import ClipBenchmark
    from ..datasets import CONTROL, TASKS8

    needed = list(tasks or TASKS8)
    if not getattr(args, "no_negation", True) and CONTROL not in needed:  # fastortho-eval's negation
        needed.append(CONTROL)
    data_format = getattr(args, "data_format", "auto")
    check_clip_inputs(args.weights, args.data_root, needed, data_format)
    return ClipBenchmark(args.model, args.weights, args.data_root, device=resolve_device(args.device), tasks=tasks,
                         pretrained=args.pretrained, allow_torchscript=args.allow_torchscript, data_format=data_format)


def check_clip_inputs(weights, data_root, tasks: list[str], data_format: str = "auto") -> None:
    """Every problem with ``--weights`` and ``--data-root`` at once (before a model loads)."""
    from ..datasets import LAYOUTS, missing_layout

    problems = []
    if weights is None:
        problems.append("--weights: pass the local file of the pretrained weights (fastortho never downloads)")
    elif Path(weights).expanduser().is_dir():
        pass  # an open_clip hub folder: load_clip checks its contents
    elif not Path(weights).expanduser().is_file():
        problems.append(f"--weights: {weights} is not a file")
    elif Path(weights).expanduser().stat().st_size == 0:
        problems.append(f"--weights: {weights} is empty (0 bytes): an interrupted download or copy?")
    unknown = [t for t in tasks if t.removesuffix("Val") not in LAYOUTS]
    if unknown:
        problems.append(f"--tasks: unknown task(s) {unknown}; expected names of {sorted(LAYOUTS)}")
    if data_root is None:
        problems.append("--data-root: pass the directory holding the datasets")
    elif not Path(data_root).expanduser().is_dir():
        problems.append(f"--data-root: {data_root} is not a directory")
    else:
        root = Path(data_root).expanduser()
        for t in tasks:
            if t not in unknown:
                found = [p for split in ("train", "test") if (p := missing_layout(t, root, split, data_format))]
                problems += list(dict.fromkeys(found))  # a Hugging Face dataset's one message, once
    if problems:
        raise InputProblems(problems)


def init_distributed():
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
