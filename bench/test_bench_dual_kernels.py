"""The Triton kernels of linearized models against the PyTorch dual ops they replace
(forward + backward of the tangent), GPU only: the fused dual linear on ViT-B-32 / ViT-L-14
MLP shapes, and the one-pass attention tangent at ViT-B-32 (L=50, d=64) and ViT-L-14
(L=257, d=64) sizes. extra_info: FLOPs, bytes, the floor max(FLOPs / peak, bytes / bandwidth).

    pytest bench/test_bench_dual_kernels.py --benchmark-only
"""
import pytest
import torch
import torch.nn.functional as F

from fastortho import set_kernels
from fastortho.ops.dual import dual_linear, dual_sdpa

from conftest import DEVICE, sync

pytestmark = pytest.mark.skipif(DEVICE != "cuda", reason="kernels are timed on a GPU only")

LINEAR = {"B-32 c_fc b128": (128 * 50, 768, 3072), "L-14 c_fc b32": (32 * 257, 1024, 4096)}
ATTENTION = {"B-32 b128": (128, 12, 50, 64), "L-14 b32": (32, 16, 257, 64)}


@pytest.fixture(params=["triton", "torch"])
def policy(request):
    set_kernels(request.param)
    yield request.param
    set_kernels("auto")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(LINEAR))
def test_dual_linear(benchmark, case, dtype, policy, ceilings):
    M, K, N = LINEAR[case]
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    dx = torch.randn(M, K, device=DEVICE, dtype=dtype, requires_grad=True)
    w = torch.randn(N, K, device=DEVICE, dtype=dtype)
    dw = torch.randn(N, K, device=DEVICE, dtype=dtype, requires_grad=True)

    def step():
        dx.grad = dw.grad = None
        _, dy = dual_linear(x, dx, w, dw)
        dy.backward(torch.ones_like(dy))
        sync()
    es = x.element_size()
    flop = 2 * M * N * K * 5  # y, x dW^T, dx W^T; backward grad dx, grad dW
    nbytes = es * (2 * M * K + 2 * N * K + 2 * M * N) + es * (M * N + M * K + N * K)
    peak = ceilings["bf16" if dtype == torch.bfloat16 else "tf32"]
    benchmark.group = f"dual-linear-{case}-{str(dtype).split('.')[-1]}"
    benchmark.extra_info.update(case=case, policy=policy, flop=flop, bytes=nbytes,
                                floor_s=max(flop / peak, nbytes / ceilings["bandwidth"]))
    step()
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(ATTENTION))
def test_sdpa_primal_reference(benchmark, case, dtype, ceilings):
    """The ordinary attention the tangent rides on: F.scaled_dot_product_attention forward and
    backward at the same shapes (PyTorch's fastest backend), the yardstick for the rows below."""
    B, H, L, D = ATTENTION[case]
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))

    def step():
        for t in (q, k, v):
            t.grad = None
        F.scaled_dot_product_attention(q, k, v).backward(torch.ones(B, H, L, D, device=DEVICE, dtype=dtype))
        sync()
    flop = 2 * B * H * L * L * D * (2 + 5)  # forward: 2 products; backward: 5 with recomputation
    nbytes = q.element_size() * B * H * L * D * (4 + 7)
    peak = ceilings["bf16" if dtype == torch.bfloat16 else "tf32"]
    benchmark.group = f"attention-tangent-{case}-{str(dtype).split('.')[-1]}"
    benchmark.extra_info.update(case=case, policy="sdpa-primal", flop=flop, bytes=nbytes,
                                floor_s=max(flop / peak, nbytes / ceilings["bandwidth"]))
    step()
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(ATTENTION))
def test_attention_tangent(benchmark, case, dtype, policy, ceilings):
    B, H, L, D = ATTENTION[case]
    q, k, v = (torch.randn(B, H, L, D, device=DEVICE, dtype=dtype) for _ in range(3))
    tans = [torch.randn(B, H, L, D, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3)]

    def step():
        for t in tans:
            t.grad = None
        _, do = dual_sdpa(q, tans[0], k, tans[1], v, tans[2])
        do.backward(torch.ones_like(do))
        sync()
    flop = 2 * B * H * L * L * D * (6 + 6)  # forward: 6 products; backward: ~6 with recomputation
    nbytes = q.element_size() * B * H * L * D * (6 + 2 + 7)
    peak = ceilings["bf16" if dtype == torch.bfloat16 else "tf32"]
    benchmark.group = f"attention-tangent-{case}-{str(dtype).split('.')[-1]}"
    benchmark.extra_info.update(case=case, policy=policy, flop=flop, bytes=nbytes,
                                floor_s=max(flop / peak, nbytes / ceilings["bandwidth"]))
    step()
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)


def _stacked_cublas(x, dx, w, dw):
    """One GEMM of ``x`` against ``[W0; dW]``, then ``dx W0^T`` accumulated into the tangent
    half by cuBLAS (beta = 1): the candidate design for the dual linear on cuBLAS."""
    n = w.shape[0]
    out = x @ torch.cat([w, dw]).T
    out[:, n:].addmm_(dx, w.T)
    return out[:, :n], out[:, n:]


@pytest.mark.parametrize("impl", ["stacked-cublas", "triton", "two-linear", "torch.func.jvp"])
def test_dual_linear_forward(benchmark, impl, ceilings):
    """The Triton kernel against one stacked cuBLAS GEMM plus an accumulating one, two separate
    F.linear calls plus the tangent's second product, and torch.func.jvp of F.linear (forward only)."""
    M, K, N = LINEAR["B-32 c_fc b128"]
    x, dx = torch.randn(M, K, device=DEVICE), torch.randn(M, K, device=DEVICE)
    w, dw = torch.randn(N, K, device=DEVICE), torch.randn(N, K, device=DEVICE)
    if impl == "stacked-cublas":
        fn = lambda: _stacked_cublas(x, dx, w, dw)  # noqa: E731
    elif impl == "triton":
        from fastortho.kernels.dual_linear import dual_linear as kernel
        fn = lambda: kernel(x, dx, w, dw)  # noqa: E731
    elif impl == "two-linear":
        fn = lambda: (F.linear(x, w), F.linear(x, dw) + F.linear(dx, w))  # noqa: E731
    else:
        fn = lambda: torch.func.jvp(F.linear, (x, w), (dx, dw))  # noqa: E731

    def step():
        fn()
        sync()
    flop = 6 * M * N * K
    nbytes = 4 * (2 * M * K + 2 * N * K + 2 * M * N)
    benchmark.group = "dual-linear-forward-B-32 c_fc b128-fp32"
    benchmark.extra_info.update(case="forward", policy=impl, flop=flop, bytes=nbytes,
                                floor_s=max(flop / ceilings["tf32"], nbytes / ceilings["bandwidth"]))
    step()
    benchmark.pedantic(step, rounds=20, iterations=1, warmup_rounds=2)
