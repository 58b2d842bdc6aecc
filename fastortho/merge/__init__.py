"""Merging task vectors: task arithmetic, TIES, DARE (with task arithmetic or TIES), TSV-M,
Iso-C and Iso-CTS, one interface, each with its coefficient searched on validation splits.

    merged = fo.merge.merge_vectors(task_vectors, "ties")        # a TaskVector, coefficient 1
    model = merged.apply_to(pretrained, 1.0)
    result = fo.merge.merge_tasks(pretrained, task_vectors, evaluate, method="tsvm")

Every method takes fastortho task vectors of any model (open_clip, Hugging Face, LoRA deltas,
linearized models' vectors) and agrees with FusionBench's implementation of it
(tests/test_merge.py); :data:`METHODS` lists each with its published hyperparameters and its
coefficient grid. Design notes: docs/design.md section 9.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..task_vectors import ADDITION_ALPHAS, AdditionResult, TaskVector, _progress, _same_layout, _split
from . import methods

GRID_01 = ADDITION_ALPHAS  # TTA's {0, 0.05, ..., 1}
GRID_02 = tuple(round(0.1 * i, 1) for i in range(21))  # {0, 0.1, ..., 2}
GRID_03 = tuple(round(0.1 * i, 1) for i in range(31))  # {0, 0.1, ..., 3}


@dataclass(frozen=True)
class MergeMethod:
    """A merge method: ``merge(vectors, **options) -> {key: merged tensor}`` (the direction;
    the merged model is ``th0 + alpha * merged``), its published ``options``, the coefficient
    grid searched on validation, and FusionBench's counterpart."""
    name: str
    title: str
    merge: Callable[..., dict[str, Tensor]]
    alphas: tuple[float, ...]
    options: Mapping[str, object] = field(default_factory=dict)
    fusionbench: str = ""


METHODS: dict[str, MergeMethod] = {m.name: m for m in [
    MergeMethod("ta", "task arithmetic", methods.task_arithmetic, GRID_01, {}, "TaskArithmeticAlgorithm"),
    MergeMethod("ties", "TIES", methods.ties, GRID_02, {"keep": 0.2, "merge": "mean"},
                "TiesMergingAlgorithm (threshold=20; its default merge_func is 'sum')"),
    MergeMethod("dare", "DARE + task arithmetic", methods.dare, GRID_01, {"p": 0.5, "rescale": True, "seed": 0},
                "DareTaskArithmetic (sparsity_ratio=0.5)"),
    MergeMethod("dare-ties", "DARE + TIES", methods.dare, GRID_02,
                {"p": 0.5, "rescale": True, "seed": 0, "then": "ties", "keep": 0.2, "merge": "mean"},
                "DareTiesMerging (sparsity_ratio=0.5, threshold=20; its default merge_func is 'sum')"),
    MergeMethod("tsvm", "TSV-M", methods.tsv_merge, GRID_02, {}, "TaskSingularVectorMerging"),
    MergeMethod("isoc", "Iso-C", methods.iso_c, GRID_03, {}, "ISO_C_Merge"),
    MergeMethod("isocts", "Iso-CTS", methods.iso_cts, GRID_03, {"common": 0.8},
                "ISO_CTS_Merge (common_space_fraction=0.8)"),
]}


def method_names(text: str, what: str = "--merge") -> list[str]:
    """Comma-separated method names (e.g. ``"ta,ties"``), each checked against :data:`METHODS`."""
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names:
        raise ValueError(f"{what}: expected comma-separated merge methods of {', '.join(METHODS)}, got {text!r}")
    unknown = [x for x in names if x not in METHODS]
    if unknown:
        raise ValueError(f"{what}: unknown merge method(s) {unknown}; expected some of {', '.join(METHODS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}: {text!r} repeats a method")
    return names


