"""``fastortho-eval``: single-task accuracy, merging (task arithmetic and the other methods of
fastortho.merge, coefficient searched on the validation splits) and negation of a folder of
task vectors, or of fine-tuned Hugging Face model folders (FusionBench's); results.json and
plots."""
from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

import torch

from .._files import check_writable, write_text
from ..merge import METHODS, method_names
from ..task_vectors import TaskVector, task_negation
from ..train import make_evaluator, pretrained_for
from ._common import InputProblems, benchmark_args, command, get_benchmark, parser, resolve_device


def evaluate_vectors(bench, vectors: dict[str, TaskVector], mode: str, *, device: str, out: Path | None,
                     progress: bool, negation: bool = True, workers: int = 0, merges: Sequence[str] = ("ta",)) -> dict:
    """Zero-shot, single-task, each merge method of ``merges`` with its coefficient searched on
    the validation splits (and negation against the control task). ``results["merge"]`` has one
    entry per method; ``results["addition"]`` is task arithmetic's, when it was asked for."""
    from ..merge import merge_tasks

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
    found = {}
    for method in merges:
        found[method] = merge_tasks(pretrained, vectors, evaluate, method=method, finetuned_accuracy=single,
                                    progress=progress, device=device)
    results["merge"] = {m: {"alpha": r.alpha, **r.test, "search": r.search, "select": r.select}
                        for m, r in found.items()}
    if "ta" in results["merge"]:
        results["addition"] = results["merge"]["ta"]
    if negation and getattr(bench, "control", None):
        neg = {}
        for t in tasks:
            r = task_negation(pretrained, vectors[t], evaluate, t, bench.control, progress=progress)
            neg[t] = {str(k): v for k, v in r.choices.items()}
        results["negation"] = neg
        results["zero_shot_control"] = evaluate(pretrained, bench.control)
    if out is not None:
        from .. import analysis

        out.mkdir(parents=True, exist_ok=True)
        meta = next(iter(vectors.values())).metadata
        run = analysis.run_label({"mode": mode, **meta})
        analysis.plot_cosine_matrix(vectors, out / "cosine.png", run=run)
        analysis.plot_accuracy_radar({"zero-shot": results["zero_shot"], "single-task": results["single_task"],
                                      **{f"{METHODS[m].title} (alpha {r.alpha:.2f})":
                                         {t: r.test[f"{t}:top1"] for t in tasks} for m, r in found.items()}},
                                     out / "radar.png", title="per-task test accuracy", run=run)
        name = f"{mode} + {meta.get('regularizer', 'none')}"
        analysis.plot_alpha_sensitivity({f"{name}, {METHODS[m].title}": r.search for m, r in found.items()},
                                        out / "alpha_sensitivity.png", run=run)
        write_text(out / "results.json", json.dumps(results, indent=1), "out")
    return results


def check_vectors(vectors: dict[str, TaskVector], files: dict[str, Path]) -> str:
    """The fine-tuning mode the vectors share. Refuses (naming the files) vectors of several
    modes (a linearized vector is applied to a linearized model, the others to the network),
    a vector with NaN or infinite entries, and one whose metadata names another task."""
    problems = []
    modes = {t: v.metadata.get("mode", "nonlinear") for t, v in vectors.items()}
    if len(set(modes.values())) > 1:
        problems.append("--vectors: the task vectors come from different fine-tuning modes (" +
                        ", ".join(f"{files[t].name}: {m}" for t, m in modes.items()) +
                        "); merge vectors of one mode only")
    for t, v in vectors.items():
        bad = [k for k, x in v.items() if not bool(torch.isfinite(x).all())]
        if bad:
            problems.append(f"--vectors: {files[t]} has NaN or infinite entries (in {len(bad)} tensor(s), e.g. "
                            f"{bad[0]}): the run that made it diverged; fine-tune it again")
        named = v.metadata.get("task")
        if named is not None and named != t:
            problems.append(f"--vectors: {files[t]} holds the task vector of {named!r} (its metadata), not of {t!r}")
    if problems:
        raise InputProblems(problems)
    return next(iter(modes.values()))


