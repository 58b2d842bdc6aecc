"""The "triton-scratch" OrthoReg backend (D written once per step into a one-step scratch,
pipelined upper-triangle Gram, gradient on cuBLAS) against reference.py in float64: under
TRITON_INTERPRET=1 on a CPU, for real on a GPU; every output NaN-poisoned (tests/conftest.py).
The backend-level tests shared with "triton" (awkward and mixed shapes, every mode, 16-bit
weights, model level) are parametrized over both in tests/test_orthoreg_triton.py."""
import pytest
import torch
from torch import nn

import fastortho as fo
from conftest import TOL, fast_values_and_grads, reference_values_and_grads, rel_err
from fastortho import reference as ref
from test_orthoreg_triton import DEVICE, MIXED, layers

pytest.importorskip("triton")
from fastortho.kernels import orthoreg_scratch as S  # noqa: E402

# Small tiles: the awkward shapes span several Gram tiles (mirrored off-diagonal tiles, partial
# edge tiles, clamped rows), several delta tiles, and more tiles than programs.
SMALL = S.ScratchConfig(gram_block=16, gram_k=16, delta_rows=16, delta_cols=16, num_warps=4, num_stages=1)


@pytest.mark.parametrize("precision", ["ieee", "tf32", "bf16"])
@pytest.mark.parametrize("config", [SMALL, None], ids=["small-tiles", "default-tiles"])
def test_kernels_match_reference(precision, config):
    weights, bases = layers(MIXED, seed=1, precision=precision)
    x = S.write_deltas(weights, bases, precision, config=config)
    sq, gmi = S.scratch_gram(weights, bases, x, precision, config=config)
    layout = S.scratch_layout(tuple(tuple(w.shape) for w in weights))
    ref_sq, _ = reference_values_and_grads(weights, bases, squared=True)
    assert rel_err(sq, ref_sq) <= TOL[precision]
    for i, (w, b) in enumerate(zip(weights, bases)):
        d = (w - b).double()
        k, big = min(w.shape), max(w.shape)
        stride = -(-big // 16) * 16
        rows = x[layout.x_offsets[i]:layout.x_offsets[i] + k * stride].view(k, stride)
        assert torch.all(rows[:, big:] == 0)  # the row padding is written, as zeros
        xt = rows[:, :big]
        expected_xt = d if w.shape[0] < w.shape[1] else d.T
        assert rel_err(xt, expected_xt) <= TOL[precision], i
        g = gmi[layout.g_offsets[i]:layout.g_offsets[i] + k * k].view(k, k)
        assert rel_err(g, ref.gram(d) - torch.eye(k, dtype=d.dtype, device=d.device)) <= TOL[precision], i


def test_bf16_scratch_holds_bf16_values():
    weights, bases = layers([(33, 17)], seed=8, precision="bf16")
    x = S.write_deltas(weights, bases, "bf16")
    d = (weights[0] - bases[0]).T.contiguous()  # 17 x 33, rows padded to 48
    assert torch.equal(x[:17 * 48].view(17, 48)[:, :33].float(), d.to(torch.bfloat16).float())


# ViT-sized layers on a GPU; under the interpreter (a numpy product per tile step) smaller ones
# that still span many default-size tiles.
LARGE = [(257, 1024), (768, 3072), (3072, 768)] if DEVICE == "cuda" else [(257, 130), (130, 300)]


def test_large_layers():
    weights, bases = layers(LARGE, seed=9)
    values, grads = fast_values_and_grads(weights, bases, True, "ieee", backend="triton-scratch")
    ref_values, ref_grads = reference_values_and_grads(weights, bases, True)
    assert rel_err(values, ref_values) <= TOL["ieee"]
    for g, rg in zip(grads, ref_grads):
        assert rel_err(g, rg) <= TOL["ieee"]


def test_ops_pass_opcheck():
    from fastortho.ops.orthoreg.scratch_backend import ortho_scratch_grad, ortho_scratch_gram

    weights, bases = layers([(9, 5), (5, 9), (9, 5)], seed=7)
    grad_weights = [w.clone().requires_grad_(True) for w in weights]
    for squared in (True, False):
        torch.library.opcheck(ortho_scratch_gram, (grad_weights, bases, squared, "ieee"),
                              test_utils=("test_schema", "test_faketensor"))
    _, x, gmi = ortho_scratch_gram(weights, bases, True, "ieee")
    coef = torch.tensor([1.0, -2.0, 0.5], device=DEVICE)
    torch.library.opcheck(ortho_scratch_grad, (x, gmi, coef, [9, 5, 5, 9, 9, 5], "ieee"))


def test_lora_has_no_scratch_backend():
    from fastortho.ops.lora import lora_ortho_penalty

    with pytest.raises(ValueError, match="has no LoRA op"):
        lora_ortho_penalty([torch.ones(2, 8)], [torch.ones(8, 2)], [1.0], squared=True, precision="ieee",
                           backend="triton-scratch")


# ----------------------------------------------------------------- GPU only

from conftest import requires_cuda  # noqa: E402


@requires_cuda
@pytest.mark.parametrize("backend", ["triton-scratch", "triton", "torch"])
def test_steady_state_step_never_synchronizes_and_replays_as_a_cuda_graph(backend):
    """A steady-state OrthoReg forward + backward makes no host synchronization (PyTorch's sync
    debug mode raises on one) and, captured into a CUDA graph, replays to the eager result."""
    weights, bases = layers(MIXED, seed=11)
    model = nn.Module()
    model.w = nn.ParameterList(nn.Parameter(w.clone()) for w in weights)
    base = {f"w.{i}": b for i, b in enumerate(bases)}
    reg = fo.OrthoReg(model, base, lam=0.5, precision="ieee", backend=backend)
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
    assert rel_err(captured, eager) <= TOL["ieee"]
    for p, g in zip(model.parameters(), eager_grads):
        assert rel_err(p.grad, g) <= TOL["ieee"]