def check_mergeable(task_vectors, what: str = "task_vectors") -> tuple[list[str], list[Mapping[str, Tensor]]]:
    """``(names, vectors)`` of ``{name: vector}`` or a sequence of vectors, refused with a
    message naming the problem when empty, of different layouts (keys or shapes: vectors of
    different models), of different fine-tuning modes (metadata ``mode``: a linearized model's
    vector is applied to a linearized model) or with NaN or infinite entries."""
    if isinstance(task_vectors, Mapping) and all(isinstance(v, Mapping) for v in task_vectors.values()):
        names, vectors = [str(k) for k in task_vectors], list(task_vectors.values())
    elif isinstance(task_vectors, Sequence) and not isinstance(task_vectors, (str, bytes)):
        names, vectors = [f"{what}[{i}]" for i in range(len(task_vectors))], list(task_vectors)
    else:
        raise TypeError(f"{what}: expected {{task: TaskVector}} or a list of task vectors, got "
                        f"{type(task_vectors).__name__}")
    if not vectors:
        raise ValueError(f"{what}: expected at least one task vector, got none")
    for name, v in zip(names, vectors):
        if not isinstance(v, Mapping) or not v or not all(isinstance(x, Tensor) for x in v.values()):
            raise TypeError(f"{what}: {name} is not a task vector (a non-empty mapping name -> tensor)")
    for name, v in zip(names[1:], vectors[1:]):
        _same_layout(vectors[0], v, names[0], name)
    modes = {n: getattr(v, "metadata", {}).get("mode", "nonlinear") for n, v in zip(names, vectors)}
    if len(set(modes.values())) > 1:
        raise ValueError(f"{what}: the task vectors come from different fine-tuning modes ("
                         + ", ".join(f"{n}: {m}" for n, m in modes.items()) + "); merge vectors of one mode only")
    for name, v in zip(names, vectors):
        # one read of each tensor (NaN and inf reach the min or max); one host sync per vector
        finite = torch.stack([torch.stack(torch.aminmax(x)).isfinite().all() if x.numel() else
                              torch.ones((), dtype=torch.bool, device=x.device) for x in v.values()])
        if not bool(finite.all()):
            bad = [k for k, ok in zip(v, finite.tolist()) if not ok]
            raise ValueError(f"{what}: {name} has NaN or infinite entries (in {len(bad)} tensor(s), e.g. {bad[0]}): "
                             f"the run that made it diverged")
    return names, vectors


def merge_vectors(task_vectors, method: str = "ta", *, device=None, progress: bool = True, **options):
    """The merged direction of ``task_vectors`` (``{task: TaskVector}`` or a list) by
    ``method`` (a name in :data:`METHODS`): a :class:`~fastortho.TaskVector` on the inputs'
    device and dtype, whose metadata names the method, its options and the tasks. ``options``
    override the method's published ones (e.g. ``merge="sum"`` for TIES, ``seed=1`` for DARE);
    ``device`` runs the batched steps elsewhere (e.g. ``"cuda"`` for vectors kept on the CPU).
    ``progress`` shows a tqdm bar over the chunks of every method but task arithmetic (minutes
    on a CPU for ViT-L-14's SVDs)."""
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    spec = METHODS[method]
    names, vectors = check_mergeable(task_vectors)
    allowed = set(spec.options) | ({"budget"} if method != "ta" else set())
    allowed |= {"exclude"} if method in ("tsvm", "isoc", "isocts") else set()
    allowed |= {"then"} if method.startswith("dare") else set()
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"options: {method} takes {sorted(allowed) or 'no options'}, not {unknown}")
    chosen = {**spec.options, **options}
    extra = {"device": device, "progress": progress} if method != "ta" else {}
    with torch.no_grad():
        merged = spec.merge(vectors, **chosen, **extra)
    meta = dict(getattr(vectors[0], "metadata", {}))
    meta.pop("task", None)
    meta.update(merge=method, merge_options=json.dumps({k: v for k, v in chosen.items() if k != "budget"}),
                tasks=json.dumps(names))
    return TaskVector(merged, meta)


