"""``fastortho-ablate``: the grid of fine-tuning modes x regularizers, each fine-tuned on every
task and merged; a table in the shape of the OrthoReg paper's Table 1 (``--demo``: offline)."""
from __future__ import annotations

import argparse
import csv
import io
import json
import shutil
import sys
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from .._checks import check_real
from .._files import RunLock, write_text
from ..merge import METHODS, method_names
from ..task_vectors import TaskVector, cosine_matrix
from ..train import MODES, REGULARIZERS, FinetuneConfig, finetune
from ._common import benchmark_args, command, get_benchmark, parser, resolve_device, run_config, train_args
from .eval import evaluate_vectors

DEMO = dict(steps=50, batch_size=32, lr=1e-3, weight_decay=0.01, warmup=5, lam=0.1, lam_grid="0.1,1", lora_rank=8,
            lora_alpha=16.0, taujp_batch=8, merge="ta,ties")
METHOD_NAMES = {"nonlinear": "Non-lin. FT", "linear": "TTA (linear FT)", "attention": "ATT-FT", "lora": "LoRA"}


def run_cell(bench, mode: str, reg: str, args, device: str, run_dir: Path, merges: list[str]) -> dict:
    """Fine-tune every task of one (mode, regularizer, lambda), save the task vectors in
    ``run_dir`` and merge them by each method of ``merges``."""
    cfg = run_config(args, mode, reg)
    vectors, wall, memory, measure = {}, 0.0, 0, ""
    for task in bench.tasks:
        res = finetune(bench, task, cfg, device=device, checkpoint_dir=run_dir / f"ckpt-{task}",
                       progress=not args.no_progress, workers=args.workers)
        res.task_vector.save(run_dir / f"{task}.safetensors")
        vectors[task] = res.task_vector
        wall += res.wall_time_s
        memory, measure = max(memory, res.memory_bytes), res.memory_measure
    record = {"mode": mode, "reg": reg, "lam": cfg.lam, "finetune_s": wall, "memory_mb": memory / 1e6,
              "memory_measure": measure,
              "cosine_offdiag": float(np.mean(np.abs(cosine_matrix(vectors)[~np.eye(len(vectors), dtype=bool)])))}
    return merge_cell(bench, record, vectors, args, device, run_dir, merges)


def merge_cell(bench, record: dict, vectors: dict | None, args, device: str, run_dir: Path, merges: list[str]) -> dict:
    """``record`` with ``record["merge"][method]`` for each of ``merges`` (the task vectors of
    ``run_dir`` when ``vectors`` is None): absolute and normalized test accuracy at the alpha
    chosen on validation, and the validation accuracies there (what chooses lambda)."""
    if vectors is None:
        vectors = {t: TaskVector.load(run_dir / f"{t}.safetensors") for t in bench.tasks}
    res = evaluate_vectors(bench, vectors, record["mode"], device=device, out=run_dir, progress=False,
                           negation=False, workers=args.workers, merges=merges)
    found = dict(record.get("merge", {}))
    for method, r in res["merge"].items():
        at = next(row for row in r["search"] if row["alpha"] == r["alpha"])
        found[method] = {"abs": r["avg_top1"], "norm": r["avg_normalized_top1"], "alpha": r["alpha"],
                         "val_abs": at["avg_top1"], "val_norm": at["avg_normalized_top1"]}
    return {**record, "merge": found,
            "single_task": float(np.mean(list(res["single_task"].values()))),
            "zero_shot": float(np.mean(list(res["zero_shot"].values())))}


def upgrade_record(record: dict) -> dict:
    """A run recorded before merge methods (its task-addition numbers at the top level) in
    today's form, so that its fine-tuning is reused."""
    if "merge" in record or "abs" not in record:
        return record
    old = {k: record.pop(k) for k in ("abs", "norm", "alpha", "val_norm") if k in record}
    return {**record, "merge": {"ta": {"abs": old["abs"], "norm": old["norm"], "alpha": old["alpha"],
                                       "val_norm": old.get("val_norm", old["norm"]), "val_abs": None}}}


def lambda_grid(text: str | None, default: float) -> list[float]:
    """The lambdas of ``--lam-grid`` (comma-separated, each finite and >= 0), or ``[default]``."""
    if not text:
        return [default]
    values = []
    for part in text.split(","):
        try:
            values.append(check_real("--lam-grid", float(part), minimum=0))
        except ValueError as e:
            raise ValueError(f"--lam-grid: expected comma-separated numbers >= 0, got {part!r} ({e})") from None
    if len(set(values)) != len(values):
        raise ValueError(f"--lam-grid: {text!r} repeats a value")
    return values


