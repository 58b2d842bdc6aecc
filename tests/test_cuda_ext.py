"""The CUDA C++ extension (csrc/): compiled and loaded wherever a CUDA toolkit is found (CI
has one but no GPU: this is what keeps a C++ error from landing); its ops checked against
reference.py and torch.func.jvp on a GPU."""
import os

import pytest
import torch
from torch import nn

import fastortho as fo
from fastortho.ops import cuda_ext
from fastortho.testing import random_layers

from conftest import TOL, reference_values_and_grads, rel_err, requires_cuda

needs_toolkit = pytest.mark.skipif(cuda_ext.cuda_home() is None or torch.version.cuda is None,
                                   reason="no CUDA toolkit (nvcc) or a CPU-only torch: nothing to compile")


@needs_toolkit
def test_extension_compiles_and_registers_its_ops():
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")  # the lent H100 / H200; one target keeps CI short
    if cuda_ext.build() == "jit":
        assert os.path.exists(os.path.join(cuda_ext.build_directory(), "fastortho_cuda.so"))
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastortho::ortho_penalty_grouped", "CUDA")
    schema = str(torch.ops.fastortho.ortho_penalty_grouped.default._schema)
    assert "Tensor[] weights" in schema and 'str gram="gemm"' in schema, schema
    # the extension links the cuBLAS library torch itself loaded (one library, one handle type)
    assert cuda_ext.cublas_library() in cuda_ext.link_flags()


