"""The Triton kernels of linearized models (fused dual linear, one-pass attention tangent)
against float64 references, with NaN-poisoned outputs (tests/conftest.py); and end to end through the
linearized model and tau-Jp with the kernel policy forced (under TRITON_INTERPRET=1 on CPU)."""
import math

import pytest
import torch

import fastortho as fo
from fastortho import set_kernels
from fastortho.ops.dual import attention_tangent

from conftest import TOL as TOLERANCES
from conftest import rel_err, requires_cuda

pytest.importorskip("triton")
from fastortho.kernels.attention_tangent import attention_tangent_backward, attention_with_tangent  # noqa: E402
from fastortho.kernels.dual_linear import dual_linear, dual_linear_multi  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = TOLERANCES["ieee"]


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("M,K,N", [(1, 7, 5), (37, 45, 29), (64, 33, 130)])
@pytest.mark.parametrize("parts", ["all", "dw-only", "dx-only", "no-bias"])
def test_fused_dual_linear(M, K, N, parts):
    x, w = randn(M, K, seed=1), randn(N, K, seed=2)
    dx = randn(M, K, seed=3) if parts in ("all", "dx-only", "no-bias") else None
    dw = randn(N, K, seed=4) if parts in ("all", "dw-only", "no-bias") else None
    b = randn(N, seed=5) if parts != "no-bias" else None
    db = randn(N, seed=6) if parts == "all" else None
    y, dy = dual_linear(x, dx, w, dw, b, db)
    d = {k: (v.double() if v is not None else None) for k, v in dict(x=x, dx=dx, w=w, dw=dw, b=b, db=db).items()}
    ref_y = d["x"] @ d["w"].T + (d["b"] if b is not None else 0)
    ref_dy = 0
    if dw is not None:
        ref_dy = ref_dy + d["x"] @ d["dw"].T
    if dx is not None:
        ref_dy = ref_dy + d["dx"] @ d["w"].T
    if db is not None:
        ref_dy = ref_dy + d["db"]
    assert rel_err(y, ref_y) <= TOL and rel_err(dy, ref_dy) <= TOL


def test_fused_dual_linear_multi_tangent():
    T, M, K, N = 3, 21, 19, 34
    x, w = randn(M, K, seed=1), randn(N, K, seed=2)
    dxs, dws, dbs = randn(T, M, K, seed=3), randn(T, N, K, seed=4), randn(T, N, seed=5)
    dy = dual_linear_multi(x, dxs, w, dws, dbs)
    ref = torch.stack([x.double() @ dws[t].double().T + dxs[t].double() @ w.double().T + dbs[t].double()
                       for t in range(T)])
    assert rel_err(dy, ref) <= TOL