def finetuned_vectors(bench, source: Path, weights) -> tuple[dict[str, TaskVector], dict[str, Path]]:
    """The task vectors of fine-tuned model folders (``--finetuned``) against the pretrained
    ``--weights``, which the benchmark's encoder must be able to take (a CLIPModel folder for
    Hugging Face image towers)."""
    from ..hf import finetuned_folders

    if weights is None:
        raise InputProblems(["--finetuned: pass the pretrained model as --weights (the CLIPModel folder the "
                             "fine-tuned models started from)"])
    folders = finetuned_folders(source, list(bench.tasks))
    vectors = {t: TaskVector.from_checkpoints(weights, f, {"task": t, "mode": "nonlinear", "source": str(f)})
               for t, f in folders.items()}
    encoder_keys = set(bench.encoder().state_dict())
    foreign = sorted(set().union(*vectors.values()) - encoder_keys)
    if foreign:
        raise InputProblems([f"--finetuned: the fine-tuned models' tensors are not the benchmark encoder's "
                             f"({len(foreign)} of them, e.g. {foreign[:2]}): with Hugging Face fine-tuned folders, "
                             f"--weights must be the pretrained transformers CLIPModel folder"])
    return vectors, folders


def build_parser() -> argparse.ArgumentParser:
    p = parser("fastortho-eval", "Single-task, merging (task arithmetic, TIES, DARE, TSV-M, Iso-C) and negation.")
    benchmark_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--vectors", type=Path, help="directory of {task}.safetensors task vectors")
    src.add_argument("--finetuned", type=Path,
                     help="fine-tuned models instead of vectors: a folder with one Hugging Face model folder per task "
                          "(named as the project or FusionBench names the task, e.g. Cars or stanford-cars), or a "
                          "FusionBench model-pool YAML; their vectors are taken against --weights (the pretrained "
                          "CLIPModel folder)")
    p.add_argument("--out", type=Path, required=True, help="directory for results.json and the plots")
    p.add_argument("--merge", default="ta",
                   help=f"comma-separated merge methods, each with its coefficient searched on the validation "
                        f"splits: {', '.join(f'{k} ({m.title})' for k, m in METHODS.items())}; default ta")
    p.add_argument("--no-negation", action="store_true",
                   help="skip task negation (then the control task's data is not needed)")
    return p


def results_table(res: dict) -> str:
    """A short markdown table of what fastortho-eval computed: per task the zero-shot,
    single-task and merged accuracy of each merge method, and, when negation was evaluated, the
    target and control accuracy at the alpha that keeps 95% of the control's zero-shot accuracy."""
    merges, negation = res["merge"], res.get("negation") or {}
    cols = ["task", "zero-shot", "single-task", *(METHODS[m].title for m in merges)]
    if negation:
        cols += ["negated: target", "negated: control", "negation alpha"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for task in res["single_task"]:
        cells = [task, f"{100 * res['zero_shot'][task]:.1f}", f"{100 * res['single_task'][task]:.1f}",
                 *(f"{100 * r[f'{task}:top1']:.1f}" for r in merges.values())]
        if negation:
            at95 = negation[task]["0.95"]
            control = next(v for k, v in at95.items() if k.endswith(":top1") and k != f"{task}:top1")
            cells += [f"{100 * at95[f'{task}:top1']:.1f}", f"{100 * control:.1f}", f"{at95['alpha']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for m, r in merges.items():
        lines.append(f"{METHODS[m].title}: alpha {r['alpha']:.2f} (chosen on the validation splits by {r['select']} "
                     f"accuracy), absolute {100 * r['avg_top1']:.1f}, normalized {100 * r['avg_normalized_top1']:.1f}")
    return "\n".join(lines)


@command("fastortho-eval")
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        merges = method_names(args.merge)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    check_writable(args.out, "--out")  # before minutes of evaluation, not at the first write
    bench = get_benchmark(args)
    if args.finetuned is not None:
        vectors, files = finetuned_vectors(bench, args.finetuned, args.weights)
    else:
        files = {t: args.vectors / f"{t}.safetensors" for t in bench.tasks}
        missing = [str(f) for f in files.values() if not f.exists()]
        if missing:
            raise SystemExit(f"--vectors: missing task vectors {missing} (run fastortho-finetune --out first)")
        vectors = {t: TaskVector.load(f) for t, f in files.items()}
    mode = check_vectors(vectors, files)
    res = evaluate_vectors(bench, vectors, mode, device=resolve_device(args.device), out=args.out,
                           progress=not args.no_progress, negation=not args.no_negation, merges=merges)
    print(results_table(res))
    print(f"results.json and plots in {args.out}/")
