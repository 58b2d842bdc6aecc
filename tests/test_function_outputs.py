"""Every autograd.Function of fastortho returns fresh tensors from its forward.

The rule (docs/design.md section 7): a Function's forward output is the result of exactly one
op that made new storage; never an input, a view of an intermediate, a no-op ``.to`` /
``.contiguous()`` or an in-place result. torch 2.11's dynamo routes the gradient of a
forward that breaks it to the wrong slot (zero gradient, silently; pytorch issue 180642),
so this holds on every torch version, checked here on the newest too.

How: each Function's ``forward`` is wrapped while a sample call runs; inside it a
TorchFunctionMode records every tensor each torch call returns (kept alive, so no storage
address is reused). An output passes when one call returned that very object and its storage
was new when it did. New Functions must get a sample here (the enumeration fails otherwise).
"""
import importlib
import os
import pkgutil
import tempfile

import pytest
import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

import fastortho
from fastortho.testing import random_layers


def _fastortho_functions():
    for info in pkgutil.walk_packages(fastortho.__path__, "fastortho."):
        importlib.import_module(info.name)
    found, todo = set(), [torch.autograd.Function]
    while todo:
        cls = todo.pop()
        for sub in cls.__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("fastortho."):
                found.add(sub)
    return found


class _Recorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.results = []  # (func name, tensor): tensors kept alive on purpose

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.results.append((name, t))
        return out


def _storage(t):
    return t.untyped_storage().data_ptr()


def _problems(inputs, outputs, results):
    """Why each output is not fresh (empty when all are)."""
    problems = []
    input_storages = {_storage(t) for t in inputs if t.numel()}
    for i, out in enumerate(outputs):
        if not out.numel():
            continue
        if _storage(out) in input_storages:
            problems.append(f"output {i} shares storage with an input")
            continue
        returned_by = [k for k, (_, t) in enumerate(results) if t is out]
        if len(returned_by) != 1:
            names = [results[k][0] for k in returned_by]
            problems.append(
                f"output {i} was returned by {len(returned_by)} calls {names} (an alias of an intermediate)"
            )
            continue
        k = returned_by[0]
        earlier = [
            results[j][0] for j in range(k) if results[j][1].numel() and _storage(results[j][1]) == _storage(out)
        ]
        if earlier:
            problems.append(f"output {i} ({results[k][0]}) is a view of what {earlier[0]} made")
    return problems


@pytest.fixture
def checked_forwards(monkeypatch):
    """Wraps every fastortho Function's forward: records per class how many calls were seen
    and what was wrong with their outputs."""
    seen, wrong = {}, {}
    # the suite's NaN poisoning fills fresh buffers in place: its fill_ is not the forward's
    for owner, name in ((torch, "empty"), (torch, "empty_like"), (torch.Tensor, "new_empty")):
        alloc = getattr(owner, name)
        monkeypatch.setattr(owner, name, getattr(alloc, "__wrapped__", alloc))
    def wrapped(cls, original):
        def forward(*args):
            inputs = [a for a in tree_flatten(args)[0] if isinstance(a, torch.Tensor)]
            with _Recorder() as rec:
                out = original(*args)
            outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            seen[cls] = seen.get(cls, 0) + 1
            wrong.setdefault(cls, []).extend(_problems(inputs, outputs, rec.results))
            return out
        return forward

    for cls in _fastortho_functions():
        monkeypatch.setattr(cls, "forward", staticmethod(wrapped(cls, cls.forward)))
    return seen, wrong


def _dual_samples():
    from fastortho.ops.dual import AttentionTangent, GeluTangent, LayerNormTangent
    from fastortho.ops.dual.triton_backend import FusedAttentionTangent, FusedDualLinear

    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen)

    x = rand(6, 8)
    xhat, mean, rstd = torch.ops.aten.native_layer_norm(x, [8], None, None, 1e-5)
    LayerNormTangent.apply(rand(6, 8), xhat, rstd, torch.zeros_like(rstd), torch.ones_like(rstd), [8])
    GeluTangent.apply(rand(6, 8), x, "none")
    q, k, v, dq, dk, dv = (rand(2, 3, 5, 4) for _ in range(6))
    o = torch.softmax(q @ k.transpose(-1, -2) * 0.5, -1) @ v
    for keep_o in (False, True):
        AttentionTangent.apply(q, k, v, o, dq, dk, dv, None, 0.5, keep_o)
        AttentionTangent.apply(q, k, v, o.transpose(1, 2).contiguous().transpose(1, 2), dq, dk, dv, None, 0.5, keep_o)
    FusedDualLinear.apply(rand(5, 8), rand(5, 8), rand(6, 8), rand(6, 8), rand(6), rand(6))
    FusedAttentionTangent.apply(q, k, v, dq, dk, dv, 0.5, False)


