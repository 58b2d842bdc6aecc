"""Task vectors (``tau_t = th_t - th0``) and task arithmetic: negation under a control-task
constraint here, addition (and the other merge methods) in :mod:`fastortho.merge`
(docs/design.md section 1; Ilharco et al. 2023, Ortiz-Jimenez et al. 2023).

Everything here is model- and data-agnostic: evaluation is an ``evaluate(model, task) ->
accuracy`` callable supplied by the caller. Result keys follow the task-vectors code:
``"{Dataset}:top1"``, ``"{Dataset}:normalized_top1"``, ``"avg_top1"``, ``"avg_normalized_top1"``.
"""
from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import check_materialized, check_real
from ._files import load_checkpoint
from .linearize import LinearizedModel

FORMAT = "fastortho.TaskVector"


def _floating_state(obj, what: str) -> dict[str, Tensor]:
    """Floating-point tensors of a module (its state_dict) or of a mapping."""
    if isinstance(obj, LinearizedModel):
        raise TypeError(f"{what}: got a LinearizedModel; use TaskVector.from_linearized(lin)")
    if isinstance(obj, nn.Module):
        state = obj.state_dict()
    elif isinstance(obj, Mapping):
        state = obj
    else:
        raise TypeError(f"{what}: expected an nn.Module or a state_dict (mapping name -> tensor), got "
                        f"{type(obj).__name__}")
    return {k: v for k, v in state.items() if isinstance(v, Tensor) and v.is_floating_point()}


def _untie(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, list[str]]]:
    """``(state without aliases, {kept key: [its aliases]})``: a tied parameter appears in a
    state_dict under every name it has, all views of one tensor; it is one entry of a task
    vector (counting it twice would double its norm and its update)."""
    kept, aliases, seen = {}, {}, {}
    for k, v in state.items():
        if v.device.type == "meta":
            kept[k] = v
            continue
        ident = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if ident in seen and v.numel():
            aliases.setdefault(seen[ident], []).append(k)
            continue
        seen[ident] = k
        kept[k] = v
    return kept, aliases


def read_weights(path, what: str = "path") -> dict[str, Tensor]:
    """A state dict from a weights file (:func:`load_checkpoint`) or a Hugging Face model folder
    (:func:`fastortho.hf.read_folder`)."""
    from . import hf

    p = Path(path).expanduser()
    if p.is_dir():
        if not hf.is_model_folder(p):
            raise FileNotFoundError(f"{what}: {p} is a folder without Hugging Face weights (expected config.json "
                                    f"beside {' or '.join(hf.SINGLE_FILES + hf.SHARD_INDEXES)}); pass a weights "
                                    f"file or a model folder")
        return hf.read_folder(p)
    return load_checkpoint(p)


def _pair_clip_layouts(pre: dict, fine: dict, meta: dict) -> tuple[dict, dict, dict]:
    """Two Hugging Face CLIP state dicts in different layouts, on one naming of their image
    tower; anything else as given."""
    import logging

    from . import hf

    lp, lf = hf.clip_layout(pre), hf.clip_layout(fine)
    if lp is None or lf is None or lp == lf:
        return pre, fine, meta
    pre_t, fine_t = hf.image_tower(pre), hf.image_tower(fine)
    extra = sorted(set(fine_t) - set(pre_t))
    frozen = sorted(set(pre_t) - set(fine_t))
    if extra or [k for k in frozen if k != hf.PROJECTION]:
        raise ValueError(f"pretrained_path, finetuned_path: {hf.describe(lp)} and {hf.describe(lf)} whose image "
                         f"towers differ: {len(extra)} tensors only in the fine-tuned (e.g. {extra[:3]}), "
                         f"{len(frozen)} only in the pretrained (e.g. {frozen[:3]}); are they the same backbone?")
    if frozen:
        logging.getLogger("fastortho").warning(
            "fastortho: %s is not in the fine-tuned %s (FusionBench fine-tunes without it): it stays at its "
            "pretrained value and is not part of the task vector", ", ".join(frozen), hf.describe(lf))
        meta["frozen"] = json.dumps(frozen)
    meta.setdefault("layouts", f"{lp} + {lf}")
    return {k: pre_t[k] for k in fine_t}, fine_t, meta


