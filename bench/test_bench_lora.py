"""Exact low-rank OrthoReg of LoRA adapters (value + gradient of A and B) against the released
code's dense formula (``D = s B A`` materialized, Gram, norm), on ViT-L-14 attention shapes:
24 blocks x q, k, v, o adapters of 1024 x 1024 (fastortho's default layout), and the released
layout (one adapter on the fused 3072 x 1024 ``in_proj_weight`` + one on ``out_proj``).

Each record's extra_info has FLOPs, bytes, the floor, and the relative error of the fp32
value of this implementation against the float64 dense value (the "same value" check).

    pytest bench/test_bench_lora.py --benchmark-only [--benchmark-json=bench/results/NAME.json]
"""
import contextlib

import pytest
import torch

from fastortho import reference as ref
from fastortho.ops._common import fp32_matmul
from fastortho.ops.lora import lora_ortho_penalty

from conftest import DEVICE, sync

PRECISION = "tf32" if DEVICE == "cuda" else "ieee"
WIDTH, BLOCKS = 1024, 24
LAYOUTS = {
    "qkvo": [(WIDTH, WIDTH)] * (4 * BLOCKS),
    "fused-qkv": [(3 * WIDTH, WIDTH), (WIDTH, WIDTH)] * BLOCKS,
}
CASES = [("qkvo", 8), ("qkvo", 16), ("qkvo", 64), ("fused-qkv", 16)]
IMPLS = ["released-dense", "torch", "triton"]


def adapters(layout, rank):
    gen = torch.Generator().manual_seed(rank)
    scale = 2.0
    As, Bs = [], []
    for out, inn in LAYOUTS[layout]:
        # a trained adapter: D = s B A with entries ~ 1 / sqrt(max(out, in))
        a = torch.randn(rank, inn, generator=gen) / rank ** 0.25
        b = torch.randn(out, rank, generator=gen) / (rank ** 0.25 * scale * max(out, inn) ** 0.5)
        As.append(a.to(DEVICE).requires_grad_(True))
        Bs.append(b.to(DEVICE).requires_grad_(True))
    return As, Bs, [scale] * len(As)


def cost(layout, rank):
    shapes = LAYOUTS[layout]
    low_rank_flop = sum(4 * (o + i) * rank**2 + 10 * rank**3 for o, i in shapes)
    # read A and B twice, write their gradients (fp32)
    low_rank_bytes = sum(5 * 4 * (o + i) * rank for o, i in shapes)
    dense_flop = sum(2 * o * i * rank + 6 * max(o, i) * min(o, i) ** 2 for o, i in shapes)
    return low_rank_flop, low_rank_bytes, dense_flop


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("layout,rank", CASES, ids=[f"{lay}-r{r}" for lay, r in CASES])
def test_lora_penalty_fwd_bwd(benchmark, impl, layout, rank, ceilings):
    if impl == "triton" and DEVICE != "cuda":
        pytest.skip("Triton is timed on a GPU only (the CPU runs it in the interpreter)")
    As, Bs, scales = adapters(layout, rank)
    params = As + Bs
    precision_ctx = (lambda: fp32_matmul(PRECISION, "cuda")) if DEVICE == "cuda" else contextlib.nullcontext

    if impl == "released-dense":
        def loss():
            with precision_ctx():
                return ref.released_lora_ortho_loss(zip(As, Bs, scales))
    else:
        def loss():
            return lora_ortho_penalty(As, Bs, scales, squared=False, precision=PRECISION, backend=impl).sum()

    def step():
        for p in params:
            p.grad = None
        loss().backward()
        sync()

    with torch.no_grad():
        value = float(loss())
        exact = float(sum(ref.lora_layer_penalty(a.double(), b.double(), s, squared=False)
                          for a, b, s in zip(As, Bs, scales)))
    flop, nbytes, dense_flop = cost(layout, rank)
    peak = ceilings[PRECISION]
    benchmark.group = f"lora-{layout}-r{rank}"
    benchmark.extra_info.update(
        impl=impl, layout=layout, rank=rank, adapters=len(As), precision=PRECISION, device=DEVICE,
        flop_low_rank=flop, bytes_low_rank=nbytes, flop_dense=dense_flop, peak_flops=peak,
        bandwidth=ceilings["bandwidth"], floor_s=max(flop / peak, nbytes / ceilings["bandwidth"]),
        value=value, value_rel_err_vs_float64=abs(value - exact) / exact)
    step()
    slow = impl == "released-dense" and DEVICE != "cuda"
    benchmark.pedantic(step, rounds=3 if slow else (30 if DEVICE == "cuda" else 20), iterations=1,
                       warmup_rounds=0 if slow else 2)
