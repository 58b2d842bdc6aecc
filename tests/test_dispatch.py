"""Dispatch (docs/design.md section 3, "Dispatch"): one backend registry per op, a plan made once
per caller, and a warm call whose host work does not grow with the layers: checked by counting
Python calls and by the stack at the first kernel launch, never by timing."""
import sys

import pytest
import torch
from torch import nn

import fastortho as fo
from fastortho import reference as ref
from fastortho.ops import orthoreg as ops
from fastortho.ops.lora import LORA
from fastortho.ops.registry import Backend, Choice, Registry

from conftest import TOL, rel_err

# The limit of issue 28: fastortho frames on the stack from the public call to a kernel launch.
FRAME_LIMIT = 8


# ----------------------------------------------------------------------------- registry

def test_registry_lists_resolves_and_explains():
    assert ops.ORTHOREG.names() == ("auto", "torch", "triton", "cuda")
    assert LORA.names() == ("auto", "torch", "triton")
    cpu = torch.device("cpu")
    assert ops.ORTHOREG.resolve("auto", cpu).name == "torch"
    assert ops.ORTHOREG.resolve("torch", cpu).name == "torch"
    with pytest.raises(ValueError, match=r"backend: expected one of \('auto', 'torch', 'triton', 'cuda'\), "
                                         r"got 'cuda:gemm'"):
        ops.ORTHOREG.resolve("cuda:gemm", cpu)  # a variant is not a backend name
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors.*use backend='auto' or 'torch'"):
        ops.ORTHOREG.resolve("cuda", cpu)
    cuda = ops.ORTHOREG["cuda"]
    assert cuda.variants == ("gemm", "triangle", "syrk") and not cuda.compiles and cuda.grad_into


def test_registry_choices_carry_variants_and_round_trip_their_tags():
    calls = []
    reg = Registry("toy", lambda device: "a")
    reg.register(Backend("a", lambda: lambda *args, **kw: calls.append(("a", kw)) or "a"))
    reg.register(Backend("b", lambda: lambda *args, **kw: calls.append(("b", kw)) or "b", variants=("x", "y")))
    reg.register(Backend("c", lambda: None, devices=("cuda",)))
    with pytest.raises(ValueError, match="registered already"):
        reg.register(Backend("a", lambda: None))
    choices = reg.choices(torch.device("cpu"))
    assert [c.tag for c in choices] == ["a", "b:x", "b:y"]  # "c" cannot run on a CPU
    assert [c.tag for c in reg.choices(torch.device("cpu"), lambda b: b.variants[-1:])] == ["a", "b:y"]
    assert reg.choice("b:y").run() == "b" and calls[-1] == ("b", {"variant": "y"})
    assert reg.choice("a").run() == "a" and calls[-1] == ("a", {})
    assert isinstance(reg.choice("a"), Choice) and repr(reg.choice("b:x")) == "Choice('b:x')"


# ----------------------------------------------------------------------------- plan

