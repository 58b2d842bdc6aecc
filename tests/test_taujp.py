"""tau-Jp: the loss, the strict and cyclical regularizer and the pairwise matrix against the
definition (torch.func.jvp per task, float64)."""
import pytest
import torch
from test_linearize import perturb, small_vit
from torch import nn

import fastortho as fo
from fastortho import reference as ref

from conftest import TOL as TOLERANCES
from conftest import rel_err

TOL = TOLERANCES["float64"]


@pytest.fixture
def setup():
    model = small_vit().double().eval()
    lin = fo.linearize(model)
    th0 = {n: t.clone() for n, t in lin.base_values().items()}
    perturb(model)
    gen = torch.Generator().manual_seed(7)
    others = [torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64) for n in (3, 2, 4)]
    return model, lin, th0, others


def naive(model, th0, tau, x, reduction):
    per_sample = ref.taujp_naive(model, th0, tau, x)
    return per_sample.sum() if reduction == "sum_sq" else per_sample.sqrt().mean()


@pytest.mark.parametrize("reduction", ["sum_sq", "mean_norm"])
def test_taujp_loss_matches_definition_and_its_gradient(setup, reduction):
    model, lin, th0, others = setup
    x = others[0]
    loss = fo.taujp_loss(lin, x, reduction=reduction)
    assert loss.dtype == torch.float32 or loss.dtype == torch.float64
    tau = lin.task_vector()
    assert rel_err(loss, naive(model, th0, tau, x, reduction)) <= TOL
    loss.backward()
    names = list(tau)
    taus = [tau[n].clone().requires_grad_(True) for n in names]
    naive(model, th0, dict(zip(names, taus)), x, reduction).backward()
    params = dict(model.named_parameters())
    for n, t in zip(names, taus):
        assert rel_err(params[n].grad, t.grad) <= TOLERANCES["float64-grad"], n
    if reduction == "mean_norm":  # the released code's formula
        assert rel_err(loss, ref.released_taujp_penalty(model, th0, tau, [x])) <= TOL


def test_strict_regularizer_is_one_pass_over_all_other_tasks(setup):
    model, lin, th0, others = setup
    tau = lin.task_vector()
    reg = fo.TauJpRegularizer(lin, others, mode="strict", lam=0.3)
    expected = 0.3 * sum(naive(model, th0, tau, x, "sum_sq") for x in others)
    assert rel_err(reg(), expected) <= TOL
    # with the task batch in the same dual pass
    x_task = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out, penalty = reg(x_task)
    assert rel_err(out, lin(x_task)) <= TOL and rel_err(penalty, expected) <= TOL
    # the released strict penalty: per task the mean per-sample norm, the MEAN over the tasks
    released = fo.TauJpRegularizer(lin, others, mode="strict", reduction="mean_norm", task_reduction="mean")
    expected_released = ref.released_taujp_penalty(model, th0, tau, others)
    assert rel_err(released(), expected_released) <= TOL
    per_task = torch.stack([naive(model, th0, tau, x, "mean_norm") for x in others])
    assert rel_err(expected_released, per_task.mean()) <= TOL  # the reference says what the release does
    summed = fo.TauJpRegularizer(lin, others, mode="strict", reduction="mean_norm", task_reduction="sum")
    assert rel_err(summed(), per_task.sum()) <= TOL


