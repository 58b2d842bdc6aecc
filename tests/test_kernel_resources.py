"""Every Triton kernel, at the configuration its launcher picks on CUDA, compiles for sm_90a
(H100 / H200) within the shared memory a block may have: a configuration that could not launch
on the GPU fails here, on a machine without one (fastortho.kernels.resources). The compiles
run in one subprocess without TRITON_INTERPRET, which would replace the kernels."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from fastortho.kernels.resources import SM90_SHARED_LIMIT, gpu_launch_cases  # noqa: E402

NAMES = [case[0] for case in gpu_launch_cases("tf32")]

# Spill-store bytes per thread that ptxas reports at sm_90a, where not zero: a kernel may not
# spill more than this (every other kernel not at all), so a configuration or code change that
# adds spills fails here. The budgets hold on the oldest supported triton (3.6, the GPU image's)
# and the newest (3.8 today); CI runs this file under both. Register allocation differs by
# version, so the launchers pick configurations that spill on neither where one exists (the
# fp32 attention at head dim 64, the accumulating OrthoReg gradient). The fp32 attention forward
# at head dims 65-128 spills the same 288 B on both. bench/static_kernels.py prints the table.
SPILL_BUDGET = {"attention fwd d80 fp32": 288, "attention fwd d128 fp32": 288}

@pytest.fixture(scope="module")
def reports():
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no CUDA backend to compile for")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "fastortho.kernels.resources", "--precision", "tf32"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return {row["kernel"]: row for row in map(json.loads, out.stdout.splitlines())}


@pytest.mark.parametrize("name", NAMES)
def test_kernel_fits_an_sm90_block(reports, name):
    report = reports[name]
    assert report["shared_bytes"] <= SM90_SHARED_LIMIT, report
    from fastortho.kernels.resources import ptxas

    if ptxas() is None:
        pytest.skip("no ptxas: registers and spills cannot be read")
    assert report["spill_store_bytes"] is not None, report  # ptxas ran and was parsed
    assert report["spill_store_bytes"] <= SPILL_BUDGET.get(name, 0), report


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith(("orthoreg gram", "orthoreg grad"))])
def test_orthoreg_mainloops_keep_a_product_in_flight(reports, name):
    """The Gram over the scratch, and the "tf32" mode's gradient over it, pipeline at sm_90a:
    asynchronous loads, and the only wait for every tensor-core product (pendings = 0) is the
    one after the loop, so inside the loop a product stays in flight while the next tiles load
    (docs/design.md section 6)."""
    report = reports[name]
    assert report["wgmma"] >= 1 and report["async_copies"] > 0, report
    assert report["waits_with_no_pending"] <= 1 < report["waits"], report
