"""Compiled linearized attention gives eager's gradients, on every supported torch.

torch 2.11's dynamo (pytorch issue 180642, fixed in 2.12) routes the gradient of an
autograd.Function whose forward returns an alias of one of its own intermediates (a no-op
``.to``, a ``.view``, an in-place result) to the wrong slot: the inputs then get exactly zero
gradient, silently. fastortho's attention tangent once ended with such a ``.to``. These tests
compile a linearized bare ``nn.MultiheadAttention`` and a one-block open_clip ViT with the
``eager`` and ``inductor`` backends and compare every gradient with the uncompiled model;
``test_function_outputs.py`` checks the rule itself on every autograd.Function of fastortho.
"""
import pytest
import torch
from torch import nn

import fastortho as fo

from conftest import TOL, rel_err

open_clip = pytest.importorskip("open_clip")
from open_clip.transformer import VisionTransformer  # noqa: E402


class SelfAttention(nn.Module):
    """A bare ``nn.MultiheadAttention`` used as self-attention (batch first, no mask)."""

    def __init__(self, width, heads):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, x):
        return self.attn(x, x, x, need_weights=False)[0]


def _perturb(model, scale=1e-2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale * (p.abs().mean() + 1e-3))


def _model_and_input(kind):
    torch.manual_seed(0)
    if kind == "mha":
        return SelfAttention(16, 2), torch.randn(3, 5, 16)
    vit = VisionTransformer(image_size=16, patch_size=8, width=16, layers=1, heads=2, mlp_ratio=2.0, output_dim=8)
    return vit, torch.randn(2, 3, 16, 16)


def _grads(model):
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["eager", "inductor"])
@pytest.mark.parametrize("kind", ["mha", "vit"])
def test_compiled_linearized_attention_gradients_equal_eager(kind, backend):
    model, x = _model_and_input(kind)
    lin = fo.linearize(model)
    _perturb(model)
    target = torch.randn_like(lin(x).detach())

    def loss_of(out):
        return ((out - target) ** 3).sum()

    loss_of(lin(x)).backward()
    eager = _grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(lambda inp: lin(inp), backend=backend, fullgraph=True)
    loss_of(compiled(x)).backward()
    got = _grads(model)
    for name, expected in eager.items():
        assert expected.norm() > 0, f"{name}: the eager gradient is zero, the test would not see a lost gradient"
        assert rel_err(got[name], expected) <= TOL["fp32-compiled"] * 10, f"{name}: compiled gradient differs"
