"""The analyses of the papers, as arrays and as PNG plots: task-vector cosine similarity
(OrthoReg Fig. 5), the pairwise tau-Jp matrix (tau-Jp Fig. 6), the weight-disentanglement
error on an ``(a1, a2)`` grid (linear-layers paper Fig. 4), angles between the weight vectors
of each layer's update (OrthoReg Fig. 7), the accuracy radar (Fig. 4) and the lambda and
alpha sensitivity curves (Fig. 6a and 6b).

Plots are drawn with matplotlib's object API on an Agg canvas (no global backend is set),
written to ``path`` and the path returned.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ._files import atomic_path
from .linearize import LinearizedModel
from .task_vectors import TaskVector, cosine_matrix

DEFAULT_GRID = tuple(np.linspace(-2.0, 2.0, 15).round(6))


# ----------------------------------------------------------------------------- disentanglement

class _Weights:
    """A working copy of a model whose tuned tensors are set to ``th0 + sum_i c_i tau_i``."""

    def __init__(self, pretrained, taus: Sequence[Mapping[str, Tensor]]):
        self.model = copy.deepcopy(pretrained)
        if isinstance(self.model, LinearizedModel):
            base = self.model.base_values()
            targets = dict(self.model.model.named_parameters())
        elif isinstance(self.model, nn.Module):
            targets = self.model.state_dict()
            base = {k: targets[k].detach().clone() for k in taus[0]}
        else:
            raise TypeError(f"pretrained: expected an nn.Module or a LinearizedModel, got {type(pretrained).__name__}")
        for i, tau in enumerate(taus):
            TaskVector(tau)._check_target(base if isinstance(self.model, LinearizedModel) else targets,
                                         f"pretrained (for task vector {i})")
        self.base, self.targets, self.taus = base, targets, taus

    @torch.no_grad()
    def set(self, coefs: Sequence[float]) -> nn.Module:
        for k, b in self.base.items():
            if k not in self.taus[0]:
                continue
            value = b.clone()
            for c, tau in zip(coefs, self.taus):
                if c:
                    value += c * tau[k].to(value.device, value.dtype)
            self.targets[k].copy_(value)
        return self.model


def _subset(x: Tensor, n: int, seed: int) -> Tensor:
    if x.shape[0] <= n:
        return x
    idx = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx.to(x.device)]


def _distance(kind):
    if callable(kind):
        return kind
    if kind == "prediction":
        return lambda a, b: (a.argmax(-1) != b.argmax(-1)).double()
    if kind == "l2":
        return lambda a, b: (a - b).flatten(1).double().norm(dim=1)
    raise ValueError(f"distance: expected 'prediction', 'l2' or a callable (out_a, out_b) -> per-sample, got {kind!r}")


@torch.no_grad()
def disentanglement_error(pretrained, tau1: Mapping[str, Tensor], tau2: Mapping[str, Tensor],
                          inputs: tuple[Tensor, Tensor], *, grid: Sequence[float] = DEFAULT_GRID,
                          forward: Callable | None = None, distance="prediction", max_points: int = 2048,
                          seed: int = 0, progress: bool = True) -> np.ndarray:
    """``xi(a1, a2) = sum_t E_{x in X_t} dist(f_t(x; th0 + a_t tau_t), f_t(x; th0 + a1 tau1 + a2 tau2))``
    on ``grid x grid`` (docs/design.md section 1; linear-layers paper Eq. 5, Fig. 4).

    Args:
        pretrained: the model at ``th0`` (never modified), or a :class:`LinearizedModel`, for
            which the grid is pure algebra on ``f0 + a1 J tau1 + a2 J tau2`` (one primal pass
            and two tangents per task, instead of one forward per grid point).
        inputs: test inputs of task 1 and task 2; a random subset of ``max_points`` of each.
        forward: ``forward(model, x, t) -> outputs`` for task ``t`` (0 or 1), e.g. to apply that
            task's head; default ``model(x)``.
        distance: "prediction" (argmax disagreement, for classifiers), "l2", or a callable.
    Returns ``xi`` as a ``[len(grid), len(grid)]`` array indexed ``[a1, a2]``.
    """
    dist = _distance(distance)
    xs = [_subset(x, max_points, seed + t) for t, x in enumerate(inputs)]
    grid = [float(a) for a in grid]
    taus = [tau1, tau2]
    xi = np.zeros((len(grid), len(grid)))
    if isinstance(pretrained, LinearizedModel) and forward is None:
        for t, x in enumerate(xs):
            f0, j1 = pretrained.dual(x, taus=_as_params(pretrained, tau1))
            _, j2 = pretrained.dual(x, taus=_as_params(pretrained, tau2))
            jt = (j1, j2)[t]
            for i, a1 in enumerate(grid):
                for j, a2 in enumerate(grid):
                    single = f0 + (a1, a2)[t] * jt
                    both = f0 + a1 * j1 + a2 * j2
                    xi[i, j] += float(dist(single, both).mean())
        return xi
    fwd = forward or (lambda model, x, t: model(x))
    work = _Weights(pretrained, taus)
    singles = {}
    for t, x in enumerate(xs):
        for a in grid:
            coefs = [a, 0.0] if t == 0 else [0.0, a]
            singles[t, a] = fwd(work.set(coefs), x, t)
    points = [(i, j) for i in range(len(grid)) for j in range(len(grid))]
    iterator = points
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(points, desc="disentanglement error grid")
    for i, j in iterator:
        model = work.set([grid[i], grid[j]])
        xi[i, j] = sum(float(dist(singles[t, (grid[i], grid[j])[t]], fwd(model, x, t)).mean())
                       for t, x in enumerate(xs))
    return xi


def _as_params(lin: LinearizedModel, tau: Mapping[str, Tensor]) -> dict[str, Tensor]:
    base = lin.base_values()
    missing = [n for n in lin.names if n not in tau]
    if missing:
        raise ValueError(f"task vector lacks parameters the linearized model trains: {missing[:5]}")
    return {n: tau[n].to(base[n].device, base[n].dtype) for n in lin.names}


# ----------------------------------------------------------------------------- weight angles

def vector_angles(delta: Tensor) -> np.ndarray:
    """Angles (degrees) between every pair of the vectors whose Gram OrthoReg regularizes:
    the columns of ``delta`` if ``out >= in``, else its rows (``k (k - 1) / 2`` values)."""
    if delta.dim() != 2:
        raise ValueError(f"delta: expected a 2-D tensor, got shape {tuple(delta.shape)}")
    x = delta.detach().double().cpu()
    vecs = x.T if x.shape[0] >= x.shape[1] else x  # k vectors, one per row
    unit = vecs / vecs.norm(dim=1, keepdim=True).clamp_min(1e-300)
    cos = (unit @ unit.T).clamp(-1.0, 1.0)
    iu = torch.triu_indices(cos.shape[0], cos.shape[0], offset=1)
    return torch.rad2deg(torch.arccos(cos[iu[0], iu[1]])).numpy()


def weight_angles(
    task_vector: Mapping[str, Tensor], layers: Callable[[str], bool] | None = None
) -> dict[str, np.ndarray]:
    """:func:`vector_angles` of every 2-D entry of a task vector (``layers(name)`` filters)."""
    out = {k: vector_angles(v) for k, v in task_vector.items()
           if v.dim() == 2 and min(v.shape) > 1 and (layers is None or layers(k))}
    if not out:
        raise ValueError("task_vector: no 2-D entry (with at least two vectors) to measure")
    return out


# ----------------------------------------------------------------------------- plots

def _figure(width=6.0, height=5.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path, "path") as tmp:  # a killed plot never leaves half a PNG
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    return path


def _titled(what: str, run: str) -> str:
    """A figure's title: what it shows, then the run it comes from (mode, regularizer,
    lambda, model) so that a PNG read on its own still says where it came from."""
    return f"{what}\n{run}" if run else what


def _text_colour(rgba) -> str:
    """Black or white, whichever reads better on a cell of colour ``rgba`` (WCAG relative
    luminance of the sRGB colour; 0.179 is where both contrasts are equal)."""
    def linear(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (linear(c) for c in rgba[:3])
    return "black" if 0.2126 * r + 0.7152 * g + 0.0722 * b > 0.179 else "white"


def plot_matrix(matrix, labels: Sequence[str], path, *, title: str = "", cmap: str = "viridis",
                fmt: str = ".2f", colorbar_label: str = "") -> Path:
    """A labelled heatmap with the values written in the cells (in black or white by the
    cell's luminance)."""
    m = np.asarray(matrix, dtype=float)
    if m.ndim != 2 or m.shape[0] != len(labels) or m.shape[1] != len(labels):
        raise ValueError(f"matrix: expected a {len(labels)} x {len(labels)} array for the labels, got {m.shape}")
    fig = _figure(max(5.5, 1.6 + 0.7 * len(labels)), max(4.5, 1.2 + 0.6 * len(labels)))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap=cmap)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            ax.text(j, i, format(m[i, j], fmt), ha="center", va="center", fontsize=8,
                    color=_text_colour(im.cmap(im.norm(m[i, j]))))
    fig.colorbar(im, ax=ax, label=colorbar_label)
    ax.set_title(title)
    return _save(fig, path)