def test_build_folder_is_one_per_torch_version(tmp_path, monkeypatch):
    """torch's extension cache is keyed by Python and CUDA version only; a build of another
    torch must not be reused, nor its build lock waited on (torch 2.11 hangs on the lock file
    that newer torch leaves behind)."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folders = {}
    for version in ("2.11.0+cu130", "2.14.1+cu130"):
        monkeypatch.setattr(torch, "__version__", version)
        folders[version] = cuda_ext.build_directory()
    old, new = folders.values()
    assert old != new and old.startswith(str(tmp_path)) and new.startswith(str(tmp_path))
    assert "2_11_0" in os.path.basename(old) and "2_14_1" in os.path.basename(new)


def test_cublas_library_is_the_one_torch_loaded():
    path = cuda_ext.cublas_library()
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch loads no cuBLAS")
    assert path is not None and os.path.exists(path) and "libcublas.so" in path
    with open("/proc/self/maps") as maps:
        assert path in maps.read()


def test_headers_come_from_the_toolkit_when_it_has_them(tmp_path, monkeypatch):
    (tmp_path / "include").mkdir()
    monkeypatch.setattr(cuda_ext, "cuda_home", lambda: str(tmp_path))
    import importlib.util

    wheels = cuda_ext.include_dirs()  # a minimal toolkit: the pip wheels' headers
    if importlib.util.find_spec("nvidia") is None:
        assert wheels == []  # no pip CUDA wheels installed: nothing to add
    else:
        assert wheels and all("nvidia" in d for d in wheels), wheels
    for header in cuda_ext._LIBRARY_HEADERS:
        (tmp_path / "include" / header).touch()
    assert cuda_ext.include_dirs() == []


def test_cuda_gram_variable_is_checked(monkeypatch):
    from fastortho.ops.orthoreg import CUDA_CANDIDATES, cuda_candidates

    assert cuda_candidates() == CUDA_CANDIDATES
    monkeypatch.setenv("FASTORTHO_CUDA_GRAM", "syrk")
    assert cuda_candidates() == ("cuda:syrk",)
    monkeypatch.setenv("FASTORTHO_CUDA_GRAM", "herk")
    with pytest.raises(ValueError, match="FASTORTHO_CUDA_GRAM: expected one of .*'triangle'.*got 'herk'"):
        cuda_candidates()


def test_cuda_backend_errors_are_clear():
    model = nn.Linear(4, 3)
    base = fo.snapshot(model)
    with torch.no_grad():
        model.weight.add_(0.1)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        fo.ortho_loss(model, base, backend="cuda")


def test_skip_variable_disables_the_build(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_state", {})  # as in a process that has loaded no copy yet
    monkeypatch.setattr(cuda_ext, "_aot_module", lambda: None)
    monkeypatch.setenv("FASTORTHO_SKIP_CUDA_BUILD", "1")
    with pytest.raises(RuntimeError, match="FASTORTHO_SKIP_CUDA_BUILD"):
        cuda_ext.build()


# ----------------------------------------------------------------------------- GPU

# (257, 1024) / (768, 768) / (300, 520): Grams of 257, 768 and 300 rows, several block rows in
# "triangle" mode (blocks of 128 or more), one of them ragged; (1100, 520) and (520, 1100):
# a tall and a wide layer whose Gram of 520 splits into 128-multiples plus a remainder.
AWKWARD = [(33, 17), (1, 37), (65, 130), (33, 17), (17, 33), (130, 65), (37, 1), (257, 1024), (768, 768),
           (300, 520), (1100, 520), (520, 1100), (1100, 520)]


@requires_cuda
@pytest.mark.parametrize("gram", ["gemm", "triangle", "syrk"])
@pytest.mark.parametrize("precision", ["ieee", "tf32"])
@pytest.mark.parametrize("squared", [True, False])
def test_cuda_backend_matches_reference(precision, squared, gram, monkeypatch):
    monkeypatch.setenv("FASTORTHO_CUDA_GRAM", gram)
    assert cuda_ext.load(), cuda_ext.error()
    gen = torch.Generator().manual_seed(3)
    def scale_for(s):
        return (0.5 if precision != "ieee" else 1.0) * max(s) ** -0.5

    weights, bases = [], []
    for s in AWKWARD:
        w, b = random_layers([s], scale=scale_for(s), generator=gen)
        weights.append(w[0].cuda().requires_grad_(True))
        bases.append(b[0].cuda())
    from fastortho.ops.orthoreg import ortho_penalty

    values = ortho_penalty(weights, bases, squared=squared, precision=precision, backend="cuda")
    upstream = torch.linspace(-1, 2, len(weights), device="cuda")
    (values * upstream).sum().backward()
    ref_values, ref_grads = reference_values_and_grads(weights, bases, squared)
    assert rel_err(values, ref_values) <= TOL[precision]
    for w, g, u in zip(weights, ref_grads, upstream.tolist()):
        assert rel_err(w.grad, u * g) <= TOL[precision]


@requires_cuda
def test_cuda_op_passes_opcheck_and_checks_its_gram():
    assert cuda_ext.load(), cuda_ext.error()
    w = [torch.randn(33, 17, device="cuda"), torch.randn(17, 33, device="cuda")]
    b = [torch.randn_like(t) for t in w]
    for gram in ("gemm", "triangle", "syrk"):
        torch.library.opcheck(torch.ops.fastortho.ortho_penalty_grouped.default, (w, b, True, gram),
                              test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match='gram: expected "gemm", "triangle" or "syrk"'):
        torch.ops.fastortho.ortho_penalty_grouped(w, b, True, "herk")


@requires_cuda
def test_auto_backend_measures_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTORTHO_CACHE", str(tmp_path))
    assert cuda_ext.load(), cuda_ext.error()
    model = nn.Sequential(nn.Linear(64, 96), nn.Linear(96, 64)).cuda()
    base = fo.snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    fo.ortho_loss(model, base, layers="linear").backward()
    files = list(tmp_path.glob("backend-choice-*.json"))
    assert len(files) == 1
    import json
    choices = json.loads(files[0].read_text())
    from fastortho.ops.orthoreg import CUDA_CANDIDATES

    assert len(choices) == 2 and set(choices.values()) <= {"torch", "triton", *CUDA_CANDIDATES}
    assert all(key.startswith("torch|triton|cuda:gemm|cuda:triangle|cuda:syrk:") for key in choices)


def test_auto_choice_never_picks_a_failing_or_disagreeing_backend(tmp_path, monkeypatch):
    """The measured choice (CPU-testable with the timing stubbed): the faster candidate wins
    only when it agrees with Triton; one that raises or disagrees is never chosen."""
    import json

    from fastortho.ops import _measure
    from fastortho.ops.orthoreg import autotune as bc

    monkeypatch.setattr(bc, "cache_file", lambda device: tmp_path / "choice.json")
    monkeypatch.setattr(_measure, "_memory", {})
    weights = [torch.randn(4, 3), torch.randn(4, 3), torch.randn(5, 2)]
    bases = [torch.zeros_like(w) for w in weights]
    behaviour = {}

    def fake_timed(candidate, fn, ws):
        return behaviour["ms"][candidate], [fn(ws), *(torch.ones_like(w) for w in ws)]
    monkeypatch.setattr(bc, "_timed", fake_timed)

    def run(backend, ws, bs):
        if behaviour.get("raise") == backend:
            raise RuntimeError("boom")
        scale = 2.0 if behaviour.get("wrong") == backend else 1.0
        return torch.stack([w.square().sum() * scale for w in ws])

    candidates = ("triton", "cuda:gemm", "cuda:triangle")
    behaviour.update(ms={"triton": 2.0, "cuda:gemm": 1.5, "cuda:triangle": 1.0})
    assert bc.choose(weights, bases, True, "tf32", run, candidates) == ["cuda:triangle"] * 3
    assert len(json.loads((tmp_path / "choice.json").read_text())) == 2  # two shape groups
    for case in ({"wrong": "cuda:triangle"}, {"raise": "cuda:triangle"}):
        monkeypatch.setattr(_measure, "_memory", {})
        (tmp_path / "choice.json").unlink()
        behaviour.clear()
        behaviour.update(ms={"triton": 2.0, "cuda:gemm": 1.5, "cuda:triangle": 1.0}, **case)
        assert bc.choose(weights, bases, True, "tf32", run, candidates) == ["cuda:gemm"] * 3, case
    # only the first candidate is left: it is the fallback
    monkeypatch.setattr(_measure, "_memory", {})
    (tmp_path / "choice.json").unlink()
    behaviour.update(ms={"triton": 2.0, "cuda:gemm": 1.0, "cuda:triangle": 1.0})
    behaviour["wrong"] = "cuda:gemm"
    behaviour["raise"] = "cuda:triangle"
    assert bc.choose(weights, bases, True, "tf32", run, candidates) == ["triton"] * 3


@pytest.fixture
def fresh_extension_state(monkeypatch):
    monkeypatch.setattr(cuda_ext, "_state", {})
    monkeypatch.setattr(cuda_ext, "_register_python_side", lambda: None)


def _forbid_jit(monkeypatch):
    from torch.utils import cpp_extension

    def no_jit(*args, **kwargs):
        raise AssertionError("a JIT copy of the extension was built beside the ahead-of-time one")
    monkeypatch.setattr(cpp_extension, "load", no_jit)


def test_one_copy_per_process_when_the_aot_module_exists(fresh_extension_state, monkeypatch):
    """pip install -e . built fastortho._C: every later build() / load() uses it, and nothing
    JIT-builds a second copy (both would register the ops twice and abort the process)."""
    imported = []
    monkeypatch.setattr(cuda_ext, "_aot_module", lambda: object())
    monkeypatch.setattr(cuda_ext, "_import_aot", lambda: imported.append(1))
    _forbid_jit(monkeypatch)
    assert cuda_ext.build() == "aot"
    assert cuda_ext.load() and cuda_ext.build() == "aot"
    assert imported == [1]  # imported once


def test_one_copy_per_process_after_a_jit_build(fresh_extension_state, monkeypatch):
    """A JIT copy loaded first: later calls never import the ahead-of-time module as well."""
    monkeypatch.setattr(cuda_ext, "_state", {"copy": "jit"})
    monkeypatch.setattr(cuda_ext, "_import_aot", lambda: pytest.fail("the AOT module was imported after a JIT copy"))
    _forbid_jit(monkeypatch)
    assert cuda_ext.build() == "jit" and cuda_ext.load()


def test_an_aot_module_that_does_not_load_falls_back_to_jit(fresh_extension_state, monkeypatch):
    def broken():
        raise ImportError("undefined symbol: built for another torch")
    monkeypatch.setattr(cuda_ext, "_aot_module", lambda: object())
    monkeypatch.setattr(cuda_ext, "_import_aot", broken)
    monkeypatch.setattr(cuda_ext, "cuda_home", lambda: None)  # then the JIT build says why it cannot
    assert not cuda_ext.load()
    assert "no CUDA toolkit" in cuda_ext.error() or "without CUDA" in cuda_ext.error()
