"""fastortho.merge on each device it runs on: the CPU here, a CUDA device on the GPU machine
(``bench/gpu_check.sh --plan merge`` selects the ``gpu`` cases). tests/test_merge.py ties the
CPU results to FusionBench's; these tie every device's float32 merge to the same merge in
float64 on the CPU, and check what only a device shows: vectors kept on the CPU merged on the
device, DARE's seeded draws there, the precision of the products under a training script's
TF32 or autocast, the number of SVD workers, and (CUDA) the peak memory against the two-vector
bound. The SVD tests also run the GPU's arrangement on the CPU ("cpu-plain"), so that all of
the GPU's code but its streams runs here. No transformers or fusion-bench needed: the GPU image
has neither."""
import pytest
import torch

import fastortho as fo
from fastortho.merge import METHODS, _svd, merge_vectors

CUDA = pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                       reason="needs a CUDA device")])
DEVICES = ["cpu", CUDA]
# where the SVD methods run: also "cpu-plain", the CPU with the GPU's arrangement (one plain SVD
# per matrix in each worker's slice, no transposes or QR routes), so that the code a GPU runs
# is exercised here too, streams apart
ARRANGEMENTS = ["cpu", "cpu-plain", CUDA]
# every method whose result does not depend on the device's random draws (DARE's do)
DETERMINISTIC = [m for m in METHODS if not m.startswith("dare")]
SVD_METHODS = ["tsvm", "isoc", "isocts"]


def vit_like(width=32, mlp=80, layers=3, seed=0, scale=0.02) -> dict[str, torch.Tensor]:
    """The tensors of a small ViT: tall (qkv, fc1), square (out), wide (fc2) matrices in shape
    groups of ``layers``, biases, a 4-D patch embedding and a class token (the non-matrices
    are averaged by the SVD methods)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"patch.weight": (width, 3, 4, 4), "cls": (width,)}
    for i in range(layers):
        shapes.update({f"l{i}.qkv.weight": (3 * width, width), f"l{i}.qkv.bias": (3 * width,),
                       f"l{i}.out.weight": (width, width), f"l{i}.fc1.weight": (mlp, width),
                       f"l{i}.fc2.weight": (width, mlp), f"l{i}.fc2.bias": (width,)})
    return {k: scale * torch.randn(s, generator=gen) for k, s in shapes.items()}


def task_vectors(n=4, device="cpu", dtype=torch.float32, **shape) -> dict[str, fo.TaskVector]:
    return {f"task{t}": fo.TaskVector({k: x.to(device=device, dtype=dtype) for k, x in
                                       vit_like(seed=1 + t, **shape).items()}) for t in range(n)}


def placed(arrangement: str, monkeypatch) -> str:
    """The device of an arrangement (see ARRANGEMENTS), with "cpu-plain"'s switch made."""
    if arrangement == "cpu-plain":
        monkeypatch.setattr(_svd, "_lapack_routes", lambda x: False)
        return "cpu"
    return arrangement


def relative_error(got, expected) -> float:
    """The largest entry error of any tensor, relative to that tensor's largest entry (infinite
    where either holds a NaN: Python's ``max`` and ``<`` would let a NaN pass)."""
    assert set(got) == set(expected)
    errors = torch.stack([(got[k].double().cpu() - expected[k].double().cpu()).abs().max() /
                          expected[k].double().abs().max() for k in expected])
    return float(errors.nan_to_num(nan=float("inf")).max())