def run_label(metadata: Mapping[str, str]) -> str:
    """``"linear, orthoreg, lambda 0.1, ViT-B-32"`` from a task vector's metadata (the parts it
    has): what a figure's title names."""
    parts = [metadata.get("mode"), metadata.get("regularizer")]
    if metadata.get("regularizer") not in (None, "none") and metadata.get("lambda") is not None:
        parts.append(f"lambda {metadata['lambda']}")
    parts.append(metadata.get("model") or metadata.get("benchmark"))
    return ", ".join(str(p) for p in parts if p)


def plot_cosine_matrix(task_vectors: Mapping[str, Mapping[str, Tensor]], path, *, run: str = ""
                       ) -> tuple[np.ndarray, Path]:
    """Cosine similarity of named task vectors and its heatmap (OrthoReg Fig. 5); ``run``
    (e.g. :func:`run_label`) goes under the title."""
    m = cosine_matrix(task_vectors)
    return m, plot_matrix(m, list(task_vectors), path, title=_titled("task-vector cosine similarity", run),
                          cmap="Blues", colorbar_label="cosine similarity")


def plot_taujp_matrix(matrix, labels: Sequence[str], path, *, run: str = "") -> Path:
    """Heatmap of :func:`fastortho.taujp_matrix` (tau-Jp paper Fig. 6)."""
    return plot_matrix(matrix, labels, path, title=_titled("pairwise tau-Jp", run), cmap="magma", fmt=".2g",
                       colorbar_label="tau-Jp (mean squared norm of J tau)")


