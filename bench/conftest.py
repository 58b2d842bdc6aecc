"""Benchmark setup: device and library versions go into every saved JSON (machine_info);
pytest-benchmark adds the git commit itself (commit_info)."""
import os
import platform
import time

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


def pytest_benchmark_update_json(config, benchmarks, output_json):
    # The device machine gets a copy of the working tree without .git: the run script passes
    # the commit in FASTORTHO_COMMIT.
    commit = os.environ.get("FASTORTHO_COMMIT")
    if commit and output_json.get("commit_info", {}).get("id") in (None, "", "unknown"):
        output_json["commit_info"] = {"id": commit, "source": "FASTORTHO_COMMIT"}


def bench_models() -> list[str]:
    """ViT shape sets to time: FASTORTHO_BENCH_MODELS (comma-separated) or, by default, both
    on a GPU and only ViT-B-32 on a CPU (ViT-L-14's released-code step takes minutes there)."""
    default = "ViT-B-32,ViT-L-14" if DEVICE == "cuda" else "ViT-B-32"
    return [m for m in os.environ.get("FASTORTHO_BENCH_MODELS", default).split(",") if m]


def gpu_busy_seconds(fn) -> float:
    """Seconds the GPU spends in kernels during one call of ``fn`` (torch.profiler, summed
    device self time): against the wall time, how host-bound a step is."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


def svd_flop(m: int, n: int) -> int:
    """FLOPs of one thin SVD of an ``m x n`` matrix, a floor: ``4 m k^2 + 8 k^3``, k the smaller side."""
    big, small = max(m, n), min(m, n)
    return 4 * big * small * small + 8 * small ** 3


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="session")
def device():
    return DEVICE


def _median_time(fn, reps: int) -> float:
    """Median seconds of ``fn`` (CUDA events on a GPU), after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


@pytest.fixture(scope="session")
def ceilings():
    """Device ceilings measured in this run: matmul rate per precision (FLOP/s) and copy
    bandwidth (bytes read + written per second). The floors of every case divide by these."""
    from fastortho.ops._common import fp32_matmul

    n = 8192 if DEVICE == "cuda" else 1024
    a = torch.randn(n, n, device=DEVICE)
    b = torch.randn(n, n, device=DEVICE)
    out = {}
    if DEVICE == "cuda":
        for precision in ("ieee", "tf32"):
            with fp32_matmul(precision, "cuda"):
                out[precision] = 2 * n**3 / _median_time(lambda: a @ b, 5 if precision == "ieee" else 10)
        a16, b16 = a.bfloat16(), b.bfloat16()
        out["bf16"] = 2 * n**3 / _median_time(lambda: a16 @ b16, 10)
    else:
        rate = 2 * n**3 / _median_time(lambda: a @ b, 5)
        out.update(ieee=rate, tf32=rate, bf16=rate)
    x = torch.empty(2**28 if DEVICE == "cuda" else 2**25, dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    out["bandwidth"] = 2 * x.numel() / _median_time(lambda: y.copy_(x), 10)
    return out
