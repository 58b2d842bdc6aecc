"""The host side of a warm penalty call on the CUDA code path, without a GPU (bench/host_cost.py
says how, and what is and is not included): device operations issued, fastortho Python calls,
the deepest chain of fastortho frames at a launch, and the Python wall time here; for the
OrthoReg penalty of ViT-B-32 (50 tensors) and ViT-L-14 (98), and the LoRA penalty of ViT-L-14
with q/k/v/o adapters (96). Also the ATen-op ratio of a linearized step to an ordinary one.

Targets (issue 28): device operations per call flat in the number of layers (<= 24, Triton
backend), <= 150 fastortho Python calls per warm call growing by <= 1 per added layer, a chain
of <= 8 fastortho frames, a linearized step within 2.0x an ordinary step's ATen ops with
subclass constructions counted.

    pytest bench/test_bench_host.py --benchmark-only [--benchmark-json=bench/results/NAME.json]

Both OrthoReg backends are measured, Triton and torch (cuBLAS products by shape group), in the
"tf32" mode.
"""
import pytest

import fastortho as fo
from fastortho.testing import vit_weight_shapes

from conftest import DEVICE
from host_cost import cuda_path_on_meta, linearized_op_ratio, measure, meta_allowed, shape_set

pytestmark = [pytest.mark.benchmark(group="host"),
              pytest.mark.skipif(DEVICE == "cuda", reason="the meta simulation of the CUDA path is for CPU machines")]


def _timed(benchmark, call, info):
    with cuda_path_on_meta():
        benchmark.pedantic(call, rounds=20, warmup_rounds=2)
    benchmark.extra_info.update(info)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("model_name", ["ViT-B-32", "ViT-L-14"])
def test_host_orthoreg(benchmark, model_name, backend):
    model, base = shape_set(vit_weight_shapes(model_name))
    with meta_allowed():
        reg = fo.OrthoReg(model, base, precision="tf32", backend=backend, check_finite=False)

    def call():
        model.zero_grad(set_to_none=True)
        reg().backward()

    counts = measure(call)
    _timed(benchmark, call, {"case": "orthoreg", "model": model_name, "backend": backend, "precision": "tf32",
                             "layers": len(reg.names), **counts})


def test_host_lora_triton(benchmark):
    open_clip = pytest.importorskip("open_clip")
    visual = open_clip.create_model("ViT-L-14", pretrained=None, device="meta").visual
    fo.add_lora(visual, targets="qkvo", rank=16)
    with meta_allowed():
        reg = fo.OrthoReg(visual, precision="tf32", backend="triton", check_finite=False)

    def call():
        visual.zero_grad(set_to_none=True)
        reg().backward()

    counts = measure(call)
    _timed(benchmark, call, {"case": "lora", "model": "ViT-L-14 qkvo r16", "backend": "triton", "precision": "tf32",
                             "layers": len(reg.names), **counts})


def test_host_linearized_op_ratio(benchmark):
    pytest.importorskip("open_clip")
    result = benchmark.pedantic(linearized_op_ratio, rounds=1, iterations=1)
    benchmark.extra_info.update({"case": "linearized", "model": "open_clip ViT, 4 blocks", **result})
