"""OrthoReg penalty + gradient (forward and backward) over every regularized tensor of a ViT
visual tower: the released-code reference (eager and torch.compile) against fastortho's
backends. Each record's extra_info carries FLOPs, bytes, the device ceilings measured in the
same run and the floor ``max(FLOPs / peak, bytes / bandwidth)``.

    pytest bench/ --benchmark-only [--benchmark-json=bench/results/NAME.json]
"""
import contextlib

import pytest
import torch
from torch import nn

import fastortho as fo
from fastortho import reference as ref
from fastortho.ops._common import fp32_matmul
from fastortho.testing import random_layers, vit_weight_shapes

from conftest import DEVICE, bench_models, sync

# The precision every timed case uses: tf32 on a GPU (the targets of docs/design.md section 6), fp32 on a CPU.
PRECISION = "tf32" if DEVICE == "cuda" else "ieee"
# "cuda" picks its Gram variant per shape group by measurement; "cuda-<gram>" forces one.
# most important first (a time-limited run keeps what it reached); torch.compile's compile last
# "triton-accumulate": .grad already holds a gradient (gradient accumulation), so the backward
# accumulates into it in place; "-autograd": the same through autograd (FASTORTHO_GRAD_INTO_WEIGHTS=0).
IMPLS = ["released", "torch", "triton", "auto", "triton-accumulate", "triton-accumulate-autograd", "cuda", "cuda-gemm",
         "cuda-triangle", "cuda-syrk", "released-compiled"]
# bf16 mode on a GPU for fastortho's own backends (the released code has no such mode)
BF16_IMPLS = ["torch", "triton", "auto"] if DEVICE == "cuda" else []
BACKEND_OF = {"cuda-gemm": "cuda", "cuda-triangle": "cuda", "cuda-syrk": "cuda"}


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
        "model": name, "layers": len(shapes), "precision": PRECISION, "device": DEVICE, "numel": numel,
        # dense Gram (2 big k^2) + gradient product (2 big k^2) per layer
        "flop_dense": 4 * big_k2,
        # the least work: half the symmetric Gram + the gradient product
        "flop_min": 3 * big_k2,
        # read W and W0 twice, write the gradient once (fp32)
        "bytes": 5 * 4 * numel,
        # triton: read W and W0, write D, read D for the Gram and the gradient, write the
        # gradient: 24 B per element with an fp32 scratch (ieee), 18 B with a 16-bit one (bf16,
        # and tf32's scaled fp16)
        "bytes_scratch_fp32": (8 + 3 * 4 + 4) * numel, "bytes_scratch_16bit": (8 + 3 * 2 + 4) * numel,
    }
    return model, base, info


@pytest.fixture(scope="module", params=bench_models())
def vit(request):
    return workload(request.param)


def released_step(model, base, compiled=False):
    loss_fn = torch.compile(ref.released_ortho_loss) if compiled else ref.released_ortho_loss

    def step():
        model.zero_grad(set_to_none=True)
        with fp32_matmul(PRECISION, "cuda") if DEVICE == "cuda" else contextlib.nullcontext():
            loss_fn(model, base).backward()
        sync()
    return step


def fastortho_step(model, base, backend, precision=PRECISION, accumulate=False):
    reg = fo.OrthoReg(model, base, squared=False, precision=precision, backend=backend,
                      check_finite=False)

    def step():
        if not accumulate:
            model.zero_grad(set_to_none=True)
        reg().backward()
        sync()
    return step


@pytest.mark.parametrize("impl", IMPLS + [f"{i}@bf16" for i in BF16_IMPLS])
def test_orthoreg_penalty_fwd_bwd(benchmark, vit, impl, ceilings, monkeypatch):
    model, base, info = vit
    impl, _, mode = impl.partition("@")
    precision = mode or PRECISION
    if impl not in ("released", "torch") and DEVICE != "cuda":
        pytest.skip(f"{impl} is timed on a GPU only (CPU: compile time / Triton interpreter)")
    if impl.startswith("cuda"):
        from fastortho.ops import cuda_ext

        if not cuda_ext.load():
            pytest.skip(f"the CUDA extension is not available: {cuda_ext.error()}")
        if impl != "cuda":
            monkeypatch.setenv("FASTORTHO_CUDA_GRAM", impl.partition("-")[2])
    if impl == "triton-accumulate-autograd":
        monkeypatch.setenv("FASTORTHO_GRAD_INTO_WEIGHTS", "0")
    if impl.startswith("released"):
        step = released_step(model, base, compiled=impl == "released-compiled")
    else:
        accumulate = impl.startswith("triton-accumulate")
        step = fastortho_step(model, base, "triton" if accumulate else BACKEND_OF.get(impl, impl), precision,
                              accumulate)
    peak = ceilings[precision]
    nbytes = info["bytes"]
    if impl.startswith("triton"):  # the floor of that design's own traffic and products
        sixteen = precision in ("bf16", "tf32")  # tf32 mode: fp16 operands, at the 16-bit rate
        nbytes = info["bytes_scratch_16bit" if sixteen else "bytes_scratch_fp32"]
        peak = ceilings["bf16"] if sixteen else peak
        if impl.startswith("triton-accumulate"):  # the product reads the gradient it adds to
            nbytes += 4 * info["numel"]
    floor = max(info["flop_min"] / peak, nbytes / ceilings["bandwidth"])
    benchmark.group = f"orthoreg-{info['model']}"
    benchmark.extra_info.update(info, impl=impl, precision=precision, peak_flops=peak,
                                bandwidth=ceilings["bandwidth"], floor_s=floor, bytes=nbytes)
    for _ in range(3):  # warm-up: compilation, autotuning of cuBLAS, caches
        step()
    benchmark.pedantic(step, rounds=30 if DEVICE == "cuda" else 5, iterations=1, warmup_rounds=1)
