"""Linearized (TTA) training step and the tau-Jp penalty on open_clip ViTs (random init).

- ``linearized-step``: one AdamW step on ``features.square().mean()`` of the visual tower:
  an ordinary step, fastortho's linearized model, and the released way (torch.func.jvp over
  functional_call, MATH attention, MHA fast path off); fp32 and bf16 autocast on a GPU.
  extra_info has the peak memory: ``torch.cuda.max_memory_allocated`` on a GPU (everything),
  and on a CPU the activation bytes autograd saves for backward (weights and the pretrained
  copy th0 excluded; th0's size is in ``th0_bytes``), a device-independent proxy.
- ``taujp``: the penalty over 8 other tasks (forward + backward): the released loop of one
  jvp call per task, one batched jvp call, fastortho strict (one dual pass over all tasks'
  batches) and cyclical (one task).

    pytest bench/test_bench_linearize.py --benchmark-only [--benchmark-json=...]

Sizes: GPU ViT-B-32 batch 128 / ViT-L-14 batch 32 (tau-Jp 8 x 16 / 8 x 4 images); CPU only
ViT-B-32 at batch 8 (tau-Jp 8 x 2) unless FASTORTHO_BENCH_MODELS says otherwise.
"""
import contextlib
import os

import pytest
import torch

import fastortho as fo
from fastortho import reference as ref
from fastortho import set_kernels
from fastortho.testing import count_aten_ops, saved_activation_bytes

from conftest import DEVICE, bench_models, gpu_busy_seconds, sync

open_clip = pytest.importorskip("open_clip")

BATCH = (
    {"ViT-B-32": 128, "ViT-B-16": 128, "ViT-L-14": 32}
    if DEVICE == "cuda"
    else {"ViT-B-32": 8, "ViT-B-16": 4, "ViT-L-14": 2}
)
TAUJP_BATCH = (
    {"ViT-B-32": 16, "ViT-B-16": 8, "ViT-L-14": 4}
    if DEVICE == "cuda"
    else {"ViT-B-32": 2, "ViT-B-16": 1, "ViT-L-14": 1}
)
OTHER_TASKS = 8
PRECISIONS = ["fp32", "bf16"] if DEVICE == "cuda" else ["fp32"]
STEPS = ["ordinary", "fastortho", "fastortho-torch-ops", "torch.func.jvp"]
# the whole step (forward, backward, AdamW capturable) replayed as one CUDA graph: no host cost
GRAPH_STEPS = ["ordinary-graph", "fastortho-graph"] if DEVICE == "cuda" else []
ROUNDS = int(os.environ.get("FASTORTHO_BENCH_ROUNDS", 10 if DEVICE == "cuda" else 3))