def plot_disentanglement_error(xi, grid: Sequence[float], path, *, labels=("task 1", "task 2"), run: str = "") -> Path:
    """``xi(a1, a2)`` as a heatmap over the coefficient grid (linear-layers paper Fig. 4), with
    the pretrained point and the usual search box ``[0, 1]^2`` marked."""
    xi = np.asarray(xi, dtype=float)
    g = np.asarray(grid, dtype=float)
    fig = _figure(5.2, 4.5)
    ax = fig.add_subplot()
    step = (g[-1] - g[0]) / max(len(g) - 1, 1)
    extent = (g[0] - step / 2, g[-1] + step / 2, g[0] - step / 2, g[-1] + step / 2)
    im = ax.imshow(xi.T, origin="lower", extent=extent, cmap="RdBu_r", aspect="auto")
    ax.plot([0], [0], marker="x", color="red", markersize=9, linestyle="none", label="pretrained")
    ax.plot([0, 1, 1, 0, 0], [0, 0, 1, 1, 0], color="red", linewidth=1, label="search box [0, 1]^2")
    ax.set_xlabel(f"coefficient alpha of {labels[0]}")
    ax.set_ylabel(f"coefficient alpha of {labels[1]}")
    ax.set_title(_titled("weight-disentanglement error", run))
    ax.legend(fontsize=8, loc="upper right")
    fig.colorbar(im, ax=ax, label="disentanglement error xi")
    return _save(fig, path)


