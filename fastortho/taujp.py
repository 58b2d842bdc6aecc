"""The tau-Jacobian product (Yoshida et al. 2024): ``||J(x) tau||^2`` of a linearized model on
other tasks' inputs, as a penalty (strict, Eq. 10, or cyclical, Eq. 11) and as the pairwise
metric between task vectors (Eq. 9, Fig. 6)."""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ._checks import check_real
from .dual import Dual, tangent_of
from .linearize import LinearizedModel, linearize, unwrap

REDUCTIONS = ("sum_sq", "mean_norm")
TASK_REDUCTIONS = ("sum", "mean")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction: expected one of {REDUCTIONS} ('sum_sq': per-sample squared norms "
                         f"summed, the paper's Eq. 10; 'mean_norm': mean per-sample L2 norm, the released "
                         f"code), got {reduction!r}")


def _single_tensor(out, what: str) -> Tensor:
    if not isinstance(out, Tensor):
        raise TypeError(f"{what}: tau-Jp needs a model whose output is one tensor (batch first), got "
                        f"{type(out).__name__}; wrap the model to return the features to regularize")
    return out


def reduce_tangent(tangent: Tensor, reduction: str) -> Tensor:
    """``sum_i ||t_i||^2`` ("sum_sq") or ``mean_i ||t_i||`` ("mean_norm") over the rows of a
    batch-first tangent (half precision reduced in fp32)."""
    rows = tangent.flatten(1)
    if rows.dtype in (torch.float16, torch.bfloat16):
        rows = rows.float()
    if reduction == "sum_sq":
        return rows.square().sum()
    # vector_norm's gradient at a zero row is zero (sqrt of a sum of squares would give NaN
    # there, and tau = 0 at the first step of fine-tuning)
    return torch.linalg.vector_norm(rows, dim=1).mean()


def taujp_loss(lin: LinearizedModel, x_other: Tensor, reduction: str = "sum_sq") -> Tensor:
    """``||J(x_other) tau||^2`` with ``tau = th - th0`` of the linearized model ``lin`` (or a
    DistributedDataParallel wrapping one): per-sample squared norms summed (``"sum_sq"``,
    paper Eq. 10) or the mean per-sample L2 norm (``"mean_norm"``, the released code).
    Differentiable w.r.t. ``lin``'s parameters."""
    _check_reduction(reduction)
    _, run = unwrap(lin)
    tangent = _single_tensor(run(x_other, return_tangent=True)[1], "lin")
    return reduce_tangent(tangent, reduction)


