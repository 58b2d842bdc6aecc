"""Task arithmetic end to end on synthetic data, in about a minute on a CPU: fine-tune a small
MLP on three tasks with and without OrthoReg, build task vectors, merge them with the
coefficient searched on validation splits, and draw the analyses.

    python examples/task_arithmetic.py [--out docs/images]
"""
import argparse
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

import fastortho as fo
from fastortho import analysis

TASKS = ["Blobs", "Rings", "Stripes"]
CLASSES = 3  # per task; task t owns logits 3t .. 3t+2 (a head per task, as in the papers)


def make_data(t, n, seed):
    """Task t: 3 Gaussian classes whose means differ in a task-specific set of inputs."""
    gen = torch.Generator().manual_seed(1000 * t + seed)
    y = torch.randint(0, CLASSES, (n,), generator=gen)
    means = torch.randn(CLASSES, 32, generator=torch.Generator().manual_seed(t)) * 0.45
    x = means[y] + torch.randn(n, 32, generator=gen)
    return x, y


SPLITS = {f"{name}{suffix}": make_data(t, 512, seed) for t, name in enumerate(TASKS)
          for suffix, seed in (("", 1), ("Val", 2))}


def evaluate(model, split):
    t = TASKS.index(split.removesuffix("Val"))
    x, y = SPLITS[split]
    with torch.no_grad():
        logits = model(x)[:, CLASSES * t:CLASSES * (t + 1)]
    return float((logits.argmax(1) == y).float().mean())


def finetune(pretrained, t, lam, steps=300):
    model = fo.TaskVector({k: torch.zeros_like(v) for k, v in pretrained.state_dict().items()}).apply_to(pretrained)
    base = fo.snapshot(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    x, y = make_data(t, 2048, 0)
    for step in range(steps):
        idx = torch.randint(0, x.shape[0], (128,), generator=torch.Generator().manual_seed(step))
        logits = model(x[idx])[:, CLASSES * t:CLASSES * (t + 1)]
        loss = nn.functional.cross_entropy(logits, y[idx])
        if lam:
            loss = loss + lam * fo.ortho_loss(model, base)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main(out: Path) -> None:
    torch.manual_seed(0)
    pretrained = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(),
                               nn.Linear(128, CLASSES * len(TASKS)))
    results, curves, vectors = {}, {}, {}
    for method, lam in (("fine-tuned", 0.0), ("fine-tuned + OrthoReg", 0.05)):
        tvs = {}
        for t, name in enumerate(tqdm(TASKS, desc=f"fine-tuning ({method})")):
            tvs[name] = fo.TaskVector.from_models(
                pretrained,
                finetune(pretrained, t, lam),
                metadata={"method": "nonlinear", "regularizer": "orthoreg" if lam else "none", "lambda": lam},
            )
        merged = fo.task_addition(pretrained, tvs, evaluate, progress=False)
        print(f"{method}: alpha={merged.alpha:.2f} " + " ".join(f"{k}={v:.3f}" for k, v in merged.test.items()))
        results[f"merged, {method}"] = {t: merged.test[f"{t}:top1"] for t in TASKS}
        curves[method] = merged.search
        vectors[method] = tvs
    results = {"zero-shot": {t: evaluate(pretrained, t) for t in TASKS}, **results}
    out.mkdir(parents=True, exist_ok=True)
    run = "nonlinear, no regularizer, 3 synthetic tasks"
    m, _ = analysis.plot_cosine_matrix(vectors["fine-tuned"], out / "cosine.png", run=run)
    print("cosine similarity of the task vectors:\n", m.round(3))
    analysis.plot_accuracy_radar(results, out / "radar.png", title="per-task test accuracy",
                                 run="nonlinear, without and with OrthoReg (lambda 0.05), 3 synthetic tasks")
    analysis.plot_alpha_sensitivity(curves, out / "alpha_sensitivity.png", run="3 synthetic tasks")
    tv = vectors["fine-tuned"]
    xs = (SPLITS[TASKS[0]][0], SPLITS[TASKS[1]][0])
    head = lambda model, x, t: model(x)[:, CLASSES * t:CLASSES * (t + 1)]  # noqa: E731
    xi = analysis.disentanglement_error(pretrained, tv[TASKS[0]], tv[TASKS[1]], xs, forward=head)
    analysis.plot_disentanglement_error(xi, analysis.DEFAULT_GRID, out / "disentanglement.png", labels=TASKS[:2],
                                        run=run)
    angles = analysis.weight_angles(tv[TASKS[0]])
    analysis.plot_angle_histograms(angles, out / "angles.png", run=f"task vector of {TASKS[0]}, {run}",
                                   title="angles between the columns of each layer's update")
    print(f"plots written to {out}/")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("task_arithmetic_plots"))
    main(parser.parse_args().out)
