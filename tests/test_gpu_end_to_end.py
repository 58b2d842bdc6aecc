"""The linearized model and tau-Jp end to end on the device the tests run on (the GPU where
there is one, with the Triton kernels that ``set_kernels("auto")`` picks there; the CPU
otherwise), in fp32 against float64 references computed on the CPU: values, tangents and
gradients. bench/gpu_check.py runs this file on the GPU; on a CPU it is the dry run's check."""
import pytest
import torch
from test_linearize import perturb, reference_grads, small_vit

import fastortho as fo
from fastortho import reference as ref

from conftest import TOL, rel_err, requires_cuda

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture
def ieee_products():
    """True fp32 products on the GPU (tf32 would need the tf32 tolerance everywhere)."""
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    yield
    torch.backends.cuda.matmul.fp32_precision = old


def pair(seed=0):
    """The same perturbed tiny ViT twice: fp32 on DEVICE and float64 on the CPU, with th0."""
    model = small_vit(seed=seed).eval()
    lin = fo.linearize(model)
    th0 = {n: t.detach().double().clone() for n, t in lin.base_values().items()}
    perturb(model)
    model64 = small_vit(seed=seed).double().eval()
    model64.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return lin.to(DEVICE), model64, th0


def test_linearized_vit_values_tangents_and_gradients(ieee_products):
    lin, model64, th0 = pair()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    primal, tangent = lin.dual(x.to(DEVICE))
    ref_primal, ref_tangent = ref.jvp_linearized(model64, th0, {n: p.detach() - th0[n] for n, p in
                                                                 model64.named_parameters()}, x.double())
    assert rel_err(primal, ref_primal) <= TOL["fp32-network"]
    assert rel_err(tangent, ref_tangent) <= TOL["fp32-network"]

    def loss_of(p, t):
        return (p + t).square().sum()
    lin.zero_grad(set_to_none=True)
    loss_of(*lin.dual(x.to(DEVICE))).backward()
    expected = reference_grads(model64, th0, x.double(), loss_of)
    for name, param in lin.model.named_parameters():
        assert rel_err(param.grad, expected[name]) <= TOL["fp32-network"], name


@pytest.mark.parametrize("mode", ["strict", "cyclical"])
def test_taujp_regularizer(mode, ieee_products):
    lin, model64, th0 = pair(seed=1)
    gen = torch.Generator().manual_seed(5)
    others = [torch.randn(n, 3, 32, 32, generator=gen) for n in (2, 3)]
    reg = fo.TauJpRegularizer(lin, [o.to(DEVICE) for o in others], mode=mode, lam=0.5)
    tau64 = {n: p.detach() - th0[n] for n, p in model64.named_parameters()}
    for step in range(2):
        lin.zero_grad(set_to_none=True)
        value = reg()
        value.backward()
        batches = others if mode == "strict" else [others[step % 2]]
        expected = 0.5 * sum(ref.taujp_naive(model64, th0, tau64, b.double()).sum() for b in batches)
        assert rel_err(value, expected) <= TOL["fp32-network"], step
        grads = {n: p.grad for n, p in lin.model.named_parameters()}
        assert all(g is not None and torch.isfinite(g).all() for g in grads.values())


@requires_cuda
def test_linearized_training_step_replays_as_a_cuda_graph(ieee_products):
    """The whole linearized step (forward, backward, AdamW with capturable=True) makes no host
    synchronization once warm and, captured into one CUDA graph, trains as the eager step does:
    the fast path for a host-bound step (docs/design.md section 5)."""
    gen = torch.Generator().manual_seed(6)
    batches = [torch.randn(4, 3, 32, 32, generator=gen).to(DEVICE) for _ in range(4)]
    runs = {}
    for how in ("eager", "graph"):
        lin, _, _ = pair(seed=2)
        params = [p for p in lin.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3, capturable=True)
        static_x = batches[0].clone()

        def step(opt=opt, lin=lin, static_x=static_x):
            opt.zero_grad(set_to_none=False)
            loss = lin(static_x).square().mean()
            loss.backward()
            opt.step()
            return loss

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: caches, the dual linear's measurement, optimizer state
            for b in batches[:2]:
                static_x.copy_(b)
                step()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        if how == "eager":
            torch.cuda.set_sync_debug_mode("error")
            try:
                for b in batches[2:]:
                    static_x.copy_(b)
                    step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step()
            for b in batches[2:]:
                static_x.copy_(b)
                graph.replay()
        torch.cuda.synchronize()
        runs[how] = [p.detach().clone() for p in params]
    for eager, replayed in zip(runs["eager"], runs["graph"]):
        assert rel_err(replayed, eager) <= TOL["fp32-network"]