class TaskVector(Mapping[str, Tensor]):
    """``name -> (fine-tuned - pretrained)`` over floating-point tensors, with metadata.

    Arithmetic: ``tv1 + tv2``, ``tv1 - tv2``, ``-tv``, ``c * tv``, ``tv / c``, ``sum(tvs)``;
    the operands must have the same keys and shapes. ``apply_to(pretrained, alpha)`` returns a
    new model (or state_dict) and never changes its input.
    """

    def __init__(self, vector: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None):
        bad = [k for k, v in vector.items() if not (isinstance(v, Tensor) and v.is_floating_point())]
        if bad:
            raise TypeError(f"vector: entries must be floating-point tensors; not so for {bad[:5]}")
        if not vector:
            raise ValueError("vector: a task vector needs at least one tensor")
        check_materialized("vector", vector.items())
        self._vector = {k: v.detach() for k, v in vector.items()}
        self.metadata = {str(k): str(v) for k, v in (metadata or {}).items()}

    # ------------------------------------------------------------------------- building

    @classmethod
    def from_models(cls, pretrained, finetuned, metadata: Mapping[str, str] | None = None) -> TaskVector:
        """From two modules or state_dicts with the same floating-point keys and shapes."""
        pre, pre_tied = _untie(_floating_state(pretrained, "pretrained"))
        fine, fine_tied = _untie(_floating_state(finetuned, "finetuned"))
        tied = pre_tied or fine_tied
        for others in tied.values():  # one side tied, the other not: keep one name on both
            for k in others:
                pre.pop(k, None)
                fine.pop(k, None)
        _same_layout(pre, fine, "pretrained", "finetuned")
        vector = {}
        for k, p in pre.items():
            dtype = torch.promote_types(p.dtype, fine[k].dtype)
            vector[k] = fine[k].to(device=p.device, dtype=dtype) - p.to(dtype)
        meta = dict(metadata or {})
        if tied:
            meta["tied"] = json.dumps(tied)  # apply_to(state_dict) writes the aliases too
        return cls(vector, meta)

    @classmethod
    def from_checkpoints(cls, pretrained_path, finetuned_path, metadata=None) -> TaskVector:
        """From two weights files (safetensors, or torch checkpoints read with
        ``weights_only=True``) or Hugging Face model folders (``config.json`` beside single or
        sharded safetensors: FusionBench's checkpoints). Hugging Face CLIPs in different layouts
        (a ``CLIPModel`` pretrained with ``CLIPVisionModel`` fine-tuned models; transformers-4
        and -5 files) are paired on their image tower (:func:`fastortho.hf.image_tower`); what
        the fine-tuned model lacks of it (``visual_projection``, which FusionBench does not
        tune) stays at its pretrained value and is named in ``metadata["frozen"]``."""
        pre = read_weights(pretrained_path, "pretrained_path")
        fine = read_weights(finetuned_path, "finetuned_path")
        pre, fine, meta = _pair_clip_layouts(pre, fine, dict(metadata or {}))
        return cls.from_models(pre, fine, meta)

    @classmethod
    def from_linearized(cls, lin: LinearizedModel, metadata=None) -> TaskVector:
        """``th - th0`` of a linearized model, keyed by the wrapped model's parameter names."""
        if not isinstance(lin, LinearizedModel):
            raise TypeError(f"lin: expected a fastortho LinearizedModel, got {type(lin).__name__}")
        meta = {"method": "linearized"}
        meta.update(metadata or {})
        return cls(lin.task_vector(), meta)

    @classmethod
    def from_lora(cls, model: nn.Module, metadata=None) -> TaskVector:
        """The dense updates ``s B A`` of a LoRA model (fastortho's or PEFT's adapters)."""
        from .lora import lora_delta_weights

        meta = {"method": "lora"}
        meta.update(metadata or {})
        return cls(lora_delta_weights(model), meta)

    # ------------------------------------------------------------------------- mapping

    def __getitem__(self, key: str) -> Tensor:
        return self._vector[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._vector)

    def __len__(self) -> int:
        return len(self._vector)

    def __repr__(self) -> str:
        n = sum(v.numel() for v in self._vector.values())
        return f"TaskVector({len(self)} tensors, {n:,} values, metadata={self.metadata})"

    # ------------------------------------------------------------------------- arithmetic

    def _combine(self, other, op) -> TaskVector:
        if not isinstance(other, TaskVector):
            return NotImplemented
        _same_layout(self._vector, other._vector, "left operand", "right operand")
        return TaskVector({k: op(v, other[k].to(v.device)) for k, v in self._vector.items()})

    def __add__(self, other):
        return self._combine(other, torch.add)

    def __radd__(self, other):
        if isinstance(other, (int, float)) and other == 0:  # sum() starts from 0
            return self
        return self.__add__(other)

    def __sub__(self, other):
        return self._combine(other, torch.sub)

    def __neg__(self) -> TaskVector:
        return TaskVector({k: -v for k, v in self._vector.items()}, self.metadata)

    def __mul__(self, scalar) -> TaskVector:
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        check_real("scalar", scalar)  # NaN or inf would make every merged weight NaN
        return TaskVector({k: v * scalar for k, v in self._vector.items()}, self.metadata)

    __rmul__ = __mul__

    def __truediv__(self, scalar) -> TaskVector:
        if not isinstance(scalar, (int, float)) or isinstance(scalar, bool):
            return NotImplemented
        return self * (1.0 / scalar)

    def flatten(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """All entries in one vector (in key order)."""
        return torch.cat([v.reshape(-1).to(dtype) for v in self._vector.values()])

    def norm(self) -> float:
        return float(torch.sqrt(sum(v.double().square().sum() for v in self._vector.values())))

    # ------------------------------------------------------------------------- applying

    def apply_to(self, pretrained, alpha: float = 1.0):
        """``pretrained + alpha * tau`` as a NEW object: a deep copy of a module (a
        LinearizedModel gets ``th = th0 + alpha * tau``), or a new state_dict for a mapping.
        Keys of the task vector must exist in ``pretrained`` with the same shapes."""
        alpha = check_real("alpha", alpha)
        if isinstance(pretrained, LinearizedModel):
            out = copy.deepcopy(pretrained)
            base = out.base_values()
            self._check_target(base, "pretrained (LinearizedModel th0)")
            params = dict(out.model.named_parameters())
            with torch.no_grad():
                for k, v in self._vector.items():
                    params[k].copy_(base[k] + alpha * v.to(base[k].device, base[k].dtype))
            return out
        if isinstance(pretrained, nn.Module):
            out = copy.deepcopy(pretrained)
            state = out.state_dict()
            self._check_target(state, "pretrained")
            with torch.no_grad():
                for k, v in self._vector.items():
                    state[k].add_(alpha * v.to(state[k].device, state[k].dtype))  # state_dict tensors alias the copy
            return out
        if isinstance(pretrained, Mapping):
            self._check_target(pretrained, "pretrained")
            out = dict(pretrained)
            for k, v in self._vector.items():
                out[k] = pretrained[k] + alpha * v.to(pretrained[k].device, pretrained[k].dtype)
            for first, others in json.loads(self.metadata.get("tied", "{}")).items():
                for k in others:
                    if k in out and first in out:
                        out[k] = out[first]  # the tied names stay one tensor
            return out
        raise TypeError(f"pretrained: expected an nn.Module, a LinearizedModel or a state_dict, got "
                        f"{type(pretrained).__name__}")

    def _check_target(self, state: Mapping[str, Tensor], what: str) -> None:
        missing = [k for k in self._vector if k not in state]
        if missing:
            raise ValueError(f"{what} lacks {len(missing)} key(s) of the task vector: {missing[:5]}")
        bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in self._vector.items()
               if tuple(state[k].shape) != tuple(v.shape)]
        if bad:
            raise ValueError(f"{what}: shapes differ from the task vector's for {bad[:3]}")

    # ------------------------------------------------------------------------- files

    def save(self, path, metadata: Mapping[str, str] | None = None) -> None:
        """Safetensors with the metadata (e.g. base model, method, regularizer, lambda),
        written atomically (a unique temporary name beside ``path``, then a rename)."""
        from ._files import save_safetensors
        from ._version import __version__

        meta = dict(self.metadata)
        meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
        meta.update(format=FORMAT, fastortho=__version__, tensor_order=json.dumps(list(self._vector)))
        save_safetensors({k: v.contiguous() for k, v in self._vector.items()}, path, meta)

    @classmethod
    def load(cls, path, device: str = "cpu") -> TaskVector:
        """Read a file written by :meth:`save` (safetensors: nothing is unpickled)."""
        from ._files import json_metadata, read_safetensors

        tensors, meta = read_safetensors(path, "path", device)
        if meta.get("format") != FORMAT:
            raise ValueError(f"path: {path} is not a fastortho task-vector file (format={meta.get('format')!r})")
        order = json_metadata(meta, "tensor_order", [], path)  # safetensors sorts keys; keep the saved order
        meta.pop("tensor_order", None)
        if not isinstance(order, list) or sorted(map(str, order)) != sorted(tensors):
            raise ValueError(f"path: the metadata entry 'tensor_order' of {path} does not list the file's "
                             f"{len(tensors)} tensors")
        meta.pop("format")
        return cls({k: tensors[k] for k in order}, meta)