def choose_lambdas(records: list[dict], grid: list[tuple[str, str]], merges: list[str], select: str) -> list[dict]:
    """One row per (mode, regularizer, lambda, method) of ``records``; ``chosen`` marks, for each
    (mode, regularizer, method), the lambda whose merged model is best on the validation splits
    by ``select`` ("absolute" or "normalized") accuracy (the smallest lambda on ties)."""
    key = "val_abs" if select == "absolute" else "val_norm"
    rows = []
    for mode, reg in grid:
        runs = sorted((r for r in records if (r["mode"], r["reg"]) == (mode, reg)), key=lambda r: r["lam"])
        for method in merges:
            cands = [{"mode": mode, "reg": reg, "lam": r["lam"], "merge": method, **r["merge"][method],
                      "single_task": r["single_task"], "zero_shot": r["zero_shot"], "finetune_s": r["finetune_s"],
                      "memory_mb": r["memory_mb"], "memory_measure": r["memory_measure"],
                      "cosine_offdiag": r["cosine_offdiag"], "lam_select": select, "chosen": False} for r in runs]
            best = max(range(len(cands)), key=lambda i: cands[i][key])  # first maximum: smallest lambda
            cands[best]["chosen"] = True
            rows += cands
    return rows


def write_table(rows: list[dict], out: Path, select: str = "absolute") -> str:
    """Markdown in the shape of the OrthoReg paper's Table 1, one row group per merge method:
    per fine-tuning mode, absolute and normalized accuracy of the merged model without and with
    each regularizer (at the chosen lambda), the delta and the chosen coefficient; and
    table.csv with every (mode, regularizer, lambda, method), ``chosen`` marking the table's."""
    chosen = [r for r in rows if r["chosen"]]
    base = {(r["mode"], r["merge"]): r for r in chosen if r["reg"] == "none"}
    lines = ["| merge | method | regularizer | lambda | abs. acc | norm. acc | delta abs | delta norm | alpha | "
             "mean abs cos | fine-tune time (s) | memory (MB) |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    if rows:
        lines.append(f"| zero-shot | - | - | - | {100 * rows[0]['zero_shot']:.1f} | - | - | - | - | - | - | - |")
    for method in dict.fromkeys(r["merge"] for r in chosen):
        for r in (r for r in chosen if r["merge"] == method):
            b = base.get((r["mode"], method))
            da = f"{100 * (r['abs'] - b['abs']):+.1f}" if b and r["reg"] != "none" else "-"
            dn = f"{100 * (r['norm'] - b['norm']):+.1f}" if b and r["reg"] != "none" else "-"
            lam = "-" if r["reg"] == "none" else f"{r['lam']:g}"
            lines.append(
                f"| {METHODS[method].title} | {METHOD_NAMES[r['mode']]} | {r['reg']} | {lam} | {100 * r['abs']:.1f} | "
                f"{100 * r['norm']:.1f} | {da} | {dn} | {r['alpha']:.2f} | {r['cosine_offdiag']:.3f} | "
                f"{r['finetune_s']:.1f} | {r['memory_mb']:.1f} |"
            )
    measure = rows[0]["memory_measure"] if rows else ""
    grids = {}
    for r in rows:
        if r["reg"] != "none":
            grids.setdefault((r["mode"], r["reg"], r["merge"]), []).append(r["lam"])
    lam_sets = sorted({tuple(g) for g in grids.values() if len(g) > 1})
    note = "".join(f"; lambda chosen from {{{', '.join(f'{x:g}' for x in g)}}}" for g in lam_sets)
    if note:
        note += (f" per (fine-tuning method, regularizer, merge method) by the merged model's {select} accuracy "
                 f"on the validation splits (--lam-select {select}), test numbers at it")
    table = "\n".join(lines) + (f"\n\nmemory: {measure}, largest over the tasks of a run; alpha chosen per run on the "
                                f"validation splits by normalized accuracy{note}\n")
    write_text(out / "table.md", table, "out")
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["mode"])
    writer.writeheader()
    writer.writerows(rows)
    write_text(out / "table.csv", buffer.getvalue(), "out")
    return table


def read_records(path: Path) -> tuple[list[dict], int]:
    """``(the runs recorded in runs.jsonl, how many lines were damaged)``. A damaged line (a
    record torn by a kill, or edited by hand) is reported and skipped: its run is simply done
    again."""
    if not path.exists():
        return [], 0
    records, damaged = [], 0
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not {"mode", "reg"} <= set(record):
                raise ValueError("not a run record")
            record = upgrade_record(record)
        except ValueError as e:
            print(f"warning: {path} line {number} is damaged ({e}); ignored, that run will be done again",
                  file=sys.stderr)
            damaged += 1
            continue
        records.append(record)
    return records, damaged


def write_records(path: Path, records: list[dict]) -> None:
    """All records at once, atomically: the file is either the old one or the new one."""
    write_text(path, "".join(json.dumps(r) + "\n" for r in records), "out")