def merge_tasks(pretrained, task_vectors, evaluate: Callable[[object, str], float], *, method: str = "ta",
                alphas: Sequence[float] | None = None, select: str = "normalized", val_suffix: str | None = "Val",
                finetuned_accuracy: Mapping[str, float] | None = None, progress: bool = True, device=None,
                options: Mapping[str, object] | None = None):
    """Merge ``task_vectors`` (``{dataset name: TaskVector}``) by ``method`` and search the
    coefficient: ``th0 + alpha * merged`` for each alpha of ``alphas`` (default: the method's
    grid) on the validation splits, then test accuracies at the chosen one.

    Args:
        pretrained: a module, state_dict or LinearizedModel (see :meth:`TaskVector.apply_to`).
        evaluate: ``evaluate(model, dataset name) -> accuracy``; called with ``f"{task}{val_suffix}"``
            during the search (``val_suffix=None`` searches on the test splits themselves).
        select: how alpha is chosen: "normalized" (average of acc / single-task acc, as TTA and
            the papers do) or "absolute" (average accuracy).
        finetuned_accuracy: single-task accuracies by dataset name (also the ``...Val`` names)
            used to normalize; missing ones are measured with ``th0 + tau_t``.
        options: the method's hyperparameters, over its published ones (:data:`METHODS`).

    Returns an :class:`~fastortho.task_vectors.AdditionResult` (``method`` names the method).
    """
    import numpy as np

    if select not in ("normalized", "absolute"):
        raise ValueError(f"select: expected 'normalized' or 'absolute', got {select!r}")
    if method not in METHODS:
        raise ValueError(f"method: expected one of {', '.join(METHODS)}, got {method!r}")
    tasks, vectors = check_mergeable(task_vectors)
    if not isinstance(task_vectors, Mapping):
        raise TypeError("task_vectors: expected {dataset name: TaskVector} (the names are evaluated)")
    alphas = tuple(METHODS[method].alphas if alphas is None else alphas)
    if not alphas:
        raise ValueError("alphas: expected at least one coefficient")
    single = dict(finetuned_accuracy or {})

    def normalizer(split: str, task: str) -> float:
        if split not in single:
            single[split] = float(evaluate(task_vectors[task].apply_to(pretrained, 1.0), split))
        if single[split] <= 0:
            raise ValueError(f"finetuned_accuracy[{split!r}] = {single[split]}: cannot normalize by it")
        return single[split]

    merged = merge_vectors(task_vectors, method, device=device, progress=progress, **dict(options or {}))
    search = []
    title = METHODS[method].title
    for alpha in _progress(alphas, f"{title}: alpha search", show=progress):
        model = merged.apply_to(pretrained, float(alpha))
        accs = {t: float(evaluate(model, _split(t, val_suffix))) for t in tasks}
        row = {"alpha": float(alpha), "avg_top1": float(np.mean(list(accs.values())))}
        if select == "normalized":
            row["avg_normalized_top1"] = float(np.mean([accs[t] / normalizer(_split(t, val_suffix), t) for t in tasks]))
        search.append(row)
    key = "avg_normalized_top1" if select == "normalized" else "avg_top1"
    best = max(search, key=lambda r: r[key])  # first (smallest) alpha on ties
    model = merged.apply_to(pretrained, best["alpha"])
    test: dict[str, float] = {}
    for t in tasks:
        acc = float(evaluate(model, t))
        test[f"{t}:top1"] = acc
        test[f"{t}:normalized_top1"] = acc / normalizer(t, t)
    test["avg_top1"] = float(np.mean([test[f"{t}:top1"] for t in tasks]))
    test["avg_normalized_top1"] = float(np.mean([test[f"{t}:normalized_top1"] for t in tasks]))
    return AdditionResult(best["alpha"], test, search, method=method, select=select)


def task_addition(pretrained, task_vectors: Mapping[str, Mapping[str, Tensor]],
                  evaluate: Callable[[object, str], float], *,
                  alphas: Sequence[float] = GRID_01, select: str = "normalized", val_suffix: str | None = "Val",
                  finetuned_accuracy: Mapping[str, float] | None = None, progress: bool = True) -> AdditionResult:
    """Merge ``th0 + alpha * sum_t tau_t`` with one ``alpha`` chosen on validation splits
    (:func:`fastortho.merge.merge_tasks` with ``method="ta"``; the other methods are there).

    Args:
        pretrained: a module, state_dict or LinearizedModel (see :meth:`TaskVector.apply_to`).
        task_vectors: ``{dataset name: task vector}``.
        evaluate: ``evaluate(model, dataset name) -> accuracy``; called with ``f"{task}{val_suffix}"``
            during the search (``val_suffix=None`` searches on the test splits themselves).
        select: "normalized" (average of acc / single-task acc, the default) or "absolute".
        finetuned_accuracy: single-task accuracies by dataset name (also the ``...Val`` names)
            used to normalize; missing ones are measured with ``th0 + tau_t``.
    """
    return merge_tasks(pretrained, task_vectors, evaluate, method="ta", alphas=alphas, select=select,
                       val_suffix=val_suffix, finetuned_accuracy=finetuned_accuracy, progress=progress)


__all__ = ["GRID_01", "GRID_02", "GRID_03", "METHODS", "MergeMethod", "check_mergeable", "merge_tasks",
           "merge_vectors", "method_names", "task_addition"]
