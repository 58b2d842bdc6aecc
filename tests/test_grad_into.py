"""The OrthoReg gradient written straight into ``.grad`` (fastortho/ops/orthoreg/into_grad.py):
the same ``.grad`` as through autograd in every flow a training loop uses, one gradient-sized
pass fewer under accumulation, and autograd's own path wherever a direct write would differ."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastortho import reference as ref
from fastortho.ops.orthoreg import ortho_penalty

from conftest import TOL, rel_err, requires_cuda

SHAPES = [(33, 17), (17, 33), (33, 17), (1, 37), (17, 33)]
# (backend, precision): the torch backend, and the Triton backend's cuBLAS-gradient modes and
# its one-launch tf32 mode (under the Triton interpreter on a CPU).
CASES = [("torch", "ieee"), ("torch", "bf16"), ("triton", "ieee"), ("triton", "bf16"), ("triton", "tf32")]


def _needs(backend):
    if backend.startswith("triton"):
        pytest.importorskip("triton")


def _layers(seed, shapes=SHAPES, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    weights, bases, tasks = [], [], []
    for r, c in shapes:
        b = torch.randn(r, c, generator=gen) * max(r, c) ** -0.5
        w = b + 0.5 * max(r, c) ** -0.5 * torch.randn(r, c, generator=gen)
        weights.append(torch.nn.Parameter(w.to(device)))
        bases.append(b.to(device))
        tasks.append(torch.randn(r, c, generator=gen).to(device))  # the "task" gradient of each weight
    return weights, bases, tasks


def _loss(weights, bases, tasks, backend, precision, lam=0.3, squared=True):
    values = ortho_penalty(weights, bases, squared=squared, precision=precision, backend=backend)
    task = sum((w * t).sum() for w, t in zip(weights, tasks))
    return task + lam * values.sum()


def _expected(weights, bases, tasks, lam=0.3, squared=True, steps=1):
    """float64: ``steps`` times the task gradient plus ``lam`` times the reference gradient."""
    out = []
    for w, b, t in zip(weights, bases, tasks):
        d = w.detach().double() - b.double()
        out.append(steps * (t.double() + lam * ref.layer_penalty_grad(d, squared)))
    return out


def _tol(precision):
    return TOL[precision]


def _check(weights, expected, precision):
    for w, e in zip(weights, expected):
        assert w.grad is not None and w.grad.dtype == torch.float32
        assert rel_err(w.grad, e) <= _tol(precision), (tuple(w.shape), rel_err(w.grad, e))


def _direct_off(monkeypatch):
    monkeypatch.setenv("FASTORTHO_GRAD_INTO_WEIGHTS", "0")


@pytest.mark.parametrize("backend,precision", CASES)
def test_set_to_none_steps_install_views_and_match(backend, precision):
    _needs(backend)
    weights, bases, tasks = _layers(1)
    for _ in range(2):
        for w in weights:
            w.grad = None
        _loss(weights, bases, tasks, backend, precision).backward()
        _check(weights, _expected(weights, bases, tasks), precision)
        # written straight into .grad: views of the product's buffer, not tensors autograd made
        assert all(w.grad._base is not None for w in weights)


@pytest.mark.parametrize("backend,precision", CASES)
def test_accumulation_writes_in_place_and_matches(backend, precision):
    _needs(backend)
    weights, bases, tasks = _layers(2)
    _loss(weights, bases, tasks, backend, precision).backward()
    first = [w.grad.data_ptr() for w in weights]
    roots = [w.grad._base for w in weights]
    for _ in range(2):
        _loss(weights, bases, tasks, backend, precision).backward()
    _check(weights, _expected(weights, bases, tasks, steps=3), precision)
    assert [w.grad.data_ptr() for w in weights] == first  # accumulated in place, never replaced
    assert all(w.grad._base is r for w, r in zip(weights, roots))


@requires_cuda
@pytest.mark.parametrize("backend,precision", CASES + [("torch", "tf32")])
def test_accumulation_on_gpu(backend, precision):
    """On CUDA: groups of several layers per shape, cuBLAS baddbmm in place (bf16 with fp32
    output), the tf32 kernel's accumulating epilogue; ViT-sized layers among small ones."""
    weights, bases, tasks = _layers(20, SHAPES + [(768, 3072), (768, 3072), (2304, 768)], device="cuda")
    for _ in range(3):
        _loss(weights, bases, tasks, backend, precision).backward()
    torch.cuda.synchronize()
    _check(weights, _expected(weights, bases, tasks, steps=3), precision)
    assert all(w.grad._base is not None for w in weights)