def _first_tensor(batch) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("images", "image", "pixel_values", "x", "input"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
    raise TypeError(f"other_batches: each task must yield input tensors (or (inputs, labels) tuples), got "
                    f"{type(batch).__name__}")


class _TaskSource:
    """A fixed batch (a tensor) or an iterable re-started when exhausted (a DataLoader)."""

    def __init__(self, source, index: int):
        if isinstance(source, Tensor):
            self.fixed, self.iterable = source, None
        elif isinstance(source, Iterable):
            self.fixed, self.iterable = None, source
        else:
            raise TypeError(f"other_batches[{index}]: expected a tensor or an iterable of batches, got "
                            f"{type(source).__name__}")
        self.index = index
        self._it = None
        self.drawn = 0  # batches taken so far (the resumable position)

    def next(self) -> Tensor:
        if self.fixed is not None:
            return self.fixed
        if self._it is None:
            self._it = iter(self.iterable)
        try:
            batch = next(self._it)
        except StopIteration:
            self._it = iter(self.iterable)
            try:
                batch = next(self._it)
            except StopIteration:
                raise ValueError(f"other_batches[{self.index}]: the iterable yields no batch") from None
        self.drawn += 1
        return _first_tensor(batch)

    def resume_at(self, drawn: int) -> None:
        """Continue as if ``drawn`` batches had been taken: a source with ``seek`` (e.g.
        :class:`fastortho.train.InputStream`) starts there; any other iterable is read
        forward that far (exact when it yields the same batches each time it is iterated)."""
        self._it, self.drawn = None, 0
        if self.fixed is not None or drawn == 0:
            self.drawn = drawn
            return
        if hasattr(self.iterable, "seek"):
            self.iterable.seek(drawn)
            self._it, self.drawn = iter(self.iterable), drawn
            self.iterable.seek(0)  # a later restart of the iterable begins at its start again
            return
        for _ in range(drawn):
            self.next()


class TauJpRegularizer:
    """``lam * sum_{t in T_orth} ||J(x_t) tau||^2`` for a linearized model being trained (or the
    released code's form, by name: ``reduction="mean_norm", task_reduction="mean"``).

    Args:
        lin: the :class:`LinearizedModel`, or a DistributedDataParallel wrapping it (the
            pass then goes through DDP's forward, so gradients are synchronized).
        other_batches: one source per other task: a tensor (the same batch every step) or an
            iterable of batches (a DataLoader; ``(inputs, labels)`` batches are fine, labels
            are ignored), restarted when exhausted.
        mode: "strict" (paper Eq. 10: every other task every step, their batches concatenated
            into one dual pass) or "cyclical" (Eq. 11: one other task per optimizer step, in
            rotation; the task is ``step % n_tasks`` as in the released code).
        lam: the weight ``lambda``.
        reduction: "sum_sq" (Eq. 10) or "mean_norm" (the released code), per task.
        task_reduction: how strict mode combines the other tasks: "sum" (Eq. 10) or "mean"
            (the released ``finetune_reg_strict.py``: ``torch.stack(penalties).mean()``).
        accumulation: calls per optimizer step (gradient accumulation): the cyclical task
            moves on once per ``accumulation`` calls, so every micro-batch of a step sees the
            same task, as in the released code.

    ``reg()`` returns the weighted penalty of this step. ``reg(x)`` returns
    ``(lin(x), penalty)`` from ONE dual pass over ``x`` and the other tasks' batches together.
    """

    def __init__(self, lin: LinearizedModel, other_batches: Sequence, mode: str = "cyclical",
                 lam: float = 1.0, reduction: str = "sum_sq", task_reduction: str = "sum", accumulation: int = 1):
        self.lin, self._run = unwrap(lin)
        if mode not in ("strict", "cyclical"):
            raise ValueError(f"mode: expected 'strict' or 'cyclical', got {mode!r}")
        _check_reduction(reduction)
        if task_reduction not in TASK_REDUCTIONS:
            raise ValueError(f"task_reduction: expected one of {TASK_REDUCTIONS} ('sum': the paper's Eq. 10; "
                             f"'mean': the released strict code), got {task_reduction!r}")
        if isinstance(accumulation, bool) or not isinstance(accumulation, int) or accumulation < 1:
            raise ValueError(f"accumulation: expected a positive integer (calls per optimizer step), got "
                             f"{accumulation!r}")
        if isinstance(other_batches, Tensor) or not isinstance(other_batches, Sequence) or not other_batches:
            raise ValueError("other_batches: expected a non-empty list with one batch source per other task")
        self.sources = [_TaskSource(s, i) for i, s in enumerate(other_batches)]
        self.mode, self.lam = mode, check_real("lam", lam, minimum=0)
        self.reduction, self.task_reduction = reduction, task_reduction
        self.accumulation = accumulation
        self.calls = 0

    @property
    def step(self) -> int:
        """The optimizer step this regularizer is at (calls // accumulation)."""
        return self.calls // self.accumulation

    def state_dict(self) -> dict:
        """Where the regularizer is: its call count and each source's position (integers:
        fit for a ``weights_only`` checkpoint)."""
        return {"calls": self.calls, "drawn": [s.drawn for s in self.sources]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s state: the cyclical task and every other task's
        stream go on where they were, so a resumed run sees the batches an uninterrupted one
        would."""
        drawn = state.get("drawn") if isinstance(state, dict) else None
        calls = state.get("calls") if isinstance(state, dict) else None
        if not isinstance(calls, int) or not isinstance(drawn, list) or len(drawn) != len(self.sources) \
                or not all(isinstance(d, int) and d >= 0 for d in drawn):
            raise ValueError(f"state: expected {{'calls': int, 'drawn': [{len(self.sources)} non-negative ints]}} "
                             f"from TauJpRegularizer.state_dict(), got {state!r}")
        self.calls = calls
        for source, position in zip(self.sources, drawn):
            source.resume_at(position)

    def _batches(self) -> list[Tensor]:
        if self.mode == "strict":
            return [s.next() for s in self.sources]
        return [self.sources[self.step % len(self.sources)].next()]

    def __call__(self, x: Tensor | None = None):
        others = self._batches()
        self.calls += 1
        rows = [b.shape[0] for b in others]
        batch = torch.cat(([x] if x is not None else []) + others) if (x is not None or len(others) > 1) else others[0]
        primal, tangent = self._run(batch, return_tangent=True)
        tangent = _single_tensor(tangent, "lin")
        n = 0 if x is None else x.shape[0]
        penalty = sum(reduce_tangent(t, self.reduction) for t in torch.split(tangent[n:], rows))
        if self.task_reduction == "mean":
            penalty = penalty / len(rows)
        penalty = penalty * self.lam
        if x is None:
            return penalty
        return primal[:n] + tangent[:n], penalty


def _stack_task_vectors(task_vectors: Sequence[Mapping[str, Tensor]], names, like: Mapping[str, Tensor]):
    if not task_vectors:
        raise ValueError("task_vectors: expected at least one task vector")
    stacked = {}
    for n in names:
        parts = []
        for i, tv in enumerate(task_vectors):
            if n not in tv:
                raise ValueError(f"task_vectors[{i}] has no entry for parameter {n!r}")
            t = tv[n]
            if tuple(t.shape) != tuple(like[n].shape):
                raise ValueError(f"task_vectors[{i}][{n!r}]: shape {tuple(t.shape)} does not match the model's "
                                 f"{tuple(like[n].shape)}")
            parts.append(t.to(dtype=like[n].dtype, device=like[n].device))
        stacked[n] = torch.stack(parts)
    extra = set().union(*[set(tv) for tv in task_vectors]) - set(names)
    if extra:
        raise ValueError(f"task_vectors: entries for parameters the model does not train: {sorted(extra)[:5]}")
    return stacked


@torch.no_grad()
def taujp_matrix(model: nn.Module, task_vectors: Sequence[Mapping[str, Tensor]], inputs: Sequence[Tensor], *,
                 symmetric: bool = True, chunk_size: int | None = None) -> Tensor:
    """Pairwise tau-Jp (paper Eq. 9, Fig. 6) of task vectors over tasks' inputs.

    ``D[a, b] = mean_{x in inputs[b]} ||J(x) tau_a||^2`` with ``J`` the Jacobian at the
    pretrained weights. Each input batch takes ONE primal pass carrying every task vector's
    tangent at once (batched JVPs, ``torch.func.vmap`` over the tangents; ``chunk_size``
    bounds how many at a time). With ``symmetric=True`` (needs as many task vectors as input
    sets) returns ``tauJp(a, b) = (D[a, b] + D[b, a]) / 2``; otherwise ``D``.

    Args:
        model: the pretrained model (its current trainable parameters are ``th0``; task
            vectors are keyed by its parameter names), or a :class:`LinearizedModel` (its
            ``th0`` is used).
        task_vectors: mappings ``name -> tau`` over the trainable parameters.
        inputs: one batch-first input tensor per task.
    """
    lin = model if isinstance(model, LinearizedModel) else linearize(model)
    if not inputs:
        raise ValueError("inputs: expected at least one batch of inputs")
    if symmetric and len(inputs) != len(task_vectors):
        raise ValueError(f"symmetric=True pairs task vector a with inputs a: got {len(task_vectors)} task "
                         f"vectors and {len(inputs)} input sets (pass symmetric=False for the directed matrix)")
    base = lin.base_values()
    taus = _stack_task_vectors(task_vectors, lin.names, base)
    model_ = lin.model
    device = next(iter(base.values())).device

    def tangent_for(x):
        def one(tau):
            params = {n: Dual(base[n], tau[n]) for n in lin.names}
            out = torch.func.functional_call(model_, params, (x,))
            t = tangent_of(out)
            t = t if t is not None else torch.zeros_like(out)
            return reduce_tangent(t, "sum_sq") / t.shape[0]
        return torch.func.vmap(one, chunk_size=chunk_size)(taus)

    columns = [tangent_for(x.to(device)) for x in inputs]
    directed = torch.stack(columns, dim=1)  # [task vector, input set]
    return 0.5 * (directed + directed.T) if symmetric else directed


__all__ = ["REDUCTIONS", "TauJpRegularizer", "reduce_tangent", "taujp_loss", "taujp_matrix"]
