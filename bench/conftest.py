"""Benchmark setup: device and library versions go into every saved JSON (machine_info);
pytest-benchmark adds the git commit itself (commit_info)."""
import os
import platform

import pytest
import torch

# On a CPU-only machine Triton kernels can only run under the interpreter; benchmarks do not
# time them there (see the skips), but importing them must still work.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def device_name() -> str:
    if DEVICE == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"


def pytest_benchmark_update_machine_info(config, machine_info):
    import fastortho

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine_info["device"] = device_name()
    machine_info["torch"] = torch.__version__
    machine_info["torch_cuda"] = torch.version.cuda
    machine_info["triton"] = triton_version
    machine_info["fastortho"] = fastortho.__version__


def bench_models() -> list[str]:
    """ViT shape sets to time: FASTORTHO_BENCH_MODELS (comma-separated) or, by default, both
    on a GPU and only ViT-B-32 on a CPU (ViT-L-14's released-code step takes minutes there)."""
    default = "ViT-B-32,ViT-L-14" if DEVICE == "cuda" else "ViT-B-32"
    return [m for m in os.environ.get("FASTORTHO_BENCH_MODELS", default).split(",") if m]


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def device():
    return DEVICE
