"""The reference itself: its closed-form gradient, the Gram-side identities of docs/design.md section 1,
and the released-code baseline."""
import pytest
import torch
from torch import nn

from fastortho import reference as ref
from fastortho.testing import random_layers

SHAPES = [(1, 7), (7, 1), (33, 17), (17, 33), (20, 20), (65, 130)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("squared", [True, False])
def test_closed_form_gradient_matches_autograd(shape, squared):
    (w,), (w0,) = random_layers([shape], dtype=torch.float64)
    d = (w - w0).requires_grad_(True)
    ref.layer_penalty(d, squared).backward()
    expected = ref.layer_penalty_grad(d.detach(), squared)
    assert torch.allclose(d.grad, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_penalty_expansion_and_gram_side(shape):
    (w,), (w0,) = random_layers([shape], dtype=torch.float64)
    d = w - w0
    k = min(shape)
    g = ref.gram(d)
    assert g.shape == (k, k)
    expanded = g.square().sum() - 2 * d.square().sum() + k
    assert torch.allclose(ref.layer_penalty(d), expanded, rtol=1e-10)
    # The paper's literal D^T D differs from the smaller-side Gram by |out - in| only.
    shift = ref.layer_penalty(d, side="columns") - ref.layer_penalty(d)
    assert torch.allclose(shift, torch.tensor(float(shape[1] - k), dtype=torch.float64), atol=1e-9)


def test_released_loss_is_sum_of_unsquared_norms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 13), nn.Linear(13, 4))
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    released = ref.released_ortho_loss(model, base)
    expected = ref.ortho_penalty(model, base, squared=False)
    assert abs(released.item() - expected.item()) < 1e-5 * expected.item()


def test_empty_delta_list_is_an_error():
    with pytest.raises(ValueError, match="deltas"):
        ref.ortho_penalty_of_deltas([])