def plot_angle_histograms(angles: Mapping[str, np.ndarray], path, *, max_layers: int = 12, bins: int = 60,
                          run: str = "", title: str = "pairwise angles per layer") -> Path:
    """One histogram of pairwise angles per layer (up to ``max_layers``, evenly picked); the
    red line marks 90 degrees (orthogonal)."""
    names = list(angles)
    if len(names) > max_layers:
        names = [names[int(i)] for i in np.linspace(0, len(names) - 1, max_layers)]
    cols = min(4, len(names))
    rows = math.ceil(len(names) / cols)
    fig = _figure(3.2 * cols, 2.4 * rows)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.hist(angles[name], bins=bins, range=(0, 180), color="tab:blue")
        ax.axvline(90, color="red", linewidth=0.8, label="90 degrees (orthogonal)")
        if i == 0:
            ax.legend(fontsize=8, loc="upper left")
        ax.set_title(name if len(name) <= 36 else "..." + name[-33:], fontsize=9)
        ax.set_xlabel("angle (degrees)", fontsize=9)
        ax.set_ylabel("pairs", fontsize=9)
        ax.tick_params(labelsize=8)
    fig.suptitle(_titled(title, run), fontsize=11)
    return _save(fig, path)


def plot_accuracy_radar(accuracies: Mapping[str, Mapping[str, float]], path, *, title: str = "per-task accuracy",
                        run: str = "") -> Path:
    """Per-task accuracy of several methods on a radar chart (OrthoReg Fig. 4); the
    ``accuracies`` are ``{method: {task: accuracy}}`` over the same tasks (fractions in
    [0, 1]). With fewer than three tasks a radar has no area: grouped bars are drawn instead."""
    methods = list(accuracies)
    if not methods:
        raise ValueError("accuracies: expected {method: {task: accuracy}}")
    tasks = list(accuracies[methods[0]])
    for m in methods:
        if list(accuracies[m]) != tasks:
            raise ValueError(f"accuracies[{m!r}]: expected the tasks {tasks}, got {list(accuracies[m])}")
    if len(tasks) < 3:
        fig = _figure(1.5 + 1.6 * len(tasks), 4.2)
        ax = fig.add_subplot()
        width = 0.8 / len(methods)
        for i, m in enumerate(methods):
            ax.bar(np.arange(len(tasks)) + (i - (len(methods) - 1) / 2) * width,
                   [100 * accuracies[m][t] for t in tasks], width, label=m)
        ax.set_xticks(range(len(tasks)), tasks)
        ax.set_ylabel("top-1 accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(_titled(f"{title} (bars: a radar needs 3 or more tasks)", run), fontsize=10)
        ax.legend(fontsize=8)
        return _save(fig, path)
    angles = np.linspace(0, 2 * np.pi, len(tasks), endpoint=False).tolist()
    fig = _figure(6.0, 6.0)
    ax = fig.add_subplot(projection="polar")
    for m in methods:
        vals = [100 * accuracies[m][t] for t in tasks]
        ax.plot(angles + angles[:1], vals + vals[:1], label=m)
        ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.1)
    ax.set_xticks(angles, tasks)
    ax.set_ylim(0, 100)
    # radial labels between the first two spokes, not over one
    ax.set_rlabel_position(math.degrees(angles[1]) / 2)
    ax.tick_params(axis="y", labelsize=8)
    ax.text(angles[1] / 2, 112, "top-1 accuracy (%)", fontsize=8, ha="center", va="center", color="0.3")
    ax.legend(loc="lower right", bbox_to_anchor=(1.2, -0.12), fontsize=8)
    ax.set_title(_titled(title, run), fontsize=10, pad=18)
    return _save(fig, path)


AXIS_NAMES = {"avg_normalized_top1": "average normalized accuracy", "avg_top1": "average top-1 accuracy"}