@pytest.mark.parametrize("method", DETERMINISTIC)
@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_float32_merge_on_each_device_equals_the_float64_merge(arrangement, method, monkeypatch):
    """The float32 merge on the device against the float64 merge on the CPU (itself equal to
    FusionBench's, tests/test_merge.py): float32 round-off, relative to each tensor's size."""
    expected = merge_vectors(task_vectors(dtype=torch.float64), method)  # (LAPACK's routes)
    device = placed(arrangement, monkeypatch)
    got = merge_vectors(task_vectors(device=device), method)
    for k, x in got.items():
        assert x.device.type == device and x.dtype == torch.float32, k
    error = relative_error(got, expected)
    if method in ("ta", "ties"):  # they only add, compare and select: the sums' rounding alone
        assert error < 1e-6
    elif device == "cpu":  # LAPACK in float32: 1e-6 to 2e-5 here (TSV-M's and Iso-CTS's truncations)
        assert error < 5e-5
    else:  # the device's float32 SVDs as accurate as LAPACK's, within a factor
        assert error < 4 * max(relative_error(merge_vectors(task_vectors(), method), expected), 1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", [m for m in METHODS if m != "ta"])
def test_vectors_on_the_cpu_merged_on_the_gpu(method):
    """``device="cuda"`` for vectors kept on the CPU: the result comes back to the CPU, and it is
    the merge of the same vectors held on the GPU (DARE's draws included: its generator lives
    on the compute device either way; one different draw would be an O(1) error)."""
    kept = merge_vectors(task_vectors(), method, device="cuda")
    there = merge_vectors(task_vectors(device="cuda"), method)
    for k in there:
        assert kept[k].device.type == "cpu" and kept[k].dtype == torch.float32
    # the same kernels on the same values: equal unless a library picks another algorithm
    assert relative_error(kept, there) < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_dare_on_each_device_is_seeded_drops_the_rate_and_rescales(device):
    gen = torch.Generator().manual_seed(0)
    tvs = {f"t{i}": fo.TaskVector({"w": torch.randn(300, 200, generator=gen).to(device)}) for i in range(2)}
    a = merge_vectors(tvs, "dare", seed=1, p=0.9)
    assert torch.equal(a["w"], merge_vectors(tvs, "dare", seed=1, p=0.9)["w"])
    assert not torch.equal(a["w"], merge_vectors(tvs, "dare", seed=2, p=0.9)["w"])
    one = merge_vectors({"t0": tvs["t0"]}, "dare", seed=1, p=0.9)["w"]
    kept = one != 0
    assert 0.09 < float(kept.float().mean()) < 0.11  # 60000 draws: the rate within 8 sigma
    torch.testing.assert_close(one[kept], tvs["t0"]["w"][kept] / 0.1)
    assert torch.equal(merge_vectors(tvs, "dare", p=0.0)["w"], merge_vectors(tvs, "ta")["w"])
    ties = merge_vectors(tvs, "dare-ties", seed=1, p=0.9)
    assert torch.equal(ties["w"], merge_vectors(tvs, "dare-ties", seed=1, p=0.9)["w"])


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("device", DEVICES)
def test_svd_merges_ignore_the_callers_tf32_and_autocast(device, method, restore_matmul_precision):
    """A training script's ``set_float32_matmul_precision("medium")`` or an open bf16 autocast
    must not round the merge's products (1e-3 relative on a GPU): the merge runs its products
    in true float32 and puts the caller's settings back."""
    vectors = task_vectors(device=device)
    expected = merge_vectors(vectors, method)
    torch.set_float32_matmul_precision("medium")
    with torch.autocast(device, dtype=torch.bfloat16):
        got = merge_vectors(vectors, method)
        assert torch.is_autocast_enabled(device)
    assert torch.get_float32_matmul_precision() == "medium"
    for k in expected:
        assert got[k].dtype == torch.float32
    assert relative_error(got, expected) < 1e-6


@pytest.mark.parametrize("method", SVD_METHODS)
@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_svd_merges_do_not_depend_on_how_many_workers_solve_them(arrangement, method, monkeypatch):
    """``FASTORTHO_SVD_WORKERS``: one matrix after another, or slices at once on threads (on a
    GPU each with its own stream), more workers than matrices included. The same routine
    solves each matrix, but MKL's float32 ``gesdd`` rounds differently with the thread count
    and the data's alignment, from run to run (TSV-M's and Iso-CTS's truncations amplify that:
    up to 1.7e-5 and 1.5e-4 here), so each is held to the float64 merge: within the bound of
    its method, or as accurate as one after another within a factor (cuSOLVER on a GPU). A
    slice written twice or a stream not waited for is an O(1) error. The result is read on
    the caller's stream with no synchronization of its own. Each run merges the vectors scaled
    by another power of two (the merge scales with them), so that a slice left unwritten cannot pass
    by holding the previous run's result in reused memory."""
    monkeypatch.setenv("FASTORTHO_SVD_WORKERS", "1")  # the reference: no slices, LAPACK's routes
    expected = merge_vectors(task_vectors(n=3, dtype=torch.float64, layers=5), method)
    vectors = task_vectors(n=3, device=placed(arrangement, monkeypatch), layers=5)
    errors = {}
    for scale, workers in zip((1, 2, 4, 8), ("1", "2", "3", "64")):  # exact: the same rounding
        monkeypatch.setenv("FASTORTHO_SVD_WORKERS", workers)
        scaled = {t: fo.TaskVector({k: scale * x for k, x in v.items()}) for t, v in vectors.items()}
        errors[workers] = relative_error(merge_vectors(scaled, method), {k: scale * x for k, x in expected.items()})
    bound = max({"tsvm": 1e-4, "isoc": 1e-5, "isocts": 1e-3}[method], 4 * errors["1"])
    assert max(errors.values()) < bound, errors
    monkeypatch.setenv("FASTORTHO_SVD_WORKERS", "0")
    with pytest.raises(ValueError, match="FASTORTHO_SVD_WORKERS: expected a positive integer, got '0'"):
        merge_vectors(vectors, method)


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_an_svd_that_fails_in_float32_on_the_device_is_solved_in_float64(arrangement, monkeypatch):
    """A float32 SVD can fail to converge on matrices with many repeated zero singular values
    (Iso-CTS's projected task matrices; LAPACK's gesdd does on ViT-B-32 shapes): the batch is
    solved again in float64 and rounded back."""
    device = placed(arrangement, monkeypatch)
    vectors = task_vectors(device=device)
    expected = merge_vectors(vectors, "isocts")
    real, calls = torch.linalg.svd, []

    def flaky(x, full_matrices=True, **kw):
        calls.append(x.dtype)
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(x, full_matrices=full_matrices, **kw)

    monkeypatch.setattr(torch.linalg, "svd", flaky)
    got = merge_vectors(vectors, "isocts")
    assert torch.float64 in calls
    for k in got:
        assert got[k].dtype == torch.float32 and got[k].device.type == device
    assert relative_error(got, expected) < 2e-5


@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
@pytest.mark.parametrize("shape,rank", [((5, 70, 20), 6), ((2, 3, 20, 70), 7), ((7, 24, 24), 24), ((1, 41, 9), 2),
                                        ((3, 768, 96), 12)])
def test_device_svds_equal_float64_lapack(arrangement, shape, rank, monkeypatch):
    """``top_svd`` and ``polar_and_values`` in float32 in each arrangement (on the GPU one
    cuSOLVER call per matrix, on several streams) against LAPACK in float64 on the CPU:
    singular values and the sign-free products ``U diag(s) V^T`` and ``U V^T``; wide, tall,
    square and batched shapes."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)), dtype=torch.float64)
    device = placed(arrangement, monkeypatch)
    u, s, vh = _svd.top_svd(x.float().to(device), rank)
    u64, s64, vh64 = torch.linalg.svd(x, full_matrices=False)
    torch.testing.assert_close(s.double().cpu(), s64[..., :rank], rtol=1e-5, atol=1e-5)
    low_rank = (u64[..., :rank] * s64[..., None, :rank]) @ vh64[..., :rank, :]
    torch.testing.assert_close(((u * s[..., None, :]) @ vh).double().cpu(), low_rank, rtol=1e-4, atol=1e-4)
    p, s_all = _svd.polar_and_values(x.float().to(device))
    torch.testing.assert_close(p.double().cpu(), u64 @ vh64, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(s_all.double().cpu(), s64, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", [m for m in METHODS if m != "ta"])
def test_gpu_merge_peak_memory_within_two_vectors(method):
    """The issue's memory bound on the GPU, where the allocator counts every byte: above the
    inputs, the merge holds at most its output and two vector-sized temporaries (cuSOLVER's
    workspaces included, which torch allocates)."""
    vectors = task_vectors(n=8, device="cuda", width=256, mlp=1024, layers=4)
    size = 4 * sum(x.numel() for x in next(iter(vectors.values())).values())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    merged = merge_vectors(vectors, method)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start
    assert merged is not None
    assert peak <= 3 * size, f"{method}: {peak / size:.2f} vector sizes above the inputs"