def autocast(precision, cache=True):
    """bf16 autocast; ``cache=False`` for a step captured into a CUDA graph (autocast's cache
    of cast weights must not outlive the capture, as PyTorch's CUDA-graph notes require)."""
    if precision == "bf16":
        return torch.autocast(DEVICE, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


@pytest.fixture(scope="module", params=bench_models())
def vit(request):
    torch.manual_seed(0)
    model = open_clip.create_model(request.param, pretrained=None).visual.to(DEVICE).train()
    return request.param, model


def _tf32_off():
    if DEVICE == "cuda":
        torch.backends.cuda.matmul.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"


def make_step(kind, model, x, precision, capturable=False):
    if kind.endswith("-graph"):
        return make_graph_step(kind.removesuffix("-graph"), model, x, precision)
    statics = list(model.parameters()) + list(model.buffers())  # weights, not activations
    if kind == "ordinary":
        params = list(model.parameters())

        def loss():
            return model(x).float().square().mean()
    elif kind.startswith("fastortho"):
        # "fastortho": Triton kernels on CUDA (policy auto); "fastortho-torch-ops": PyTorch dual ops
        set_kernels("torch" if kind == "fastortho-torch-ops" else "auto")
        lin = fo.linearize(model)
        params = list(lin.parameters())
        statics += list(lin.buffers())

        def loss():
            return lin(x).float().square().mean()
    else:
        th0 = {n: p.detach().clone() for n, p in model.named_parameters()}
        params = list(model.parameters())
        statics += list(th0.values())

        def loss():
            tau = {n: p - th0[n] for n, p in model.named_parameters()}
            primal, tangent = ref.jvp_linearized(model, th0, tau, x)
            return (primal + tangent).float().square().mean()
    opt = torch.optim.AdamW(params, lr=1e-5, capturable=capturable)

    def once():
        opt.zero_grad(set_to_none=not capturable)  # a captured step keeps its .grad buffers
        with autocast(precision, cache=not capturable):
            value = loss()
        value.backward()
        opt.step()

    def step():
        once()
        sync()
    step.once, step.eager = once, True
    return step, loss, statics


def make_graph_step(kind, model, x, precision):
    """``kind``'s step captured once into a CUDA graph (after two eager steps on a side stream,
    as CUDA-graph capture requires); the benchmark replays it on the same static batch."""
    eager, loss, statics = make_step(kind, model, x, precision, capturable=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            eager.once()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        eager.once()

    def step():
        graph.replay()
        sync()
    return step, loss, statics


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("kind", STEPS + GRAPH_STEPS)
def test_linearized_step(benchmark, vit, kind, precision):
    name, model = vit
    _tf32_off()
    x = torch.randn(BATCH[name], 3, 224, 224, device=DEVICE)
    step, loss, statics = make_step(kind, model, x, precision)
    step()  # warm-up, optimizer state
    info = {"model": name, "batch": x.shape[0], "kind": kind, "precision": precision, "device": DEVICE}
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        info["peak_memory_bytes"] = torch.cuda.max_memory_allocated()
        info["memory_measure"] = "torch.cuda.max_memory_allocated"
        info["gpu_busy_s"] = gpu_busy_seconds(step)  # vs the wall-time median: the host-bound share
    else:
        with autocast(precision):
            info["peak_memory_bytes"] = saved_activation_bytes(loss, statics)
        info["memory_measure"] = "activation bytes saved for backward"
    # ATen ops one step dispatches (forward, backward, optimizer): what the host must issue
    # (a replayed graph issues none)
    info["aten_ops"] = count_aten_ops(step)["total"] if getattr(step, "eager", False) else 0
    # the pretrained copy th0 both linearized steps hold besides the model (not in the proxy)
    info["th0_bytes"] = 0 if kind == "ordinary" else sum(p.numel() * p.element_size() for p in model.parameters())
    benchmark.group = f"linearized-step-{name}-{precision}"
    benchmark.extra_info.update(info)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    set_kernels("auto")


TAUJP = ["released-loop", "jvp-batched", "strict", "cyclical"]


@pytest.mark.parametrize("kind", TAUJP)
def test_taujp_penalty(benchmark, vit, kind):
    name, model = vit
    _tf32_off()
    gen = torch.Generator().manual_seed(0)
    n = TAUJP_BATCH[name]
    others = [torch.randn(n, 3, 224, 224, generator=gen).to(DEVICE) for _ in range(OTHER_TASKS)]
    lin = fo.linearize(model)
    with torch.no_grad():  # a task vector that is not zero
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-4)
    th0 = lin.base_values()
    params = list(lin.parameters())

    if kind in ("released-loop", "jvp-batched"):
        batches = others if kind == "released-loop" else [torch.cat(others)]

        def penalty():
            tau = {nm: p - th0[nm] for nm, p in model.named_parameters()}
            return ref.released_taujp_penalty(model, th0, tau, batches)
    else:
        reg = fo.TauJpRegularizer(lin, others, mode=kind, reduction="mean_norm", task_reduction="mean")

        def penalty():
            return reg()

    def step():
        for p in params:
            p.grad = None
        penalty().backward()
        sync()

    step()
    benchmark.group = f"taujp-{name}"
    benchmark.extra_info.update(model=name, kind=kind, other_tasks=OTHER_TASKS, images_per_task=n, device=DEVICE)
    benchmark.pedantic(step, rounds=ROUNDS, iterations=1, warmup_rounds=1)