def _attention_reference(q, k, v, dq, dk, dv, causal):
    L, S, D = q.shape[-2], k.shape[-2], q.shape[-1]
    mask = None
    if causal:
        mask = torch.zeros(L, S, dtype=torch.float64, device=q.device).masked_fill(
            ~torch.ones(L, S, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    qd, kd, vd = q.double(), k.double(), v.double()
    o = torch.softmax(qd @ kd.transpose(-1, -2) / math.sqrt(D) + (mask if mask is not None else 0), -1) @ vd
    dqd, dkd, dvd = (t.double().requires_grad_(True) for t in (dq, dk, dv))
    do = attention_tangent(qd, kd, vd, o, dqd, dkd, dvd, mask, 1 / math.sqrt(D))
    return o, do, (dqd, dkd, dvd)


@pytest.mark.parametrize("B,H,L,S,D,causal", [
    (2, 3, 19, 23, 20, False), (1, 2, 17, 17, 16, True), (1, 2, 50, 50, 64, False), (1, 1, 33, 41, 80, False),
])
def test_attention_tangent_forward_and_backward(B, H, L, S, D, causal):
    q, dq = randn(B, H, L, D, seed=1), randn(B, H, L, D, seed=2)
    k, v, dk, dv = (randn(B, H, S, D, seed=s) for s in (3, 4, 5, 6))
    o, do, lse = attention_with_tangent(q, k, v, dq, dk, dv, causal=causal)
    ref_o, ref_do, leaves = _attention_reference(q, k, v, dq, dk, dv, causal)
    assert rel_err(o, ref_o) <= TOL and rel_err(do, ref_do) <= TOL
    g = randn(B, H, L, D, seed=7)
    (ref_do * g.double()).sum().backward()
    grads = attention_tangent_backward(q, k, v, lse, g, causal=causal)
    for got, leaf in zip(grads, leaves):
        assert rel_err(got, leaf.grad) <= TOL


@requires_cuda
@pytest.mark.parametrize("L,D", [(50, 64), (257, 80), (257, 64)])
def test_attention_tangent_vit_shapes_on_gpu(L, D):
    q, dq = randn(4, 12, L, D, seed=1), randn(4, 12, L, D, seed=2)
    k, v, dk, dv = (randn(4, 12, L, D, seed=s) for s in (3, 4, 5, 6))
    o, do, lse = attention_with_tangent(q, k, v, dq, dk, dv)
    ref_o, ref_do, _ = _attention_reference(q, k, v, dq, dk, dv, False)
    assert rel_err(o, ref_o) <= TOLERANCES["tf32"] and rel_err(do, ref_do) <= TOLERANCES["tf32"]  # tf32 default


@pytest.fixture
def kernels_forced():
    set_kernels("triton")
    yield
    set_kernels("auto")


def test_set_kernels_checks_policy():
    with pytest.raises(ValueError, match="policy"):
        set_kernels("cuda")


def test_linearized_vit_and_taujp_with_kernels(kernels_forced):
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0,
                              output_dim=8).to(DEVICE)
    lin = fo.linearize(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    x = randn(2, 3, 32, 32, seed=9)
    results = {}
    for policy in ("triton", "torch"):
        set_kernels(policy)
        model.zero_grad(set_to_none=True)
        out = lin(x)
        out.square().sum().backward()
        tvs = [lin.task_vector(), {n: -2 * t for n, t in lin.task_vector().items()}]
        results[policy] = (out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()},
                           fo.taujp_matrix(lin, tvs, [x, x[:1]]))
    a, b = results["triton"], results["torch"]
    assert rel_err(a[0], b[0]) <= TOL and rel_err(a[2], b[2]) <= TOLERANCES["fp32-network"]
    for n in a[1]:
        assert rel_err(a[1][n], b[1][n]) <= TOLERANCES["fp32-network"], n


def test_kernel_path_matches_jvp_and_keeps_memory_lean(kernels_forced):
    from open_clip.transformer import VisionTransformer

    from fastortho import reference as ref
    from fastortho.testing import saved_activation_bytes

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, width=32, layers=1, heads=2, mlp_ratio=2.0,
                              output_dim=8).to(DEVICE)
    x = randn(4, 3, 32, 32, seed=9)
    statics = list(model.parameters()) + list(model.buffers())
    ordinary = saved_activation_bytes(lambda: model(x).square().sum(), statics)
    lin = fo.linearize(model)
    th0 = {n: t.double() for n, t in lin.base_values().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    ours = saved_activation_bytes(lambda: lin(x).square().sum(), statics + list(lin.buffers()))
    assert ours <= 1.15 * ordinary, (ours, ordinary)
    primal, tangent = lin.dual(x)
    model64 = model.double()
    ref_primal, ref_tangent = ref.jvp_linearized(model64, th0, {n: t.double() for n, t in lin.task_vector().items()},
                                                 x.double())
    model.float()
    assert rel_err(primal, ref_primal) <= TOL and rel_err(tangent, ref_tangent) <= TOLERANCES["fp32-network"]


@requires_cuda
@pytest.mark.parametrize("dtype,tol", [(torch.float32, TOLERANCES["tf32"]), (torch.bfloat16, TOLERANCES["bf16"])],
                         ids=["tf32", "bf16"])
def test_kernels_reduced_precision_on_gpu(dtype, tol):
    x, w, dx, dw = randn(300, 200, seed=1), randn(170, 200, seed=2), randn(300, 200, seed=3), randn(170, 200, seed=4)
    y, dy = dual_linear(*(t.to(dtype) for t in (x, dx, w, dw)))
    ref_dy = x.double() @ dw.double().T + dx.double() @ w.double().T
    assert rel_err(y, x.double() @ w.double().T) <= tol and rel_err(dy, ref_dy) <= tol
    q, dq = randn(2, 4, 257, 80, seed=5), randn(2, 4, 257, 80, seed=6)
    k, v, dk, dv = (randn(2, 4, 257, 80, seed=s) for s in (7, 8, 9, 10))
    o, do, _ = attention_with_tangent(*(t.to(dtype) for t in (q, k, v, dq, dk, dv)))
    ref_o, ref_do, _ = _attention_reference(q, k, v, dq, dk, dv, False)
    assert rel_err(o, ref_o) <= tol and rel_err(do, ref_do) <= tol


@requires_cuda
def test_linearized_step_with_kernels_compiles_on_gpu():
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, width=64, layers=1, heads=1, mlp_ratio=2.0,
                              output_dim=8).cuda()
    lin = fo.linearize(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    x = randn(4, 3, 32, 32, seed=3)
    eager = lin(x)
    out = torch.compile(lambda inp: lin(inp))(x)
    out.square().sum().backward()
    assert rel_err(out, eager) <= TOLERANCES["tf32"]


def test_auto_policy_measures_both_kernels_per_shape():
    """On CUDA "auto" measures the dual linear and the attention tangent per shape against the
    PyTorch path; "triton" forces both kernels; float64, CPU and "torch" never take a kernel."""
    from fastortho.ops.dual import kernel_choice

    f32 = [torch.float32]
    assert kernel_choice("attention", "auto", "cuda", f32) == kernel_choice("linear", "auto", "cuda", f32) == "measure"
    assert kernel_choice("attention", "auto", "cpu", f32) == kernel_choice("linear", "auto", "cpu", f32) == "torch"
    assert kernel_choice("linear", "triton", "cpu", f32) == "triton"
    assert kernel_choice("attention", "triton", "cuda", [torch.bfloat16]) == "triton"
    assert kernel_choice("linear", "triton", "cuda", [torch.float64]) == "torch"
    assert kernel_choice("attention", "torch", "cuda", f32) == kernel_choice("linear", "torch", "cuda", f32) == "torch"


@pytest.fixture
def measured_linear(tmp_path, monkeypatch):
    """The "auto" measurement of the dual linear made to run on CPU: the policy answers
    "measure", the cache lives in tmp_path, and the timing is stubbed (the candidates still
    run, the Triton one under the interpreter, so agreement is checked for real)."""
    from types import SimpleNamespace

    from fastortho.ops import _measure
    from fastortho.ops.dual import policy, rules

    monkeypatch.setattr(
        policy, "kernel_choice", lambda op, policy, device, dtypes: "measure" if op == "linear" else "torch"
    )
    monkeypatch.setattr(_measure, "cache_file", lambda device: tmp_path / "choice.json")
    monkeypatch.setattr(_measure, "_memory", {})
    monkeypatch.setattr(policy, "_choices", {})
    # what the tests read, from the modules that hold it (ops/dual/policy.py, rules.py)
    dual = SimpleNamespace(dual_linear=rules.dual_linear, _library_linear=rules._library_linear,
                           _linear_key=rules._linear_key, _choices=policy._choices)
    state = {"ms": {}, "timed": [], "fused": 0}
    real_fused = rules._fused_linear

    def fused(*args):
        state["fused"] += 1
        y, dy = real_fused(*args)
        return (y, dy * 1.5) if state.get("wrong") else (y, dy)

    def timed(op, candidate, run):
        state["timed"].append(candidate)
        return state["ms"][candidate], run()
    monkeypatch.setattr(rules, "_fused_linear", fused)
    monkeypatch.setattr(policy, "_time_dual", timed)
    return dual, state, tmp_path / "choice.json"


@pytest.mark.parametrize("faster", ["triton", "torch"])
def test_auto_dual_linear_takes_the_measured_faster_path(measured_linear, faster):
    import json

    dual, state, path = measured_linear
    state["ms"] = {"triton": 1.0, "torch": 2.0} if faster == "triton" else {"triton": 2.0, "torch": 1.0}
    x, dx, w, dw, b, db = randn(6, 2, 9, seed=1), randn(6, 2, 9, seed=2), randn(5, 9, seed=3), randn(5, 9, seed=4), \
        randn(5, seed=5), randn(5, seed=6)
    ref = dual._library_linear(x.double(), dx.double(), w.double(), dw.double(), b.double(), db.double())
    for _ in range(3):
        y, dy = dual.dual_linear(x, dx, w, dw, b, db)
        assert rel_err(y, ref[0]) <= TOL and rel_err(dy, ref[1]) <= TOL
    assert state["timed"] == ["torch", "triton"]  # measured once, both candidates
    assert state["fused"] == (1 + 3 if faster == "triton" else 1)  # the (stubbed) measurement runs it once
    table = json.loads(path.read_text())
    assert table == {"dual_linear:torch|triton:12:9:5:float32:1x1x1x1": faster}
    # a new process reads the choice from disk and measures nothing
    dual._choices.clear()
    from fastortho.ops import _measure
    _measure._memory.clear()
    dual.dual_linear(x, dx, w, dw, b, db)
    assert state["timed"] == ["torch", "triton"]


def test_auto_dual_linear_never_takes_a_disagreeing_kernel(measured_linear):
    dual, state, path = measured_linear
    state.update(ms={"triton": 1.0, "torch": 2.0}, wrong=True)
    x, w, dw = randn(4, 8, seed=1), randn(3, 8, seed=2), randn(3, 8, seed=3)
    dual.dual_linear(x, None, w, dw)
    assert (
        state["fused"] == 1
        and dual._choices[("linear", x.device, dual._linear_key(x, None, w, dw, None, None))] == "torch"
    )


def test_auto_dual_linear_does_not_measure_under_vmap_or_compile(measured_linear, monkeypatch):
    """Inside vmap (tau-Jp's batched tangents) or while compiling, an unmeasured shape takes
    the library path and records nothing, so a later eager call measures it."""
    dual, state, path = measured_linear
    state["ms"] = {"triton": 1.0, "torch": 2.0}
    x, w = randn(4, 8, seed=1), randn(3, 8, seed=2)
    dws = randn(2, 3, 8, seed=3)
    torch.vmap(lambda dw: dual.dual_linear(x, None, w, dw)[1])(dws)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    dual.dual_linear(x, None, w, dws[0])
    assert state["timed"] == [] and state["fused"] == 0 and not path.exists() and not dual._choices
    monkeypatch.undo()


@requires_cuda
def test_auto_dual_linear_measures_on_the_gpu(tmp_path, monkeypatch):
    """On a GPU under "auto": the first dual linear of a shape times cuBLAS and the Triton
    kernel, records the choice in the cache file, and either way the result is exact."""
    import json

    from fastortho.ops import _measure, dual
    from fastortho.ops.dual import policy

    monkeypatch.setenv("FASTORTHO_CACHE", str(tmp_path))
    monkeypatch.setattr(_measure, "_memory", {})
    monkeypatch.setattr(policy, "_choices", {})
    set_kernels("auto")
    x, dx = randn(256, 768, seed=1), randn(256, 768, seed=2)
    w, dw, b, db = randn(3072, 768, seed=3), randn(3072, 768, seed=4), randn(3072, seed=5), randn(3072, seed=6)
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    try:
        y, dy = dual.dual_linear(x, dx, w, dw, b, db)
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
    expected = (x.double() @ dw.double().T + dx.double() @ w.double().T + db.double())
    assert rel_err(dy, expected) <= TOL
    files = list(tmp_path.glob("backend-choice-*.json"))
    assert len(files) == 1
    table = json.loads(files[0].read_text())
    assert list(table) == ["dual_linear:torch|triton:256:768:3072:float32:1x1x1x1"]
    assert table[next(iter(table))] in ("torch", "triton")


@pytest.mark.parametrize("faster", ["triton", "torch"])
def test_auto_attention_takes_the_measured_faster_path(tmp_path, monkeypatch, faster):
    """The attention tangent's measured choice (CPU-testable with the timing stubbed; both
    candidates run, forward and backward, the Triton one under the interpreter): the faster is
    recorded and used; the caller's random state and graph are untouched by the measurement."""
    import json

    from fastortho.ops import _measure, dual
    from fastortho.ops.dual import attention, policy

    monkeypatch.setattr(
        policy, "kernel_choice", lambda op, policy, device, dtypes: "measure" if op == "attention" else "torch"
    )
    monkeypatch.setattr(_measure, "cache_file", lambda device: tmp_path / "choice.json")
    monkeypatch.setattr(_measure, "_memory", {})
    monkeypatch.setattr(policy, "_choices", {})
    timed, fused_calls = [], []
    ms = {"triton": 1.0, "torch": 2.0} if faster == "triton" else {"triton": 2.0, "torch": 1.0}

    def time_dual(op, candidate, run):
        timed.append(candidate)
        return ms[candidate], run()
    real = attention._run_fused_sdpa
    monkeypatch.setattr(policy, "_time_dual", time_dual)
    monkeypatch.setattr(attention, "_run_fused_sdpa", lambda *a: fused_calls.append(1) or real(*a))
    q, k, v = randn(1, 2, 19, 16, seed=1), randn(1, 2, 23, 16, seed=2), randn(1, 2, 23, 16, seed=3)
    tans = [randn(1, 2, n, 16, seed=s).requires_grad_(True) for n, s in ((19, 4), (23, 5), (23, 6))]
    rng = torch.get_rng_state()
    o, do = dual.dual_sdpa(q, tans[0], k, tans[1], v, tans[2])
    assert torch.equal(torch.get_rng_state(), rng)
    do.square().sum().backward()
    assert timed == ["torch", "triton"] and len(fused_calls) == 1 + (faster == "triton")
    table = json.loads((tmp_path / "choice.json").read_text())
    assert table == {"dual_attention:torch|triton:1x2x19x16:23:16:float32:1x1x1:0": faster}
    t64 = [t.detach().double().requires_grad_(True) for t in tans]
    q64, k64, v64 = q.double(), k.double(), v.double()
    o64 = torch.softmax(q64 @ k64.transpose(-1, -2) / 4.0, -1) @ v64
    expected = attention_tangent(q64, k64, v64, o64, *t64, None, 0.25)
    expected.square().sum().backward()
    assert rel_err(o, o64) <= TOL and rel_err(do, expected) <= TOL
    for t, r in zip(tans, t64):
        assert rel_err(t.grad, r.grad) <= TOL