@pytest.mark.parametrize("backend,precision", CASES)
def test_zeroed_views_are_accumulated_into(backend, precision):
    _needs(backend)
    weights, bases, tasks = _layers(3)
    opt = torch.optim.SGD(weights, lr=0.0)
    _loss(weights, bases, tasks, backend, precision).backward()
    first = [w.grad.data_ptr() for w in weights]
    opt.zero_grad(set_to_none=False)
    _loss(weights, bases, tasks, backend, precision).backward()
    _check(weights, _expected(weights, bases, tasks), precision)
    assert [w.grad.data_ptr() for w in weights] == first


def test_disabled_by_the_environment_switch(monkeypatch):
    _direct_off(monkeypatch)
    weights, bases, tasks = _layers(4)
    _loss(weights, bases, tasks, "torch", "ieee").backward()
    _check(weights, _expected(weights, bases, tasks), "ieee")
    assert all(w.grad._base is None for w in weights)  # autograd's own tensors


def test_autograd_internals_behave_as_expected(monkeypatch):
    """The private autograd reads of the direct write (into_grad.engine_inputs: the backward's
    AccumulateGrad nodes, whether the engine runs them, their leaves' hooks) answer as the
    module expects on this PyTorch. If an upgrade changes them this fails, and at run time the
    probe turns direct writes off (next test)."""
    from fastortho.ops.orthoreg import into_grad

    monkeypatch.setattr(into_grad, "_probe_result", [])
    assert into_grad.probe()


@pytest.mark.parametrize("backend,precision", [("torch", "ieee"), ("triton", "tf32")])
def test_a_failed_probe_takes_autograd(backend, precision, monkeypatch):
    """With autograd's internals not as expected, every gradient goes through autograd: the
    same values, no view installed, through accumulation too."""
    _needs(backend)
    from fastortho.ops.orthoreg import into_grad

    monkeypatch.setattr(into_grad, "_probe_result", [False])
    weights, bases, tasks = _layers(6)
    for _ in range(2):
        _loss(weights, bases, tasks, backend, precision).backward()
    _check(weights, _expected(weights, bases, tasks, steps=2), precision)
    assert all(w.grad._base is None for w in weights)


def test_probe_failure_is_reported_once(monkeypatch):
    """A PyTorch whose internals answer otherwise: the probe says no, with one warning."""
    from fastortho.ops.orthoreg import into_grad

    monkeypatch.setattr(into_grad, "_probe_result", [])
    monkeypatch.setattr(into_grad, "engine_inputs", lambda ctx, n: None)
    with pytest.warns(RuntimeWarning, match="autograd internals"):
        assert not into_grad.probe()
    assert into_grad.probe() is False  # cached: no second probe, no second warning


