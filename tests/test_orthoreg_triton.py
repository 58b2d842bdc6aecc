"""The Triton OrthoReg kernels against reference.py in float64: under TRITON_INTERPRET=1 on a
CPU (what CI runs), for real on a GPU. Outputs are NaN-poisoned (tests/conftest.py)."""
import pytest
import torch
from torch import nn

import fastortho as fo
from conftest import TOL, fast_values_and_grads, reference_values_and_grads, rel_err, requires_cuda
from fastortho import reference as ref
from fastortho.testing import random_layers, vit_weight_shapes

pytest.importorskip("triton")
from fastortho.kernels import orthoreg as K  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
AWKWARD = [(1, 37), (37, 1), (33, 17), (17, 33), (65, 130), (130, 65), (48, 48)]
MIXED = [(33, 17), (1, 37), (65, 130), (33, 17), (17, 33), (130, 65), (37, 1), (65, 130)]
# Small tiles so that the awkward shapes span several Gram tiles (mirrored off-diagonal
# tiles, partial edge tiles) and more tiles than programs (the persistent loop).
SMALL = K.KernelConfig(gram_block=16, gram_k=16, grad_m=32, grad_n=16, grad_k=16, num_warps=4, num_stages=1)


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


def launch_poisoned(weights, bases, precision, config, coef):
    """Both phases (their outputs NaN-poisoned at allocation); returns penalties, G - I views,
    grads."""
    shapes = [tuple(w.shape) for w in weights]
    config = config or K.default_config(precision, weights[0].device)
    plan = K.launch_plan(weights, bases, config)
    sq, gmi = K.gram_penalty(weights, bases, precision, config=config)
    out = K.penalty_grad(weights, bases, gmi, coef, precision, config=config)
    assert torch.isfinite(gmi).all()  # the row padding is written too (zeros)
    gmis = [gmi[o:o + min(s) * ((min(s) + 15) // 16 * 16)].view(min(s), -1)
            for s, o in zip(shapes, plan.shape.g_offsets)]
    assert all(torch.all(g[:, min(s):] == 0) for g, s in zip(gmis, shapes))
    gmis = [g[:, :min(s)] for g, s in zip(gmis, shapes)]
    return sq, gmis, K.layer_views(out, shapes, plan.shape.out_offsets)


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("config", [SMALL, None], ids=["small-tiles", "default-tiles"])
def test_kernels_write_every_output_and_match_reference(precision, config):
    weights, bases = layers(MIXED, seed=1, precision=precision)
    coef = torch.linspace(-2.0, 3.0, len(MIXED), device=DEVICE)
    sq, gmis, grads = launch_poisoned(weights, bases, precision, config, coef)
    ref_sq, ref_grads = reference_values_and_grads(weights, bases, squared=True)
    assert rel_err(sq, ref_sq) <= TOL[precision]
    for i, (w, b) in enumerate(zip(weights, bases)):
        d = (w - b).double()
        g = ref.gram(d)
        ref_gmi = g - torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
        assert rel_err(gmis[i], ref_gmi) <= TOL[precision], (i, MIXED[i])
        # the kernel's coef is the whole factor: the reference gradient carries a 4
        expected = ref_grads[i] * (coef[i].double() / 4)
        assert rel_err(grads[i], expected) <= TOL[precision], (i, MIXED[i])


# Both Triton backends: "triton" (D formed in registers) and "triton-scratch" (D written once
# to a scratch, tests/test_orthoreg_scratch.py tests its kernels).
TRITON_BACKENDS = ["triton", "triton-scratch"]


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


def test_ops_pass_opcheck():
    from fastortho.ops.orthoreg.triton_backend import ortho_grad_triton, ortho_gram_triton

    weights, bases = layers([(9, 5), (5, 9), (9, 5)], seed=7)
    weights = [w.requires_grad_(True) for w in weights]
    for squared in (True, False):
        torch.library.opcheck(ortho_gram_triton, (weights, bases, squared, "ieee"))
    _, gmi = ortho_gram_triton([w.detach() for w in weights], bases, True, "ieee")
    coef = torch.tensor([1.0, -2.0, 0.5], device=DEVICE)
    torch.library.opcheck(ortho_grad_triton, ([w.detach() for w in weights], bases, gmi, coef, "ieee"),
                          test_utils=("test_schema", "test_faketensor"))


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
        K.gram_penalty(weights, bases, "fp16")
    with pytest.raises(ValueError, match="contiguous"):
        K.gram_penalty([weights[0].t()], [bases[0].t()], "ieee")
    with pytest.raises(ValueError, match="equal length"):
        K.gram_penalty(weights, bases[:1], "ieee")
    with pytest.raises(ValueError, match="one weight dtype"):
        K.gram_penalty([weights[0], weights[1].double()], bases, "ieee")
    huge = torch.empty(2**16, 2**15, dtype=torch.uint8)  # 2**31 elements, never touched: refused first
    with pytest.raises(ValueError, match="32-bit in-layer indexing"):
        K.gram_penalty([huge], [huge], "ieee")
