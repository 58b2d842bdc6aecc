"""OrthoReg penalty + gradient (forward and backward) over every regularized tensor of a ViT
visual tower: the released-code reference against fastortho's backends.

    pytest bench/ --benchmark-only [--benchmark-json=bench/results/NAME.json]
"""
import pytest
import torch
from torch import nn

import fastortho as fo
from conftest import DEVICE, bench_models, sync
from fastortho import reference as ref
from fastortho.testing import random_layers, vit_weight_shapes

# The precision every timed case uses: tf32 on a GPU (the DESIGN targets), fp32 on a CPU.
PRECISION = "tf32" if DEVICE == "cuda" else "ieee"


class ShapeSet(nn.Module):
    """Parameters with the shapes of a ViT's regularized tensors (no model, no download)."""

    def __init__(self, weights):
        super().__init__()
        self.weights = nn.ParameterList(nn.Parameter(w) for w in weights)


def workload(name):
    shapes = vit_weight_shapes(name)
    gen = torch.Generator().manual_seed(0)
    weights, bases = random_layers(shapes, generator=gen)
    model = ShapeSet([w.to(DEVICE) for w in weights])
    base = {n: b.to(DEVICE) for (n, _), b in zip(model.named_parameters(), bases)}
    big_k2 = sum(max(s) * min(s) ** 2 for s in shapes)
    numel = sum(r * c for r, c in shapes)
    info = {
        "model": name, "layers": len(shapes), "precision": PRECISION, "device": DEVICE,
        # Gram (2 big k^2) + gradient product (2 big k^2) per layer, dense count.
        "flop": 4 * big_k2,
        # read W and W0 twice, write the gradient once (fp32)
        "bytes": 5 * 4 * numel,
    }
    return model, base, info


@pytest.fixture(scope="module", params=bench_models())
def vit(request):
    return workload(request.param)


def released_step(model, base):
    def step():
        model.zero_grad(set_to_none=True)
        ref.released_ortho_loss(model, base).backward()
        sync()
    return step


def fastortho_step(model, base, backend):
    reg = fo.OrthoReg(model, base, squared=False, precision=PRECISION, backend=backend,
                      check_finite=False)

    def step():
        model.zero_grad(set_to_none=True)
        reg().backward()
        sync()
    return step


def run(benchmark, step, info, impl):
    benchmark.group = f"orthoreg-{info['model']}"
    benchmark.extra_info.update(info, impl=impl)
    step()  # warm-up (kernel compilation, cuBLAS handles)
    benchmark.pedantic(step, rounds=20 if DEVICE == "cuda" else 5, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("impl", ["released", "torch"])
def test_orthoreg_penalty_fwd_bwd(benchmark, vit, impl):
    model, base, info = vit
    if impl == "released":
        from fastortho.ops.precision import cuda_fp32_matmul

        if DEVICE == "cuda":
            with cuda_fp32_matmul(PRECISION):
                run(benchmark, released_step(model, base), info, impl)
            return
        step = released_step(model, base)
    else:
        step = fastortho_step(model, base, impl)
    run(benchmark, step, info, impl)