def _model(shapes, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    model = nn.Module()
    model.weights = nn.ParameterList(nn.Parameter(torch.randn(s, generator=gen, dtype=dtype) * 0.1) for s in shapes)
    base = {n: (p.detach() + 0.05 * torch.randn(p.shape, generator=gen, dtype=dtype)) for n, p in
            model.named_parameters()}
    return model, base


def _reference(model, base, squared=True):
    total = torch.zeros((), dtype=torch.float64)
    grads = []
    for name, p in model.named_parameters():
        w = p.detach().double().requires_grad_(True)
        value = ref.layer_penalty(w - base[name].double(), squared=squared)
        (g,) = torch.autograd.grad(value, [w])
        total = total + value.detach()
        grads.append(g)
    return total, grads


AWKWARD = [(33, 17), (17, 33), (5, 5), (33, 17), (1, 37), (17, 33), (40, 2)]


def test_the_plan_is_built_once_and_rebuilt_when_the_tensors_change(monkeypatch):
    model, base = _model(AWKWARD)
    reg = fo.OrthoReg(model, base, backend="torch", precision="ieee")
    built = []
    real = ops.build_plan
    monkeypatch.setattr(ops, "build_plan", lambda *a, **k: built.append(1) or real(*a, **k))
    for _ in range(3):
        model.zero_grad()
        reg().backward()
    assert len(built) == 1
    value, grads = _reference(model, base)
    assert rel_err(reg().detach().double(), value) < TOL["ieee"]
    assert max(rel_err(p.grad.double(), g) for p, g in zip(model.parameters(), grads)) < TOL["ieee"]
    with torch.no_grad():  # a new dtype under the same Parameter objects: a new plan
        for p in model.parameters():
            p.data = p.data.double()
    reg()
    assert len(built) == 2
    reg(), reg()
    assert len(built) == 2
    fo.ortho_loss(model, {n: b.double() for n, b in base.items()}, backend="torch", precision="ieee")
    fo.ortho_loss(model, {n: b.double() for n, b in base.items()}, backend="torch", precision="ieee")
    assert len(built) == 3  # ortho_loss keeps its own plan per model


def test_a_plan_of_many_parts_restores_layer_order_with_one_permutation(monkeypatch):
    """A measured choice that splits the layers between backends (stubbed: every other shape
    group to Triton, on a CPU under the interpreter) and mixed dtypes (one Triton launch per
    dtype pair): values and gradients equal the float64 reference, in layer order."""
    pytest.importorskip("triton")
    from fastortho.ops.orthoreg import autotune

    shapes = AWKWARD
    model, base = _model(shapes, seed=3)
    model.weights[2].data = model.weights[2].data.to(torch.bfloat16)  # its own dtype pair
    base = {n: b.to(p.dtype) for (n, p), b in zip(model.named_parameters(), base.values())}

    def choose(weights, bases, squared, precision, run, candidates):
        assert candidates[:2] == ("torch", "triton")
        return ["triton" if tuple(w.shape) in {(33, 17), (1, 37), (5, 5)} else "torch" for w in weights]

    monkeypatch.setattr(autotune, "choose", choose)
    monkeypatch.setattr(ops, "_candidates", lambda backend, chosen, device: ops.ORTHOREG.choices(device)[:2])
    monkeypatch.setenv("FASTORTHO_AUTOTUNE", "1")
    reg = fo.OrthoReg(model, base, backend="auto", precision="ieee")
    values = reg.layer_values()
    plan = next(iter(reg._plans.values()))[1]
    assert sorted(plan.choices) == ["torch", "triton", "triton"] and len(plan.parts) == 3
    assert sorted(plan.order) == list(range(len(shapes)))
    values.sum().backward()
    for i, (name, p) in enumerate(model.named_parameters()):
        tol = TOL["bf16"] if p.dtype == torch.bfloat16 else TOL["ieee"]
        w = p.detach().double().requires_grad_(True)
        expected = ref.layer_penalty(w - base[name].double(), squared=True)
        (g,) = torch.autograd.grad(expected, [w])
        assert rel_err(values[i].double(), expected.detach()) < tol, name
        assert rel_err(p.grad.double(), g) < tol, name


# ----------------------------------------------------------------------------- host cost

class _Calls:
    """Python calls made in fastortho's modules on the host while active (``sys.setprofile``).
    The interpreter runs kernel bodies as Python in fastortho's modules: that is device work,
    not counted (profiling is off inside a launch)."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        def profile(frame, event, arg):
            if event == "call" and frame.f_globals.get("__name__", "").startswith("fastortho"):
                self.count += 1
        self._run = None
        if "triton" in sys.modules:
            from triton.runtime.interpreter import InterpretedFunction

            run = self._run = InterpretedFunction.run

            def unprofiled(fn, *args, **kwargs):
                sys.setprofile(None)
                try:
                    return run(fn, *args, **kwargs)
                finally:
                    sys.setprofile(profile)
            InterpretedFunction.run = unprofiled
        sys.setprofile(profile)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        if self._run is not None:
            from triton.runtime.interpreter import InterpretedFunction

            InterpretedFunction.run = self._run


def _fastortho_chain() -> list[str]:
    chain, frame = [], sys._getframe(2)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if name.startswith("fastortho"):
            chain.append(f"{name}.{frame.f_code.co_name}")
        frame = frame.f_back
    return chain[::-1]


@pytest.fixture
def launch_chains(monkeypatch):
    """The fastortho frames on the stack at every Triton launch (the interpreter's ``run``)."""
    pytest.importorskip("triton")
    from triton.runtime.interpreter import InterpretedFunction

    chains = []
    run = InterpretedFunction.run

    def recording(self, *args, **kwargs):
        chains.append((self.fn.__name__, _fastortho_chain()))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    return chains


@pytest.mark.parametrize("precision", ["ieee", "tf32"])
def test_frames_from_the_public_call_to_every_launch_are_within_the_limit(launch_chains, precision):
    model, base = _model([(33, 17), (17, 33), (33, 17)])
    reg = fo.OrthoReg(model, base, backend="triton", precision=precision)
    reg().backward()
    launch_chains.clear()
    model.zero_grad()
    reg().backward()
    assert launch_chains, "no Triton launch was recorded"
    first = launch_chains[0][1]
    assert first[0] == "fastortho.orthoreg.forward", first
    deepest = max(launch_chains, key=lambda kc: len(kc[1]))
    assert len(deepest[1]) <= FRAME_LIMIT, f"{deepest[0]} launched {len(deepest[1])} frames deep: {deepest[1]}"


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_a_warm_call_makes_no_python_call_per_layer(backend, monkeypatch):
    """The same two shapes, 4 and then 16 layers: a warm OrthoReg call (forward + backward)
    makes the same number of Python calls in fastortho. The torch backend batches layers by
    shape on CUDA only (on a CPU there is no launch to save); its CUDA grouping is used here."""
    if backend == "triton":
        pytest.importorskip("triton")
    from fastortho.ops._common import shape_groups
    from fastortho.ops.orthoreg import torch_backend

    monkeypatch.setattr(torch_backend, "layer_groups", lambda ws: shape_groups(torch_backend.weight_shapes(ws)))
    counts = {}
    for n in (4, 16):
        model, base = _model([(24, 12), (12, 24)] * (n // 2))
        reg = fo.OrthoReg(model, base, backend=backend, precision="ieee")
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            reg().backward()
        model.zero_grad(set_to_none=True)
        with _Calls() as calls:
            reg().backward()
        counts[n] = calls.count
    assert counts[16] == counts[4], counts


def test_lora_warm_call_makes_no_python_call_per_adapter():
    pytest.importorskip("triton")
    counts = {}
    for n in (4, 16):
        model = nn.Sequential(*[nn.MultiheadAttention(24, 2) for _ in range(n)])
        fo.add_lora(model, targets="qo", rank=4)
        for a in fo.lora_adapters(model):
            with torch.no_grad():
                a.B.normal_(0, 0.1)
        reg = fo.OrthoReg(model, backend="triton", precision="ieee")
        for _ in range(2):
            model.zero_grad(set_to_none=True)
            reg().backward()
        with _Calls() as calls:
            reg().backward()
        counts[n] = calls.count
    assert counts[16] == counts[4], counts


# ----------------------------------------------------------------------------- per-layer .grad

class _PerLayer(torch.autograd.Function):
    """A penalty whose forward returns one gradient per layer, as the CUDA extension does
    (``sum w^2`` per layer, gradient ``2 w``), with the CUDA backend's backward."""

    @staticmethod
    def forward(ctx, n, *weights):
        ctx.eager = True
        ctx.save_for_backward(*[2 * w for w in weights])
        return torch.stack([w.square().sum() for w in weights])

    @staticmethod
    def backward(ctx, grad_values):
        from fastortho.ops.orthoreg import into_grad

        grads = list(ctx.saved_tensors)
        return (None, *into_grad.layer_gradients(ctx, grads, list(grad_values.unbind())))


def test_per_layer_gradients_go_into_grad_as_autograd_would_put_them():
    gen = torch.Generator().manual_seed(5)
    ws = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(3, 4), (5, 2), (1, 7)]]
    scale = torch.tensor([0.5, 2.0, -1.0])
    expected = [2 * w.detach() * s for w, s in zip(ws, scale)]
    (_PerLayer.apply(3, *ws) * scale).sum().backward()  # .grad None: installed as views
    assert all(w.grad._base is not None for w in ws)
    assert all(torch.allclose(w.grad, e) for w, e in zip(ws, expected))
    first = [w.grad for w in ws]
    (_PerLayer.apply(3, *ws) * scale).sum().backward()  # accumulated in place into them
    assert all(w.grad is f for w, f in zip(ws, first))
    assert all(torch.allclose(w.grad, 2 * e) for w, e in zip(ws, expected))
    ws[1].grad = torch.zeros_like(ws[1])  # not one of ours: autograd accumulates it
    (_PerLayer.apply(3, *ws) * scale).sum().backward()
    assert torch.allclose(ws[1].grad, expected[1]) and torch.allclose(ws[0].grad, 3 * expected[0])
    grads = torch.autograd.grad((_PerLayer.apply(3, *ws) * scale).sum(), ws)  # never into .grad here
    assert all(torch.allclose(g, e) for g, e in zip(grads, expected))
    assert torch.allclose(ws[0].grad, 3 * expected[0])


# ----------------------------------------------------------------------------- dual ops

def test_the_dual_kernel_policy_names_the_registries_backends():
    from fastortho._config import KERNEL_POLICIES
    from fastortho.ops.dual import ATTENTION_TANGENT, DUAL_LINEAR, kernel_choice

    assert set(KERNEL_POLICIES) == set(DUAL_LINEAR.names()) == set(ATTENTION_TANGENT.names())
    assert not DUAL_LINEAR["triton"].supports(torch.float64)
    assert kernel_choice("linear", "triton", "cuda", [torch.float64]) == "torch"  # what triton cannot take
    assert kernel_choice("attention", "triton", "cpu", [torch.float32]) == "triton"
    assert kernel_choice("linear", "auto", "cpu", [torch.float32]) == "torch"


def test_one_rule_layer_per_dual_op():
    """fastortho.dual lists the per-op rules; their binding and maths live in ops/dual once."""
    import torch.nn.functional as F

    from fastortho import dual
    from fastortho.ops.dual import attention, rules

    for func, module in [(F.linear, rules), (F.layer_norm, rules), (F.gelu, rules), (F.softmax, rules),
                         (F.scaled_dot_product_attention, attention), (F.multi_head_attention_forward, attention)]:
        assert dual.RULES[func].__module__ == module.__name__, func
    assert not [name for name in vars(dual) if name in ("_linear", "_layer_norm", "_sdpa", "_mha", "_gelu")]


def test_parameter_duals_are_made_once_and_remade_when_a_parameter_is_replaced():
    model = nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3))
    lin = fo.linearize(model)
    x = torch.randn(4, 6)
    first = lin._dual_params()
    assert lin._dual_params() is first
    with torch.no_grad():
        model[0].weight.add_(0.1)  # in place: the same objects, the tangent reads the new values
    expected = lin(x)
    assert lin._dual_params() is first
    model[2].weight = nn.Parameter(model[2].weight.detach() + 0.2)
    assert lin._dual_params() is not first
    tau = {n: t for n, t in lin.task_vector().items()}
    assert tau["2.weight"].abs().max() > 0.15  # the new parameter is the one regularized
    assert not torch.allclose(lin(x), expected)


def test_a_linearized_step_issues_at_most_twice_an_ordinary_steps_ops():
    """The measure that predicts a linearized step's host cost (bench/host_cost.py): ATen ops
    of forward + backward, each Dual construction counted as one more, against an ordinary
    step's; an open_clip ViT of 4 blocks. The target of issue 28 is 2.0x."""
    pytest.importorskip("open_clip")
    from fastortho.testing import linearized_op_ratio

    result = linearized_op_ratio(layers=4)
    assert result["ratio_with_constructions"] <= 2.0, result
