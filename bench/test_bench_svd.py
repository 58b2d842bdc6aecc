"""One float32 SVD, and a batch of 8, of each ViT-B-32 matrix shape: the per-matrix costs the
SVD merge rows (bench/test_bench_merge.py) are made of, by route.

- ``torch``: one ``torch.linalg.svd`` of one matrix with torch's default driver (on CUDA
  ``gesvdj``); on CUDA also each cuSOLVER driver named (``torch-gesvd``, ``torch-gesvdj``), to
  show which a merge should use;
- ``torch-float64``: the same matrix in float64, the cost of the retry after a float32 batch
  fails to converge (a merge row near this rate per matrix has fallen back);
- ``torch-batch``: torch's own call on the batch of 8 (on CUDA one ``gesvdj`` after another on
  one stream, then one host synchronization);
- ``fastortho-1-worker``: fastortho's SVD with ``FASTORTHO_SVD_WORKERS=1``, one matrix per call;
- ``fastortho``: fastortho's SVD as merges call it (CUDA: 8 streams from 8 host threads; CPU:
  one single-threaded slice per thread).

Each record's extra_info has the matrices per call and their FLOPs (conftest.svd_flop, a
floor); bench/summarize.py divides by the matrices. The rows for one shape run in one process;
run one shape per command (``-k 768x768``) where a time limit could cut it short,
as bench/gpu_check.py does, so that a cut loses only that shape's JSON.

    pytest bench/test_bench_svd.py --benchmark-only [-k 3072x768] [--benchmark-json=NAME.json]
"""
import os

import pytest
import torch

from conftest import DEVICE, svd_flop, sync

SHAPES = [(768, 768), (3072, 768), (768, 3072)]  # attention projections, MLP in, MLP out
BATCH = 8
ROUTES = ["torch", "torch-gesvd", "torch-gesvdj", "torch-float64", "torch-batch", "fastortho-1-worker", "fastortho"]
CUDA_DRIVERS = {"torch-gesvd": "gesvd", "torch-gesvdj": "gesvdj"}
ROUNDS = int(os.environ.get("FASTORTHO_BENCH_ROUNDS", 3))


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{m}x{n}" for m, n in SHAPES])
def test_svd(benchmark, shape, route, monkeypatch):
    from fastortho.merge import _svd

    if route in CUDA_DRIVERS and DEVICE != "cuda":
        pytest.skip("cuSOLVER drivers: CUDA only")
    m, n = shape
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(BATCH, m, n, generator=gen, device=DEVICE)
    batched = route in ("torch-batch", "fastortho-1-worker", "fastortho")
    if route == "fastortho-1-worker":
        monkeypatch.setenv("FASTORTHO_SVD_WORKERS", "1")
    if route == "torch-float64":
        x = x.double()
    matrices = x if batched else x[0]
    driver = CUDA_DRIVERS.get(route)

    def call():
        if route.startswith("fastortho"):
            _svd.svd(matrices)
        else:
            torch.linalg.svd(matrices, full_matrices=False, **({"driver": driver} if driver else {}))
        sync()

    benchmark.group = f"svd {m}x{n}"
    # every route's one-time costs (handles, streams, workspaces) paid before the timed rounds
    benchmark.pedantic(call, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    count = BATCH if batched else 1
    benchmark.extra_info.update(impl=route, shape=f"{m}x{n}", matrices=count, dtype=str(x.dtype).split(".")[-1],
                                flop=count * svd_flop(m, n))