def _penalty_samples():
    from fastortho.ops.lora import lora_ortho_penalty
    from fastortho.ops.orthoreg import ortho_penalty

    weights, bases = random_layers([(12, 8), (8, 12), (12, 8)], generator=torch.Generator().manual_seed(1))
    weights = [w.requires_grad_(True) for w in weights]
    for backend in ("torch", "triton"):
        for squared in (True, False):
            ortho_penalty(weights, bases, squared=squared, precision="ieee", backend=backend)
            As = [torch.randn(2, 8, requires_grad=True), torch.randn(3, 8, requires_grad=True)]
            Bs = [torch.randn(12, 2, requires_grad=True), torch.randn(8, 3, requires_grad=True)]
            lora_ortho_penalty(As, Bs, [0.5, 2.0], squared=squared, precision="ieee", backend=backend)
    from fastortho.ops.orthoreg import into_grad

    assert into_grad.run_probe()  # its _Probe Function
    if torch.cuda.is_available():
        from fastortho.ops.orthoreg.cuda_backend import cuda_penalty

        cuda_penalty([w.cuda() for w in weights], [b.cuda() for b in bases], True, "ieee")


def _sharded_sample():
    """ShardedPenalty on a one-process gloo group (the exchanges are then identities)."""
    from fastortho.ops.orthoreg.sharded import ShardedPenalty

    if dist.is_initialized():
        pytest.fail("a process group is already initialized in the test process")
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'store')}", rank=0, world_size=1)
        try:
            weights, bases = random_layers([(12, 8), (8, 12)], generator=torch.Generator().manual_seed(2))
            for squared in (True, False):
                ShardedPenalty.apply(squared, "ieee", dist.group.WORLD, 1, 0, (0, 1), ((12, 8), (8, 12)), 2,
                                     *[w.requires_grad_(True) for w in weights], *bases)
        finally:
            dist.destroy_process_group()


def test_every_function_forward_returns_fresh_tensors(checked_forwards):
    seen, wrong = checked_forwards
    _dual_samples()
    _penalty_samples()
    if dist.is_available() and dist.is_gloo_available():
        _sharded_sample()
    names = {cls.__name__ for cls in _fastortho_functions()}
    expected = names - ({"CudaPenalty"} if not torch.cuda.is_available() else set())
    if not (dist.is_available() and dist.is_gloo_available()):
        expected -= {"ShardedPenalty"}
    missing = sorted(expected - {cls.__name__ for cls in seen})
    assert not missing, f"autograd.Functions without a sample in this test: {missing}"
    bad = {cls.__name__: problems for cls, problems in wrong.items() if problems}
    assert not bad, f"forwards that return an alias: {bad}"


def test_the_check_sees_an_alias(checked_forwards):
    """The check itself: the shape of the torch 2.11 regression (a no-op ``.to`` at the end of
    a ctx-style forward) and a view of an intermediate are reported; a plain result is not."""
    recorded = []

    class NoOpCast(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, t):
            y = a * t
            return y.to(y.dtype)

    class ViewOfIntermediate(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return (a * 2).view(-1)

    class Fresh(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return (a * 2).view(-1) + 1

    a = torch.randn(3, 2)
    for cls, args in ((NoOpCast, (a, a)), (ViewOfIntermediate, (a,)), (Fresh, (a,))):
        with _Recorder() as rec:
            out = cls.forward(None, *args)
        recorded.append(_problems(list(args), [out], rec.results))
    assert recorded[0] and recorded[1] and not recorded[2], recorded
