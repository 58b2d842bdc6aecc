"""The Triton OrthoReg backend against reference.py in float64: under TRITON_INTERPRET=1 on a
CPU (what CI runs), for real on a GPU. Outputs are NaN-poisoned (tests/conftest.py). Its
kernels one by one: tests/test_orthoreg_kernels.py."""
import pytest
import torch
from torch import nn

import fastortho as fo
from fastortho.testing import random_layers, vit_weight_shapes

from conftest import TOL, fast_values_and_grads, reference_values_and_grads, rel_err, requires_cuda

pytest.importorskip("triton")
from fastortho.kernels import orthoreg as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AWKWARD = [(1, 37), (37, 1), (33, 17), (17, 33), (65, 130), (130, 65), (48, 48)]
MIXED = [(33, 17), (1, 37), (65, 130), (33, 17), (17, 33), (130, 65), (37, 1), (65, 130)]
def layers(shapes, dtype=torch.float32, seed=0, precision="ieee"):
    gen = torch.Generator().manual_seed(seed)
    weights, bases = [], []
    for s in shapes:
        # tf32/bf16 operands: keep G - I away from cancellation (see test_orthoreg.py)
        scale = (0.5 if precision != "ieee" else 1.0) * max(s) ** -0.5
        w, b = random_layers([s], dtype=dtype, scale=scale, generator=gen)
        weights += [t.to(DEVICE) for t in w]
        bases += [t.to(DEVICE) for t in b]
    return weights, bases


TRITON_BACKENDS = ["triton"]


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("shape", AWKWARD)
@pytest.mark.parametrize("squared", [True, False])
def test_backend_values_and_gradients(shape, squared, backend):
    weights, bases = layers([shape], seed=2)
    values, grads = fast_values_and_grads(weights, bases, squared, "ieee", backend=backend)
    ref_values, ref_grads = reference_values_and_grads(weights, bases, squared)
    assert rel_err(values, ref_values) <= TOL["ieee"]
    assert rel_err(grads[0], ref_grads[0]) <= TOL["ieee"]


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("squared", [True, False])
def test_backend_mixed_shapes_with_upstream_gradient(precision, squared, backend):
    # tf32: layers with k = 1 reduce over one product, so nothing averages the ~5e-4 rounding
    # of each of D, G - I and the norm; their gradients land at ~1e-3, at the bound itself.
    shapes = [s for s in MIXED if min(s) > 1] if precision == "tf32" else MIXED
    weights, bases = layers(shapes, seed=3, precision=precision)
    upstream = torch.linspace(0.5, -1.5, len(shapes), device=DEVICE)
    values, grads = fast_values_and_grads(weights, bases, squared, precision, upstream=upstream, backend=backend)
    ref_values, ref_grads = reference_values_and_grads(weights, bases, squared)
    assert rel_err(values, ref_values) <= TOL[precision]
    for u, g, rg in zip(upstream, grads, ref_grads):
        assert rel_err(g, u.double() * rg) <= TOL[precision]


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_and_mixed_dtypes(dtype, backend):
    weights, bases = layers([(33, 17), (17, 65)], dtype=dtype, seed=4)
    more_w, more_b = layers([(20, 12)], seed=5)  # an fp32 layer in the same call
    weights, bases = weights + more_w, bases + more_b
    values, grads = fast_values_and_grads(weights, bases, True, "ieee", backend=backend)
    ref_values, ref_grads = reference_values_and_grads(weights, bases, True)
    assert rel_err(values, ref_values) <= TOL["ieee"]
    for w, g, rg in zip(weights, grads, ref_grads):
        assert g.dtype == w.dtype
        assert rel_err(g, rg) <= (TOL["ieee"] if w.dtype == torch.float32 else TOL["bf16"])


@pytest.mark.parametrize("backend", TRITON_BACKENDS)
def test_model_level_triton_equals_torch_backend(backend):
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(24, 40), nn.GELU(), nn.Linear(40, 9), nn.Linear(9, 9)).to(DEVICE)
    base = fo.snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    out = {}
    for name in ("torch", backend):
        model.zero_grad(set_to_none=True)
        loss = fo.ortho_loss(model, base, squared=False, precision="ieee", backend=name)
        loss.backward()
        out[name] = (loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert rel_err(out[backend][0], out["torch"][0]) <= TOL["ieee"]
    assert len(out[backend][1]) == 3
    for a, b in zip(out[backend][1], out["torch"][1]):
        assert rel_err(a, b) <= TOL["ieee"]


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU-only: the interpreter switch")
def test_triton_on_cpu_without_interpreter_says_so(monkeypatch):
    model = nn.Linear(4, 3)
    base = fo.snapshot(model)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors"):
        fo.ortho_loss(model, base, backend="triton")
    monkeypatch.delenv("TRITON_INTERPRET")
    assert fo.OrthoReg(model, base, backend="auto")().dim() == 0  # auto falls back to torch


# ----------------------------------------------------------------- GPU only


@requires_cuda
@pytest.mark.parametrize("backend", TRITON_BACKENDS)
@pytest.mark.parametrize("name", ["ViT-B-32", "ViT-L-14"])
@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
def test_vit_shape_sets_on_gpu(name, precision, backend):
    shapes = vit_weight_shapes(name)
    weights, bases = layers(shapes, seed=8, precision=precision)
    values, grads = fast_values_and_grads(weights, bases, True, precision, backend=backend)
    ref_values, ref_grads = reference_values_and_grads(weights, bases, True)
    assert rel_err(values, ref_values) <= TOL[precision]
    for s, g, rg in zip(shapes, grads, ref_grads):
        assert rel_err(g, rg) <= TOL[precision], s


@requires_cuda
def test_compiled_training_step_on_gpu():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32)).cuda()
    base = fo.snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(16, 64, device="cuda")

    def step(m, b, x):
        return m(x).square().mean() + 0.1 * fo.ortho_loss(m, b)

    loss = torch.compile(step, fullgraph=True)(model, base, x)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = step(model, base, x)
    expected.backward()
    assert rel_err(loss, expected) <= 1e-5
    for g, p in zip(grads, model.parameters()):
        assert rel_err(g, p.grad) <= 1e-4


def test_launchers_reject_bad_input():
    weights, bases = layers([(20, 12), (12, 20)], seed=10)
    with pytest.raises(ValueError, match="precision"):
        K.scratch_penalty(weights, bases, "fp16")
    with pytest.raises(ValueError, match="contiguous"):
        K.scratch_penalty([weights[0].t()], [bases[0].t()], "ieee")
    with pytest.raises(ValueError, match="equal length"):
        K.scratch_penalty(weights, bases[:1], "ieee")
    with pytest.raises(ValueError, match="one weight dtype"):
        K.scratch_penalty([weights[0], weights[1].double()], bases, "ieee")
    huge = torch.empty(2**16, 2**15, dtype=torch.uint8)  # 2**31 elements, never touched: refused first
    with pytest.raises(ValueError, match="32-bit in-layer indexing"):
        K.scratch_penalty([huge], [huge], "ieee")