def _same_layout(a: Mapping[str, Tensor], b: Mapping[str, Tensor], name_a: str, name_b: str) -> None:
    only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if only_a or only_b:
        raise ValueError(f"{name_a} and {name_b} have different keys: only in {name_a}: {only_a[:5]}, "
                         f"only in {name_b}: {only_b[:5]}")
    bad = [(k, tuple(a[k].shape), tuple(b[k].shape)) for k in a if tuple(a[k].shape) != tuple(b[k].shape)]
    if bad:
        raise ValueError(f"{name_a} and {name_b} disagree in shape for {bad[:3]}")


# ----------------------------------------------------------------------------- merging

ADDITION_ALPHAS = tuple(round(0.05 * i, 2) for i in range(21))
NEGATION_ALPHAS = tuple(round(0.1 * i, 1) for i in range(31))


def _progress(iterable, desc: str, total: int | None = None, show: bool = True):
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total)


@dataclass
class AdditionResult:
    """A merge at the chosen ``alpha``: ``test`` has the result keys; ``search`` the
    validation curve (alpha -> average absolute and normalized accuracy); ``method`` the merge
    method (:data:`fastortho.merge.METHODS`), ``select`` the rule that chose alpha."""
    alpha: float
    test: dict[str, float]
    search: list[dict[str, float]] = field(default_factory=list)
    method: str = "ta"
    select: str = "normalized"