def build_parser() -> argparse.ArgumentParser:
    p = parser("fastortho-ablate", "Grid of fine-tuning modes x regularizers; a Table-1-shaped result.")
    benchmark_args(p)
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"comma-separated fine-tuning modes, of {', '.join(MODES)}")
    p.add_argument("--regs", default="none,orthoreg,taujp-cyclical",
                   help=f"comma-separated regularizers, of {', '.join(REGULARIZERS)}")
    p.add_argument("--out", type=Path, default=Path("ablation"),
                   help="directory for the runs (task vectors, checkpoints, plots), runs.jsonl, table.md and "
                        "table.csv")
    p.add_argument("--lam-grid", help="comma-separated lambdas to choose from, per regularized (mode, regularizer) "
                                      "and merge method, by the merged model's accuracy on the validation splits "
                                      "(--lam-select; the paper's grid: 0.1,1,10,100); default: --lam only")
    p.add_argument("--lam-select", choices=("absolute", "normalized"), default="absolute",
                   help="how --lam-grid chooses: the merged model's average absolute accuracy on the validation "
                        "splits (default: the best merged model), or its normalized accuracy (the papers' rule, which "
                        "favours a lambda that weakens single-task fitting)")
    p.add_argument("--merge", default="ta",
                   help=f"comma-separated merge methods, each with its coefficient searched on the validation splits: "
                        f"{', '.join(f'{k} ({m.title})' for k, m in METHODS.items())}; default ta")
    p.add_argument("--overwrite", action="store_true",
                   help="start over: discard the runs recorded in --out (runs.jsonl, task vectors, checkpoints) "
                        "instead of reusing them")
    p.add_argument("--demo", action="store_true",
                   help="the offline benchmark with short runs (minutes on a CPU): " +
                        ", ".join(f"{k}={v}" for k, v in DEMO.items()))
    train_args(p)
    return p


@command("fastortho-ablate")
def main(argv=None) -> None:
    p = build_parser()
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
    try:
        args.merge_methods = method_names(args.merge)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    device = resolve_device(args.device)
    with RunLock(args.out, "--out"):  # checked writable and held: a second ablate on --out refuses
        run_grid(args, modes, regs, device)


def run_grid(args, modes: list[str], regs: list[str], device: str) -> None:
    bench = get_benchmark(args)
    done_file = args.out / "runs.jsonl"
    if args.overwrite:
        for mode in MODES:
            for reg in REGULARIZERS:
                for run_dir in [args.out / f"{mode}-{reg}", *args.out.glob(f"{mode}-{reg}-lam*")]:
                    shutil.rmtree(run_dir, ignore_errors=True)
        done_file.unlink(missing_ok=True)
    done, damaged = read_records(done_file)
    if damaged:
        write_records(done_file, done)  # without the damaged lines, so they are reported once
    settings = {k: v for k, v in vars(args).items() if k in {f.name for f in fields(FinetuneConfig)}}
    lams = lambda_grid(args.lam_grid, args.lam)
    grid = [(m, r) for m in modes for r in regs]
    runs = [(m, r, lam) for m, r in grid for lam in (lams if r != "none" else [args.lam])]
    merges = args.merge_methods
    t0 = time.perf_counter()
    records = {}
    for i, (mode, reg, lam) in enumerate(runs):
        wanted = {**settings, "lam": lam}
        what = f"{mode} + {reg}" + (f", lambda {lam:g}" if len(lams) > 1 and reg != "none" else "")
        name = f"{mode}-{reg}" if len(lams) == 1 or reg == "none" else f"{mode}-{reg}-lam{lam:g}"
        found = next((d for d in done if d["mode"] == mode and d["reg"] == reg and d.get("settings") == wanted), None)
        have = found.get("merge", {}) if found is not None else {}
        missing = [m for m in merges if m not in have or have[m].get("val_abs") is None]
        if found is not None and not missing:
            print(f"[{i + 1}/{len(runs)}] {what}: done before, skipped")
        elif found is not None:
            print(f"[{i + 1}/{len(runs)}] {what}: fine-tuned before; merging again, for {', '.join(missing)}")
            done.remove(found)
            found = {**merge_cell(bench, found, None, args, device, args.out / name, merges), "settings": wanted}
            done.append(found)
            write_records(done_file, done)
        else:
            print(f"[{i + 1}/{len(runs)}] {what}")
            found = run_cell(bench, mode, reg, argparse.Namespace(**{**vars(args), "lam": lam}), device,
                             args.out / name, merges)
            found["settings"] = wanted
            done.append(found)
            write_records(done_file, done)
        records[(mode, reg, lam)] = found
    rows = choose_lambdas([{k: v for k, v in r.items() if k != "settings"} for r in records.values()], grid, merges,
                          args.lam_select)
    if len(lams) > 1 and any(r != "none" for r in regs):
        from .. import analysis

        analysis.plot_lambda_sensitivity(rows, args.out / "lambda_sensitivity.png", select=args.lam_select,
                                         run=f"{args.benchmark} benchmark, {len(bench.tasks)} tasks")
    print(write_table(rows, args.out, args.lam_select))
    size = sum(f.stat().st_size for f in args.out.rglob("*") if f.is_file())
    print(f"{len(runs)} runs, {time.perf_counter() - t0:.0f} s this call; table.md, table.csv, "
          f"lambda_sensitivity.png (with a lambda grid) and per-run plots in {args.out}/ ({size / 1e6:.0f} MB in "
          f"all, checkpoints included: the runs are reused by the next call with "
          f"the same settings; --overwrite starts over, deleting {args.out}/ removes them)")
