"""The papers' figures as people read them (issue 21, items 7-10): every figure names its run in
the title, labels its axes in words, has a legend where there are several series, writes
cell values in a colour that reads on the cell, and marks the chosen alpha."""
import numpy as np
import pytest
import torch

import fastortho as fo
from fastortho import analysis

pytest.importorskip("matplotlib")

RUN = "linear, orthoreg, lambda 0.1, ViT-B-32"


@pytest.fixture()
def figures(monkeypatch):
    """The figures the plot functions save (the files are written as usual)."""
    saved = []
    original = analysis._save

    def keep(fig, path):
        saved.append(fig)
        return original(fig, path)
    monkeypatch.setattr(analysis, "_save", keep)
    return saved


def texts(fig):
    """Every title (axes and figure), axis label and legend entry of a figure."""
    out = {"titles": [ax.get_title() for ax in fig.axes] + ([fig._suptitle.get_text()] if fig._suptitle else []),
           "xlabels": [ax.get_xlabel() for ax in fig.axes], "ylabels": [ax.get_ylabel() for ax in fig.axes],
           "legend": [t.get_text() for ax in fig.axes if ax.get_legend() for t in ax.get_legend().get_texts()]}
    return out


def luminance(rgba):
    def linear(c):
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4
    r, g, b = (linear(c) for c in rgba[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a, b):
    hi, lo = max(a, b), min(a, b)
    return (hi + 0.05) / (lo + 0.05)


def test_heatmap_values_read_on_their_cells_and_the_title_names_the_run(figures, tmp_path):
    torch.manual_seed(0)
    tvs = {t: fo.TaskVector({"w": torch.randn(16, 16)}) for t in ["Digits", "Textures", "Shapes", "Gratings"]}
    analysis.plot_cosine_matrix(tvs, tmp_path / "cos.png", run=RUN)
    fig = figures[-1]
    ax = fig.axes[0]
    assert RUN in ax.get_title() and "cosine" in ax.get_title()
    assert fig.axes[1].get_ylabel() == "cosine similarity"  # the colour bar says what the colour is
    from matplotlib.colors import to_rgba
    image = ax.get_images()[0]
    cells = [t for t in ax.texts]
    assert len(cells) == 16
    for t in cells:
        x, y = t.get_position()
        cell = image.cmap(image.norm(image.get_array()[int(round(y)), int(round(x))]))
        # the near-white off-diagonal cells once had white text (contrast 1.0)
        assert contrast(luminance(to_rgba(t.get_color())), luminance(cell)) >= 4.5, t.get_text()


def test_alpha_sensitivity_says_what_and_where_and_marks_the_choice(figures, tmp_path):
    curve = [{"alpha": a, "avg_normalized_top1": v} for a, v in [(0.0, 0.5), (0.3, 0.9), (0.6, 0.8)]]
    analysis.plot_alpha_sensitivity({"linear + orthoreg": curve}, tmp_path / "alpha.png", run=RUN)
    t = texts(figures[-1])
    assert RUN in t["titles"][0] and "validation" in t["titles"][0]
    assert t["xlabels"] == ["task-addition coefficient alpha"]
    assert "normalized accuracy" in t["ylabels"][0] and "validation" in t["ylabels"][0]
    assert "avg_normalized_top1" not in t["ylabels"][0]
    assert t["legend"] == ["linear + orthoreg", "linear + orthoreg: chosen alpha 0.30"]


@pytest.mark.parametrize("n_tasks", [2, 4])
def test_radar_labels_its_radius_and_never_degenerates(figures, tmp_path, n_tasks):
    tasks = ["Digits", "Textures", "Shapes", "Gratings"][:n_tasks]
    acc = {m: {t: float(v) for t, v in zip(tasks, np.linspace(0.3, 0.9, n_tasks))} for m in ["zero-shot", "merged"]}
    analysis.plot_accuracy_radar(acc, tmp_path / "radar.png", run=RUN)
    fig = figures[-1]
    t = texts(fig)
    assert RUN in t["titles"][0] and t["legend"] == ["zero-shot", "merged"]
    ax = fig.axes[0]
    if n_tasks < 3:  # bars, and the title says why
        assert ax.name == "rectilinear" and "radar needs 3 or more tasks" in t["titles"][0]
        assert t["ylabels"] == ["top-1 accuracy (%)"]
    else:
        assert ax.name == "polar"
        assert any("accuracy (%)" in x.get_text() for x in ax.texts)  # the radial axis is labelled
        spokes = np.degrees(ax.get_xticks()) % 360
        assert min(abs(ax.get_rlabel_position() - s) for s in spokes) > 10  # its labels sit between spokes


def test_every_other_figure_is_labelled(figures, tmp_path):
    torch.manual_seed(0)
    analysis.plot_disentanglement_error(np.random.rand(5, 5), [-1, -0.5, 0, 0.5, 1], tmp_path / "xi.png",
                                        labels=("Digits", "Textures"), run=RUN)
    analysis.plot_angle_histograms(
        analysis.weight_angles({"a.weight": torch.randn(8, 6), "b.weight": torch.randn(6, 6)}),
        tmp_path / "angles.png",
        run=RUN,
    )
    analysis.plot_taujp_matrix(np.random.rand(3, 3), ["a", "b", "c"], tmp_path / "taujp.png", run=RUN)
    xi, angles, taujp = (texts(f) for f in figures[-3:])
    assert RUN in xi["titles"][0] and xi["xlabels"][0] == "coefficient alpha of Digits" and xi["legend"]
    assert RUN in angles["titles"][-1] and all(y == "pairs" for y in angles["ylabels"])
    assert all(x == "angle (degrees)" for x in angles["xlabels"])
    for ax in figures[-2].axes:  # readable sizes
        assert ax.title.get_fontsize() >= 8 and ax.xaxis.label.get_fontsize() >= 8
    assert RUN in taujp["titles"][0] and "tau-Jp" in figures[-1].axes[1].get_ylabel()
    for f in ("xi.png", "angles.png", "taujp.png"):
        assert (tmp_path / f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_label_from_task_vector_metadata():
    assert analysis.run_label({"mode": "linear", "regularizer": "orthoreg", "lambda": "0.1", "model": "ViT-B-32",
                               "benchmark": "clip8"}) == RUN
    assert analysis.run_label({"mode": "lora", "regularizer": "none", "lambda": "0.1", "benchmark": "offline"}) == \
        "lora, none, offline"


def test_lambda_sensitivity_marks_the_chosen_lambda_on_a_log_axis(figures, tmp_path):
    """OrthoReg Fig. 6a: merged accuracy against lambda, validation and test, per mode x merge
    method, the chosen lambda starred, the unregularized run as a reference line."""
    rows = [{"mode": "lora", "reg": "none", "lam": 0.1, "merge": m, "abs": 0.5, "val_abs": 0.52, "chosen": True}
            for m in ("ta", "ties")]
    for m in ("ta", "ties"):
        for lam, acc in ((0.1, 0.55), (1.0, 0.6), (10.0, 0.58)):
            rows.append({"mode": "lora", "reg": "orthoreg", "lam": lam, "merge": m, "abs": acc - 0.01,
                         "val_abs": acc, "chosen": lam == 1.0})
    analysis.plot_lambda_sensitivity(rows, tmp_path / "lam.png", run=RUN)
    fig = figures[-1]
    t = texts(fig)
    ax = fig.axes[0]
    assert ax.get_xscale() == "log" and "lambda" in t["xlabels"][0] and "accuracy" in t["ylabels"][0]
    assert RUN in t["titles"][-1] and "absolute" in t["titles"][0]
    assert t["legend"] == ["lora, ta", "lora, ties"]
    stars = [line for line in ax.lines if line.get_marker() == "*"]
    assert [tuple(s.get_xdata()) for s in stars] == [(1.0,), (1.0,)]
    assert (tmp_path / "lam.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="regularizer"):
        analysis.plot_lambda_sensitivity(rows[:2], tmp_path / "none.png")