class _GradSizedAdds(TorchDispatchMode):
    """Counts additions whose result has the shape of one of ``shapes`` (gradient-sized passes)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.count = {tuple(s) for s in shapes}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.add, torch.ops.aten.add_) and isinstance(out, torch.Tensor) \
                and tuple(out.shape) in self.shapes:
            self.count += 1
        return out


@pytest.mark.parametrize("direct", [True, False])
def test_accumulation_saves_one_gradient_sized_pass_per_layer(direct, monkeypatch):
    if not direct:
        _direct_off(monkeypatch)
    weights, bases, tasks = _layers(5)
    _loss(weights, bases, tasks, "torch", "ieee").backward()  # .grad defined from here on
    loss = _loss(weights, bases, tasks, "torch", "ieee")
    with _GradSizedAdds([w.shape for w in weights]) as adds:
        loss.backward()
    # through autograd: the engine adds penalty + task, AccumulateGrad adds that to .grad;
    # written into .grad: the product accumulates (baddbmm), AccumulateGrad adds the task's
    assert adds.count == len(weights) * (1 if direct else 2)
    _check(weights, _expected(weights, bases, tasks, steps=2), "ieee")


def test_autograd_grad_writes_no_grad():
    weights, bases, tasks = _layers(6)
    grads = torch.autograd.grad(_loss(weights, bases, tasks, "torch", "ieee"), weights)
    assert all(w.grad is None for w in weights)
    for g, e in zip(grads, _expected(weights, bases, tasks)):
        assert rel_err(g, e) <= TOL["ieee"]


def test_backward_inputs_subset_writes_only_those():
    weights, bases, tasks = _layers(7)
    chosen = (1, 2)
    _loss(weights, bases, tasks, "torch", "ieee").backward(inputs=[weights[i] for i in chosen])
    expected = _expected(weights, bases, tasks)
    for i, w in enumerate(weights):
        if i in chosen:
            assert rel_err(w.grad, expected[i]) <= TOL["ieee"]
        else:
            assert w.grad is None


@pytest.mark.parametrize("hook", ["tensor", "post-accumulate"])
def test_hooks_see_the_whole_gradient(hook):
    weights, bases, tasks = _layers(8)
    seen = {}
    if hook == "tensor":
        weights[0].register_hook(lambda g: seen.update(g=g.clone()))
    else:
        weights[0].register_post_accumulate_grad_hook(lambda p: seen.update(g=p.grad.clone()))
    _loss(weights, bases, tasks, "torch", "ieee").backward()
    expected = _expected(weights, bases, tasks)
    assert rel_err(seen["g"], expected[0]) <= TOL["ieee"]
    _check(weights, expected, "ieee")


def test_create_graph_takes_autograd():
    weights, bases, tasks = _layers(10)
    _loss(weights, bases, tasks, "torch", "ieee").backward(create_graph=True)
    _check(weights, _expected(weights, bases, tasks), "ieee")
    assert all(w.grad._base is None for w in weights)  # autograd's tensors, nothing installed
    for w in weights:
        w.grad = None  # break the parameter <-> gradient cycle create_graph makes


@pytest.mark.parametrize("backend,precision", CASES)
def test_penalty_twice_in_one_loss_and_weights_the_task_does_not_use(backend, precision):
    _needs(backend)
    weights, bases, tasks = _layers(11)
    values = ortho_penalty(weights, bases, squared=True, precision=precision, backend=backend)
    again = ortho_penalty(weights, bases, squared=True, precision=precision, backend=backend)
    (0.2 * values.sum() + 0.1 * again.sum() + (weights[0] * tasks[0]).sum()).backward()
    expected = _expected(weights, bases, [t if i == 0 else torch.zeros_like(t) for i, t in enumerate(tasks)])
    _check(weights, expected, precision)


@pytest.mark.parametrize("backend,precision", [("torch", "ieee"), ("triton", "ieee"), ("triton", "tf32")])
def test_mixed_and_foreign_grads_take_autograd(backend, precision):
    _needs(backend)
    weights, bases, tasks = _layers(12)
    foreign = torch.zeros_like(weights[1])
    weights[1].grad = foreign  # defined by someone else (as a DDP bucket view would be)
    _loss(weights, bases, tasks, backend, precision).backward()
    _check(weights, _expected(weights, bases, tasks), precision)
    assert weights[1].grad is foreign  # accumulated into, in place, as AccumulateGrad does


def test_bf16_weights_take_autograd():
    weights, bases, tasks = _layers(13)
    weights = [torch.nn.Parameter(w.detach().to(torch.bfloat16)) for w in weights]
    _loss(weights, bases, [t.to(torch.bfloat16) for t in tasks], "torch", "ieee").backward()
    for w, e in zip(weights, _expected(weights, bases, tasks)):
        assert w.grad.dtype == torch.bfloat16 and rel_err(w.grad, e) <= TOL["bf16"]


def test_shared_weight_listed_twice_takes_autograd():
    weights, bases, tasks = _layers(14, shapes=[(9, 5)])
    w, b = weights[0], bases[0]
    values = ortho_penalty([w, w], [b, b], squared=True, precision="ieee", backend="torch")
    values.sum().backward()
    assert rel_err(w.grad, 2 * ref.layer_penalty_grad(w.detach().double() - b.double(), True)) <= TOL["ieee"]
