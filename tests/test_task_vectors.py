"""Task vectors, merging with coefficient search, negation, and the analyses with their plots."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import fastortho as fo
from fastortho import analysis
from fastortho.task_vectors import ADDITION_ALPHAS, NEGATION_ALPHAS


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.BatchNorm1d(8), nn.Linear(8, 3))


def finetuned(model, seed, scale=0.1):
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in out.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return out


# ----------------------------------------------------------------------------- TaskVector

def test_arithmetic_identities():
    pre = mlp()
    t1 = fo.TaskVector.from_models(pre, finetuned(pre, 1))
    t2 = fo.TaskVector.from_models(pre, finetuned(pre, 2))
    assert "2.num_batches_tracked" not in t1 and "2.running_mean" in t1  # floating tensors only
    for k in t1:
        assert torch.equal((t1 + t2)[k], t1[k] + t2[k])
        assert torch.equal((t1 - t2)[k], t1[k] - t2[k])
        assert torch.equal((-t1)[k], -t1[k])
        assert torch.equal((2.5 * t1)[k], t1[k] * 2.5) and torch.equal((t1 * 2.5)[k], (2.5 * t1)[k])
        assert torch.allclose((t1 / 4)[k], t1[k] * 0.25)
        assert torch.equal(sum([t1, t2])[k], (t1 + t2)[k])
        assert torch.count_nonzero((t1 - t1)[k]) == 0
    ft = finetuned(pre, 1)
    back = t1.apply_to(pre)
    for (k, v), (_, w) in zip(back.state_dict().items(), ft.state_dict().items()):
        assert torch.allclose(v.float(), w.float(), atol=1e-6), k
    assert all(torch.equal(a, b) for a, b in zip(pre.state_dict().values(), mlp().state_dict().values()))  # untouched
    sd = (-t1).apply_to(ft.state_dict(), alpha=1.0)  # a state_dict in, a new state_dict out
    for k, v in pre.state_dict().items():
        assert torch.allclose(sd[k].float(), v.float(), atol=1e-6)


def test_mismatches_raise_clear_errors():
    pre = mlp()
    t1 = fo.TaskVector.from_models(pre, finetuned(pre, 1))
    other = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.BatchNorm1d(8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="disagree in shape"):
        fo.TaskVector.from_models(pre, other)
    smaller = fo.TaskVector({k: v for k, v in t1.items() if k != "0.weight"})
    with pytest.raises(ValueError, match="different keys"):
        t1 + smaller
    with pytest.raises(ValueError, match="shapes differ"):
        t1.apply_to(other)
    with pytest.raises(TypeError, match="pretrained"):
        t1.apply_to(3)
    with pytest.raises(TypeError, match="floating-point"):
        fo.TaskVector({"a": torch.zeros(2, dtype=torch.long)})


def test_save_load_round_trip_is_bit_exact(tmp_path):
    pre = mlp()
    tv = fo.TaskVector.from_models(pre, finetuned(pre, 1), metadata={"base_model": "ViT-B-32"})
    path = tmp_path / "tv.safetensors"
    tv.save(path, metadata={"method": "nonlinear", "regularizer": "orthoreg", "lambda": 0.1})
    back = fo.TaskVector.load(path)
    assert list(back) == list(tv) and all(torch.equal(back[k], tv[k]) for k in tv)
    assert back.metadata["base_model"] == "ViT-B-32" and back.metadata["lambda"] == "0.1"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not a fastortho task-vector file"):
        fo.TaskVector.load(tmp_path / "plain.safetensors")


def test_from_checkpoints_safetensors_and_torch(tmp_path):
    from safetensors.torch import save_file
    pre, ft = mlp(), finetuned(mlp(), 3)
    save_file(pre.state_dict(), str(tmp_path / "pre.safetensors"))
    torch.save({"state_dict": ft.state_dict()}, tmp_path / "ft.pt")
    tv = fo.TaskVector.from_checkpoints(tmp_path / "pre.safetensors", tmp_path / "ft.pt")
    ref = fo.TaskVector.from_models(pre, ft)
    assert all(torch.equal(tv[k], ref[k]) for k in ref)


def test_from_linearized_and_from_lora():
    model = mlp()
    lin = fo.linearize(model)
    with torch.no_grad():
        model[0].weight.add_(1.0)
    tv = fo.TaskVector.from_linearized(lin)
    assert tv.metadata["method"] == "linearized" and torch.allclose(tv["0.weight"], torch.ones(8, 6))
    applied = tv.apply_to(lin, alpha=0.5)  # a LinearizedModel: th = th0 + 0.5 tau
    assert torch.allclose(applied.task_vector()["0.weight"], 0.5 * torch.ones(8, 6))
    assert torch.allclose(lin.task_vector()["0.weight"], torch.ones(8, 6))  # input untouched

    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(8, 8) for _ in range(4))
    attn = nn.Sequential()
    attn.add_module("self_attn", type("SelfAttention", (Attn,), {})())
    fo.add_lora(attn, "qv", rank=2)
    with torch.no_grad():
        for ad in fo.lora_adapters(attn):
            ad.B.normal_()
    tv = fo.TaskVector.from_lora(attn)
    assert set(tv) == {"self_attn.q_proj.weight", "self_attn.v_proj.weight"} and tv.metadata["method"] == "lora"


# ----------------------------------------------------------------------------- merging

class Scalar(nn.Module):
    """A one-parameter 'model' for constructed evaluation problems."""

    def __init__(self, w=0.0):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([float(w)]))


def test_task_addition_finds_the_known_optimum():
    pre = Scalar(0.0)
    tvs = {"A": fo.TaskVector({"w": torch.tensor([1.0])}), "B": fo.TaskVector({"w": torch.tensor([1.0])})}
    # merged weight = 2 alpha; every task's accuracy peaks at weight 0.7 -> alpha = 0.35
    peaks = {"A": 0.7, "AVal": 0.7, "B": 0.7, "BVal": 0.7}
    calls = []

    def evaluate(model, task):
        calls.append(task)
        return 1.0 - abs(float(model.w) - peaks[task])

    result = fo.task_addition(pre, tvs, evaluate, progress=False)
    assert result.alpha == pytest.approx(0.35)
    assert len(result.search) == len(ADDITION_ALPHAS) == 21
    assert {"A:top1", "A:normalized_top1", "B:top1", "avg_top1", "avg_normalized_top1"} <= set(result.test)
    assert result.test["A:top1"] == pytest.approx(1.0)
    # normalizers were measured on th0 + tau_t (weight 1.0): accuracy 0.7
    assert result.test["A:normalized_top1"] == pytest.approx(1.0 / 0.7)
    assert all(t.endswith("Val") for t in calls[:-4])  # the search only sees validation splits
    absolute = fo.task_addition(pre, tvs, evaluate, select="absolute", finetuned_accuracy={"A": 0.5, "B": 0.5},
                                progress=False)
    assert absolute.alpha == pytest.approx(0.35) and absolute.test["A:normalized_top1"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match="select"):
        fo.task_addition(pre, tvs, evaluate, select="best")


def test_task_negation_respects_control_thresholds():
    pre = Scalar(0.0)
    tv = fo.TaskVector({"w": torch.tensor([1.0])})

    def evaluate(model, task):
        a = -float(model.w)  # the negation coefficient
        if task.startswith("Target"):
            return max(0.0, 0.9 - 0.3 * a)  # forgets as alpha grows
        return 0.8 * (1.0 - 0.1 * a)  # control: 95% kept up to alpha 0.5, 90% to 1.0, 80% to 2.0

    result = fo.task_negation(pre, tv, evaluate, "Target", "Control", progress=False)
    assert result.zero_shot_control == pytest.approx(0.8)
    assert len(result.search) == len(NEGATION_ALPHAS) == 31
    assert result.choices[0.95]["alpha"] == pytest.approx(0.5)
    assert result.choices[0.90]["alpha"] == pytest.approx(1.0)
    assert result.choices[0.80]["alpha"] == pytest.approx(2.0)
    assert result.choices[0.80]["Target:top1"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="thresholds"):
        fo.task_negation(pre, tv, evaluate, "Target", "Control", thresholds=(1.5,), progress=False)


# ----------------------------------------------------------------------------- analyses

def test_cosine_matrix_against_numpy():
    gen = torch.Generator().manual_seed(0)
    tvs = {n: fo.TaskVector({"a": torch.randn(3, 4, generator=gen), "b": torch.randn(5, generator=gen)})
           for n in ("x", "y", "z")}
    m = fo.cosine_matrix(tvs)
    flat = np.stack([np.concatenate([tv["a"].numpy().ravel(), tv["b"].numpy().ravel()]) for tv in tvs.values()])
    flat = flat / np.linalg.norm(flat, axis=1, keepdims=True)
    assert np.allclose(m, flat @ flat.T, atol=1e-12) and np.allclose(np.diag(m), 1.0)


def test_vector_angles_against_numpy():
    gen = torch.Generator().manual_seed(1)
    tall = torch.randn(7, 4, generator=gen, dtype=torch.float64)
    angles = analysis.vector_angles(tall)
    cols = tall.numpy().T
    expected = [
        np.degrees(np.arccos(np.clip(cols[i] @ cols[j] / np.linalg.norm(cols[i]) / np.linalg.norm(cols[j]), -1, 1)))
        for i in range(4)
        for j in range(i + 1, 4)
    ]
    assert np.allclose(angles, expected)
    assert len(analysis.vector_angles(tall.T)) == 6  # wide: the rows, k = 4 vectors
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=gen))
    assert np.allclose(analysis.vector_angles(q), 90.0)  # orthogonal columns


def disentangled_setup(entangled: bool):
    """f(x) = W x with task 1 inputs on features 0..3 and task 2 inputs on 4..7; tau1 touches
    only columns 0..3 and tau2 only columns 4..7 (exactly disentangled), unless entangled."""
    torch.manual_seed(0)
    model = nn.Linear(8, 5, bias=False)
    gen = torch.Generator().manual_seed(1)
    tau1 = torch.zeros(5, 8)
    tau1[:, :4] = torch.randn(5, 4, generator=gen)
    tau2 = torch.zeros(5, 8)
    tau2[:, 4:] = torch.randn(5, 4, generator=gen)
    if entangled:
        tau2[:, :4] = torch.randn(5, 4, generator=gen)
    x1 = torch.zeros(64, 8)
    x1[:, :4] = torch.randn(64, 4, generator=gen)
    x2 = torch.zeros(64, 8)
    x2[:, 4:] = torch.randn(64, 4, generator=gen)
    return model, {"weight": tau1}, {"weight": tau2}, (x1, x2)


@pytest.mark.parametrize("distance", ["prediction", "l2"])
def test_disentanglement_error_zero_when_disentangled_positive_when_not(distance):
    grid = np.linspace(-2, 2, 5)
    model, tau1, tau2, xs = disentangled_setup(entangled=False)
    xi = analysis.disentanglement_error(model, tau1, tau2, xs, grid=grid, distance=distance, progress=False)
    assert xi.shape == (5, 5) and np.all(xi == 0)
    model, tau1, tau2, xs = disentangled_setup(entangled=True)
    xi = analysis.disentanglement_error(model, tau1, tau2, xs, grid=grid, distance=distance, progress=False)
    assert xi[2, 2] == 0 and xi.max() > 0  # (0, 0) is the pretrained model itself
    assert np.all(xi[:, 2] == 0)  # a2 = 0: the merged model is task 1's own model


def test_disentanglement_error_linearized_fast_path_matches_generic():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4))
    lin = fo.linearize(model)
    gen = torch.Generator().manual_seed(2)
    taus = [{n: torch.randn(p.shape, generator=gen) * 0.3 for n, p in model.named_parameters()} for _ in range(2)]
    xs = (torch.randn(50, 6, generator=gen), torch.randn(40, 6, generator=gen))
    grid = np.linspace(-2, 2, 4)
    fast = analysis.disentanglement_error(lin, *taus, xs, grid=grid, distance="l2", progress=False)
    generic = analysis.disentanglement_error(lin, *taus, xs, grid=grid, distance="l2", progress=False,
                                             forward=lambda m, x, t: m(x))
    assert np.allclose(fast, generic, rtol=1e-4, atol=1e-5) and fast.max() > 0


def _is_png(path):
    data = open(path, "rb").read()
    return len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_are_written(tmp_path):
    pre = mlp()
    tvs = {f"T{i}": fo.TaskVector.from_models(pre, finetuned(pre, i)) for i in range(3)}
    m, path = analysis.plot_cosine_matrix(tvs, tmp_path / "cos.png")
    assert m.shape == (3, 3) and _is_png(path)
    assert _is_png(analysis.plot_taujp_matrix(np.abs(m), list(tvs), tmp_path / "taujp.png"))
    grid = np.linspace(-2, 2, 5)
    assert _is_png(analysis.plot_disentanglement_error(np.random.rand(5, 5), grid, tmp_path / "xi.png"))
    angles = analysis.weight_angles(tvs["T0"])
    assert set(angles) == {"0.weight", "3.weight"}
    assert _is_png(analysis.plot_angle_histograms(angles, tmp_path / "angles.png"))
    acc = {"zero-shot": {"A": 0.4, "B": 0.5, "C": 0.3}, "merged": {"A": 0.7, "B": 0.6, "C": 0.65}}
    assert _is_png(analysis.plot_accuracy_radar(acc, tmp_path / "radar.png"))
    curve = [{"alpha": a, "avg_normalized_top1": 1 - (a - 0.3) ** 2} for a in ADDITION_ALPHAS]
    assert _is_png(analysis.plot_alpha_sensitivity({"ours": curve, "other": ([0, 1], [0.2, 0.4])},
                                                   tmp_path / "sens.png"))
    with pytest.raises(ValueError, match="matrix"):
        analysis.plot_matrix(np.zeros((2, 3)), ["a", "b"], tmp_path / "bad.png")


def test_example_script_runs(tmp_path):
    """examples/task_arithmetic.py end to end (the README's demo), plots included."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "task_arithmetic.py"
    argv = sys.argv
    sys.argv = [str(script), "--out", str(tmp_path)]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    for name in ("cosine", "radar", "alpha_sensitivity", "disentanglement", "angles"):
        assert _is_png(tmp_path / f"{name}.png"), name