def _split(task: str, suffix: str | None) -> str:
    return task if not suffix else f"{task}{suffix}"


@dataclass
class NegationResult:
    """Per control threshold (fraction of the control task's zero-shot accuracy): the alpha
    chosen on validation and the test accuracies there; ``search`` is the validation curve."""
    zero_shot_control: float
    choices: dict[float, dict[str, float]]
    search: list[dict[str, float]] = field(default_factory=list)


def task_negation(pretrained, task_vector: TaskVector, evaluate: Callable[[object, str], float], target: str,
                  control: str = "ImageNet", *, alphas: Sequence[float] = NEGATION_ALPHAS,
                  thresholds: Sequence[float] = (0.95, 0.90, 0.80), val_suffix: str | None = "Val",
                  progress: bool = True) -> NegationResult:
    """Forget ``target`` with ``th0 - alpha * tau``: for each threshold, the alpha (searched on
    the validation splits) with the lowest target accuracy whose control accuracy stays at
    least ``threshold`` times the control's zero-shot accuracy; then test accuracies there.
    ``alpha = 0`` (the pretrained model) always qualifies."""
    if not thresholds or any(not (0 < t <= 1) for t in thresholds):
        raise ValueError(f"thresholds: expected fractions in (0, 1], got {thresholds!r}")
    zero_shot = float(evaluate(pretrained, _split(control, val_suffix)))
    search = []
    for alpha in _progress(alphas, f"task negation ({target}): alpha search", show=progress):
        model = task_vector.apply_to(pretrained, -float(alpha))
        search.append({"alpha": float(alpha), f"{target}:top1": float(evaluate(model, _split(target, val_suffix))),
                       f"{control}:top1": float(evaluate(model, _split(control, val_suffix)))})
    choices = {}
    for thr in thresholds:
        ok = [r for r in search if r[f"{control}:top1"] >= thr * zero_shot - 1e-12]
        if not ok:
            raise ValueError(f"no alpha keeps {control} at {thr:.0%} of its zero-shot accuracy "
                             f"(include 0 in alphas)")
        best = min(ok, key=lambda r: (r[f"{target}:top1"], r["alpha"]))
        model = task_vector.apply_to(pretrained, -best["alpha"])
        choices[float(thr)] = {"alpha": best["alpha"], f"{target}:top1": float(evaluate(model, target)),
                               f"{control}:top1": float(evaluate(model, control))}
    return NegationResult(zero_shot, choices, search)


def cosine_matrix(task_vectors: Sequence[Mapping[str, Tensor]] | Mapping[str, Mapping[str, Tensor]]) -> np.ndarray:
    """Pairwise cosine similarity of task vectors (OrthoReg Fig. 5): one GEMM over the
    ``N x P`` matrix of flattened vectors (float64 accumulation)."""
    tvs = (
        list(task_vectors.values())
        if isinstance(task_vectors, Mapping) and not isinstance(task_vectors, TaskVector)
        else list(task_vectors)
    )
    if not tvs:
        raise ValueError("task_vectors: expected at least one task vector")
    keys = list(tvs[0].keys())
    for i, tv in enumerate(tvs[1:], 1):
        _same_layout(tvs[0], tv, "task_vectors[0]", f"task_vectors[{i}]")
    flat = torch.stack([torch.cat([tv[k].reshape(-1).double().cpu() for k in keys]) for tv in tvs])
    gram = flat @ flat.T
    norms = gram.diagonal().sqrt().clamp_min(1e-300)
    return (gram / norms[:, None] / norms[None, :]).numpy()


__all__ = ["ADDITION_ALPHAS", "AdditionResult", "NEGATION_ALPHAS", "NegationResult", "TaskVector", "cosine_matrix",
           "load_checkpoint", "task_negation"]