def plot_alpha_sensitivity(curves: Mapping[str, Sequence[Mapping[str, float]] | tuple], path, *,
                           key: str = "avg_normalized_top1", split: str = "validation", run: str = "") -> Path:
    """Merged-model accuracy against the task-addition coefficient per method (OrthoReg Fig.
    6b). Each curve is an :class:`~fastortho.task_vectors.AdditionResult`'s ``search`` list
    (measured on the validation splits: ``split`` says which) or ``(alphas, values)``; each
    curve's best alpha, the one task addition picks, is marked. Its value is a validation
    number: the test accuracy at that alpha is the one the tables report."""
    fig = _figure(6.0, 4.3)
    ax = fig.add_subplot()
    for name, curve in curves.items():
        if isinstance(curve, tuple):
            xs, ys = curve
        else:
            xs, ys = [r["alpha"] for r in curve], [r[key] for r in curve]
        ys = [100 * y for y in ys]
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=name)
        best = int(np.argmax(ys))  # the first maximum: task_addition's choice on ties
        ax.plot([xs[best]], [ys[best]], marker="*", markersize=13, color=line.get_color(), linestyle="none",
                markeredgecolor="black", label=f"{name}: chosen alpha {xs[best]:.2f}")
    ax.set_xlabel("task-addition coefficient alpha")
    ax.set_ylabel(f"{AXIS_NAMES.get(key, key)} (%), {split} splits")
    ax.set_title(_titled(f"task addition: accuracy against alpha ({split})", run), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_lambda_sensitivity(rows: Sequence[Mapping], path, *, select: str = "absolute", run: str = "") -> Path:
    """Merged absolute accuracy against the regularization strength lambda (OrthoReg Fig. 6a):
    one panel per regularizer, one colour per (fine-tuning mode, merge method); solid lines are
    the validation splits (what chooses lambda), dashed the test splits, a star the chosen
    lambda, and a dotted line the same mode and method without the regularizer. ``rows`` are
    ``fastortho-ablate``'s table.csv rows: ``mode, reg, lam, merge, abs, val_abs, chosen``
    (``reg == "none"`` rows are the baselines). A log axis; a lambda of 0 puts it in symlog."""
    regs = sorted({r["reg"] for r in rows if r["reg"] != "none"})
    if not regs:
        raise ValueError("rows: expected runs with a regularizer (reg other than 'none')")
    fig = _figure(5.2 * len(regs), 6.0)
    palette = [f"C{i}" for i in range(10)]
    for i, reg in enumerate(regs):
        ax = fig.add_subplot(1, len(regs), i + 1)
        curves = sorted({(r["mode"], r["merge"]) for r in rows if r["reg"] == reg})
        lams = sorted({float(r["lam"]) for r in rows if r["reg"] == reg})
        for j, (mode, method) in enumerate(curves):
            colour = palette[j % len(palette)]
            mine = sorted((r for r in rows if (r["reg"], r["mode"], r["merge"]) == (reg, mode, method)),
                          key=lambda r: float(r["lam"]))
            xs = [float(r["lam"]) for r in mine]
            label = f"{mode}, {method}"
            ax.plot(xs, [100 * float(r["val_abs"]) for r in mine], marker="o", markersize=3, color=colour,
                    label=label)
            ax.plot(xs, [100 * float(r["abs"]) for r in mine], linestyle="--", marker="x", markersize=3,
                    color=colour)
            chosen = [r for r in mine if str(r.get("chosen")) in ("True", "true", "1")]
            for r in chosen:
                ax.plot([float(r["lam"])], [100 * float(r["val_abs"])], marker="*", markersize=13, color=colour,
                        markeredgecolor="black", linestyle="none")
            base = [r for r in rows if (r["reg"], r["mode"], r["merge"]) == ("none", mode, method)]
            if base:
                ax.axhline(100 * float(base[0]["abs"]), color=colour, linestyle=":", linewidth=1)
        if lams and lams[0] <= 0:
            positive = [x for x in lams if x > 0]
            ax.set_xscale("symlog", linthresh=positive[0] if positive else 1.0)
        else:
            ax.set_xscale("log")
        ax.set_xlabel(f"regularization strength lambda ({reg})")
        ax.set_ylabel("merged model: average top-1 accuracy (%)")
        ax.set_title(f"{reg}: star = lambda chosen by {select} validation accuracy\n"
                     "solid: validation, dashed: test, dotted: no regularizer (test)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, title="mode, merge method", title_fontsize=7, loc="upper center",
                  bbox_to_anchor=(0.5, -0.16), ncol=2)
    fig.suptitle(_titled("merged accuracy against lambda", run), fontsize=11)
    return _save(fig, path)


__all__ = ["AXIS_NAMES", "DEFAULT_GRID", "disentanglement_error", "plot_accuracy_radar", "plot_alpha_sensitivity",
           "plot_lambda_sensitivity",
           "plot_angle_histograms", "plot_cosine_matrix", "plot_disentanglement_error", "plot_matrix",
           "plot_taujp_matrix", "run_label", "vector_angles", "weight_angles"]
