"""The kernels of the "triton" OrthoReg backend (D written once per step into a one-step scratch,
pipelined upper-triangle Gram, gradient on cuBLAS or, in tf32 mode's scaled fp16, one Triton
launch) against reference.py in float64: under
TRITON_INTERPRET=1 on a CPU, for real on a GPU; every output NaN-poisoned (tests/conftest.py).
The backend-level tests shared with "triton" (awkward and mixed shapes, every mode, 16-bit
weights, model level) are parametrized over both in tests/test_orthoreg_triton.py."""
import pytest
import torch
from test_orthoreg_triton import DEVICE, MIXED, layers
from torch import nn

import fastortho as fo
from fastortho import reference as ref
from fastortho.ops.orthoreg import ortho_penalty

from conftest import TOL, fast_values_and_grads, reference_values_and_grads, rel_err

pytest.importorskip("triton")
from fastortho.kernels import orthoreg as S  # noqa: E402

# Small tiles: the awkward shapes span several Gram tiles (mirrored off-diagonal tiles, partial
# edge tiles, clamped rows), several delta tiles, and more tiles than programs.
SMALL = S.ScratchConfig(gram_block=16, gram_k=16, delta_rows=16, delta_cols=16, num_warps=4, num_stages=1)


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("config", [SMALL, None], ids=["small-tiles", "default-tiles"])
def test_kernels_match_reference(precision, config):
    weights, bases = layers(MIXED, seed=1, precision=precision)
    x, used, stats = S.write_deltas(weights, bases, precision, config=config)
    sq, gmi = S.scratch_gram(weights, bases, x, used, stats, precision, config=config)
    layout = S.scratch_layout(tuple(tuple(w.shape) for w in weights))
    scales = used.tolist() if precision == "tf32" else [1.0] * len(weights)
    ref_sq, _ = reference_values_and_grads(weights, bases, squared=True)
    assert rel_err(sq, ref_sq) <= TOL[precision]
    for i, (w, b) in enumerate(zip(weights, bases)):
        d = (w - b).double()
        k, big = min(w.shape), max(w.shape)
        stride = -(-big // 16) * 16
        rows = x[layout.x_offsets[i]:layout.x_offsets[i] + k * stride].view(k, stride)
        assert torch.all(rows[:, big:] == 0)  # the row padding is written, as zeros
        xt = rows[:, :big].double() / scales[i]
        expected_xt = d if w.shape[0] < w.shape[1] else d.T
        assert rel_err(xt, expected_xt) <= TOL[precision], i
        g = gmi[layout.g_offsets[i]:layout.g_offsets[i] + k * k].view(k, k)
        assert rel_err(g, ref.gram(d) - torch.eye(k, dtype=d.dtype, device=d.device)) <= TOL[precision], i


def test_bf16_scratch_holds_bf16_values():
    weights, bases = layers([(33, 17)], seed=8, precision="bf16")
    x, _, _ = S.write_deltas(weights, bases, "bf16")
    d = (weights[0] - bases[0]).T.contiguous()  # 17 x 33, rows padded to 48
    assert torch.equal(x[:17 * 48].view(17, 48)[:, :33].float(), d.to(torch.bfloat16).float())


def _tf32_pass(weights, bases, coef):
    """The three "tf32" launches on NaN-poisoned buffers: values, G - I, grads, scales used."""
    x, used, stats = S.write_deltas(weights, bases, "tf32")
    sq, gmi = S.scratch_gram(weights, bases, x, used, stats, "tf32")
    flat = S.scratch_grads(x, gmi, used, stats, coef, tuple(tuple(w.shape) for w in weights))
    layout = S.scratch_layout(tuple(tuple(w.shape) for w in weights))
    grads = [flat[o:o + w.numel()].view(w.shape) for o, w in zip(layout.o_offsets, weights)]
    return x, used, stats, sq, grads


def _check_tf32_against_reference(weights, bases, coef, sq, grads):
    ref_sq, ref_grads = reference_values_and_grads(weights, bases, squared=True)
    assert rel_err(sq, ref_sq) <= TOL["tf32"]
    for i, (g, rg) in enumerate(zip(grads, ref_grads)):
        assert rel_err(g, rg * float(coef[i]) / 4.0) <= TOL["tf32"], i  # the kernel gives c D (G - I)


def test_tf32_scratch_is_scaled_fp16_and_rescaled_only_when_needed():
    """In "tf32" mode X^T is fp16 times a per-layer power of two kept between calls. Each call
    records max |D|; a layer whose old scale no longer fits (the first call, D grown past the
    window, or shrunk far below it) is rewritten with a scale from the new maximum, the others
    keep theirs. Values and gradients stay within the tf32 tolerance at every step, including
    the step whose first write overflowed fp16."""
    weights, bases = layers([(33, 17), (40, 24)], seed=3, precision="tf32")
    d0 = [w - b for w, b in zip(weights, bases)]
    coef = torch.tensor([1.0, -0.5], device=DEVICE)
    plan = S.scratch_plan(weights, bases, S.default_config("tf32", weights[0].device))
    assert torch.equal(plan.scale.cpu(), torch.zeros(2))  # not chosen yet
    # (factor of layer 0, factor of layer 1): first call; growth within the window (kept);
    # 100x growth of layer 0 only (its first write overflows fp16); 1e-4 shrinkage of layer 1
    for step, factors in enumerate([(1.0, 1.0), (4.0, 1.5), (400.0, 1.5), (400.0, 1.5e-4)]):
        with torch.no_grad():
            for w, b, d, f in zip(weights, bases, d0, factors):
                w.copy_(b + f * d)
        before = plan.scale.tolist()
        x, used, stats, sq, grads = _tf32_pass(weights, bases, coef)
        amax = [float((w - b).abs().max()) for w, b in zip(weights, bases)]
        assert stats[:2].view(torch.float32).tolist() == amax  # recorded exactly
        expected = [s if S.keeps_scale(a, s) else S.pow2_scale(a) for a, s in zip(amax, before)]
        assert used.tolist() == expected and plan.scale.tolist() == expected, step
        kept = [u == b for u, b in zip(used.tolist(), before)]
        assert kept == {0: [False, False], 1: [True, True], 2: [False, True], 3: [True, False]}[step], step
        assert x.dtype == torch.float16
        layout = S.scratch_layout(tuple(tuple(w.shape) for w in weights))
        for i, (w, b) in enumerate(zip(weights, bases)):
            k, big = min(w.shape), max(w.shape)
            stride = -(-big // 16) * 16
            rows = x[layout.x_offsets[i]:layout.x_offsets[i] + k * stride].view(k, stride)[:, :big].double()
            assert torch.isfinite(rows).all() and float(rows.abs().max()) < 2 ** 15, (step, i)
            d = (w - b).double()
            assert rel_err(rows / used[i].item(), d if w.shape[0] < w.shape[1] else d.T) <= TOL["tf32"], (step, i)
        _check_tf32_against_reference(weights, bases, coef, sq, grads)


@pytest.mark.parametrize("stale", ["zero", "huge", "tiny", "random"])
def test_tf32_results_do_not_depend_on_the_scale_a_plan_holds(stale):
    """Whatever scale a plan holds (a reused address, a model reloaded in place), the fix-up
    makes the result correct."""
    weights, bases = layers([(33, 17), (17, 33), (8, 8)], seed=4, precision="tf32")
    coef = torch.tensor([2.0, 1.0, -1.0], device=DEVICE)
    plan = S.scratch_plan(weights, bases, S.default_config("tf32", weights[0].device))
    values = {"zero": [0.0] * 3, "huge": [2.0**60] * 3, "tiny": [2.0**-60] * 3, "random": [2.0**40, 2.0**-7, 3.0]}
    plan.scale.copy_(torch.tensor(values[stale]))
    _, _, _, sq, grads = _tf32_pass(weights, bases, coef)
    _check_tf32_against_reference(weights, bases, coef, sq, grads)


@pytest.mark.parametrize("size", [0.0, 1e-12, 1e-6, 1e-2, 30.0])
def test_tf32_scratch_over_update_sizes(size):
    """From an exactly zero update (the first step: values k, gradients 0) to a large one,
    through updates whose fp16 values would be subnormal without the scale."""
    weights, bases = layers([(33, 17), (24, 40)], seed=5, precision="tf32")
    with torch.no_grad():
        for w, b in zip(weights, bases):
            w.copy_(b + size * (w - b) / float((w - b).abs().max()))
    coef = torch.tensor([1.0, 3.0], device=DEVICE)
    _, used, _, sq, grads = _tf32_pass(weights, bases, coef)
    if size == 0.0:
        assert sq.tolist() == [17.0, 24.0] and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    else:
        _check_tf32_against_reference(weights, bases, coef, sq, grads)


def test_pow2_scale_mirror():
    assert S.pow2_scale(1.0) == 2.0 ** 11 and S.pow2_scale(1.5) == 2.0 ** 11 and S.pow2_scale(0.75) == 2.0 ** 12
    assert S.pow2_scale(0.0) == 2.0 ** 60 == S.pow2_scale(1e-300) and S.pow2_scale(float("inf")) == 2.0 ** -60
    assert S.pow2_scale(2.0 ** 100) == 2.0 ** -60 and S.pow2_scale(float("nan")) == 2.0 ** -60
    assert S.keeps_scale(1.0, 2.0 ** 13) and not S.keeps_scale(1.0, 2.0 ** 15) and not S.keeps_scale(1.0, 2.0 ** 3)
    assert S.keeps_scale(0.0, 8.0) and not S.keeps_scale(1.0, 0.0)


# ViT-sized layers on a GPU; under the interpreter (a numpy product per tile step) smaller ones
# that still span many default-size tiles.
LARGE = [(257, 1024), (768, 3072), (3072, 768)] if DEVICE == "cuda" else [(257, 130), (130, 300)]


def test_large_layers():
    weights, bases = layers(LARGE, seed=9)
    values, grads = fast_values_and_grads(weights, bases, True, "ieee", backend="triton")
    ref_values, ref_grads = reference_values_and_grads(weights, bases, True)
    assert rel_err(values, ref_values) <= TOL["ieee"]
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= TOL["ieee"]


def test_ops_pass_opcheck():
    from fastortho.ops.orthoreg.triton_backend import ortho_scratch_grad, ortho_scratch_grad_fp16, ortho_scratch_gram

    weights, bases = layers([(9, 5), (5, 9), (9, 5)], seed=7)
    grad_weights = [w.clone().requires_grad_(True) for w in weights]
    for squared in (True, False):
        torch.library.opcheck(ortho_scratch_gram, (grad_weights, bases, squared, "ieee"),
                              test_utils=("test_schema", "test_faketensor"))
    coef = torch.tensor([1.0, -2.0, 0.5], device=DEVICE)
    for precision in ("ieee", "tf32"):
        torch.library.opcheck(ortho_scratch_gram, (weights, bases, True, precision),
                              test_utils=("test_schema", "test_faketensor"))
        _, x, gmi, used, stats = ortho_scratch_gram(weights, bases, True, precision)
        if precision == "tf32":
            torch.library.opcheck(ortho_scratch_grad_fp16, (x, gmi, used, stats, coef, [9, 5, 5, 9, 9, 5]))
        else:
            torch.library.opcheck(ortho_scratch_grad, (x, gmi, coef, [9, 5, 5, 9, 9, 5], precision))


def test_the_removed_backend_name_is_refused():
    with pytest.raises(ValueError, match="backend: expected one of"):
        ortho_penalty([torch.ones(2, 8)], [torch.zeros(2, 8)], squared=True, precision="ieee",
                      backend="triton-scratch")


# ----------------------------------------------------------------- GPU only

from conftest import requires_cuda  # noqa: E402


@requires_cuda
@pytest.mark.parametrize("backend,precision", [("triton", "ieee"), ("triton", "tf32"), ("triton", "bf16"),
                                               ("torch", "ieee")])
def test_steady_state_step_never_synchronizes_and_replays_as_a_cuda_graph(backend, precision):
    """A steady-state OrthoReg forward + backward makes no host synchronization (PyTorch's sync
    debug mode raises on one) and, captured into a CUDA graph, replays to the eager result."""
    weights, bases = layers(MIXED, seed=11)
    model = nn.Module()
    model.w = nn.ParameterList(nn.Parameter(w.clone()) for w in weights)
    base = {f"w.{i}": b for i, b in enumerate(bases)}
    reg = fo.OrthoReg(model, base, lam=0.5, precision=precision, backend=backend)
    for _ in range(2):  # plans, caches, lazily built tables
        model.zero_grad(set_to_none=False)
        reg().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(2):
            reg().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for p in model.parameters():
        p.grad.zero_()
    eager = reg()
    eager.backward()
    eager_grads = [p.grad.clone() for p in model.parameters()]
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for p in model.parameters():
            p.grad.zero_()
        with torch.cuda.graph(graph):
            captured = reg()
            captured.backward()
    torch.cuda.current_stream().wait_stream(stream)
    for p in model.parameters():
        p.grad.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(captured, eager) <= TOL[precision]
    for p, g in zip(model.parameters(), eager_grads):
        assert rel_err(p.grad, g) <= TOL[precision]