def test_cyclical_task_moves_once_per_optimizer_step(setup):
    """With gradient accumulation every micro-batch of a step sees the same other task
    (the released code's ``step % n_tasks``)."""
    model, lin, th0, others = setup
    tau = lin.task_vector()
    reg = fo.TauJpRegularizer(lin, others, mode="cyclical", accumulation=2)
    for call in range(6):
        x = others[(call // 2) % 3]
        assert rel_err(reg(), naive(model, th0, tau, x, "sum_sq")) <= TOL, call
    assert reg.step == 3


def test_cyclical_regularizer_rotates_through_tasks(setup):
    model, lin, th0, others = setup
    tau = lin.task_vector()
    reg = fo.TauJpRegularizer(lin, others, mode="cyclical", lam=2.0)
    for step in range(5):
        x = others[step % 3]
        assert rel_err(reg(), 2.0 * naive(model, th0, tau, x, "sum_sq")) <= TOL, step


def test_regularizer_takes_dataloaders(setup):
    model, lin, th0, others = setup
    tau = lin.task_vector()
    data = torch.utils.data.TensorDataset(others[2], torch.zeros(4))
    loader = torch.utils.data.DataLoader(data, batch_size=2)  # (images, labels) batches
    reg = fo.TauJpRegularizer(lin, [loader], mode="cyclical")
    values = [reg().detach() for _ in range(3)]
    expected = [naive(model, th0, tau, others[2][i:i + 2], "sum_sq") for i in (0, 2, 0)]
    assert all(rel_err(v, e) <= TOL for v, e in zip(values, expected))


def test_regularizer_bad_arguments(setup):
    _, lin, _, others = setup
    with pytest.raises(ValueError, match="mode"):
        fo.TauJpRegularizer(lin, others, mode="sometimes")
    with pytest.raises(ValueError, match="reduction"):
        fo.TauJpRegularizer(lin, others, reduction="max")
    with pytest.raises(ValueError, match="task_reduction"):
        fo.TauJpRegularizer(lin, others, task_reduction="max")
    with pytest.raises(ValueError, match="accumulation"):
        fo.TauJpRegularizer(lin, others, accumulation=0)
    with pytest.raises(ValueError, match="other_batches"):
        fo.TauJpRegularizer(lin, [])
    with pytest.raises(TypeError, match="other_batches\\[0\\]"):
        fo.TauJpRegularizer(lin, [3])
    with pytest.raises(TypeError, match="lin"):
        fo.taujp_loss(nn.Linear(2, 2), others[0])
    with pytest.raises(ValueError, match="reduction"):
        fo.taujp_loss(lin, others[0], reduction="l1")


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_taujp_matrix_matches_pairwise_definition(setup, chunk_size):
    model, lin, th0, others = setup
    gen = torch.Generator().manual_seed(3)
    tvs = [{n: torch.randn(t.shape, generator=gen, dtype=t.dtype) * 1e-3 for n, t in th0.items()} for _ in range(3)]
    pretrained = small_vit().double().eval()  # th0 of `model` (same seed)
    directed = fo.taujp_matrix(pretrained, tvs, others, symmetric=False, chunk_size=chunk_size)
    assert directed.shape == (3, 3)
    for a in range(3):
        for b in range(3):
            exact = ref.taujp_naive(pretrained, th0, tvs[a], others[b]).mean()
            assert rel_err(directed[a, b], exact) <= TOLERANCES["float64-taujp-matrix"], (a, b)
    sym = fo.taujp_matrix(lin, tvs, others)  # a LinearizedModel: its th0
    assert rel_err(sym, 0.5 * (directed + directed.T)) <= TOLERANCES["float64-taujp-matrix"]
    with pytest.raises(ValueError, match="symmetric"):
        fo.taujp_matrix(lin, tvs[:2], others)
    with pytest.raises(ValueError, match="no entry"):
        fo.taujp_matrix(lin, [{}], others[:1])


def test_mean_norm_gradient_is_finite_at_tau_zero():
    """At the first step of fine-tuning tau = 0, where the norm is not differentiable: the
    gradient is the zero subgradient (as torch.norm's), never NaN."""
    model = small_vit().double().eval()
    lin = fo.linearize(model)
    reg = fo.TauJpRegularizer(lin, [torch.randn(2, 3, 32, 32, dtype=torch.float64)], mode="strict",
                              reduction="mean_norm", task_reduction="mean")
    reg().backward()
    grads = [p.grad for p in lin.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
