"""Every merge method of fastortho.merge on 8 ViT-B-32 task vectors, against FusionBench's
implementation of the same method in the same run (the real ``fusion-bench`` package).

The vectors have the tensors of a Hugging Face ``CLIPVisionModel`` in ViT-B/32's configuration
(FusionBench's checkpoints: 87.8 M values, 73 matrices per vector), random, as the timings do
not depend on the values; the models are plain modules with those parameters (no transformers
needed, so the fastortho half also runs where FusionBench cannot be installed: its half is
skipped there). FusionBench's time includes taking the task vectors from its models
(8 vector subtractions) and loading the merged state into a model; fastortho's includes
applying the merged vector to the pretrained state dict: both end with merged weights.

Each record's extra_info has the peak memory above what was allocated before the call (on a
GPU ``max_memory_allocated``; on a CPU the resident-set high-water mark, sampled every 2 ms),
in bytes and in vector sizes (the merged output included), and the SVD FLOPs (a floor:
``4 m n^2 + 8 n^3`` per thin SVD). On a CPU, run it with ``MALLOC_MMAP_THRESHOLD_=65536``:
glibc then maps every large block and returns it when freed, so the resident set follows the
live memory (by default it raises its threshold after frees and reuses freed heap memory
without growing the resident set, so peaks read low).

    MALLOC_MMAP_THRESHOLD_=65536 pytest bench/test_bench_merge.py --benchmark-only \
        [--benchmark-json=bench/results/NAME.json]
"""
import contextlib
import io
import logging
import math
import os
import threading
import time

import pytest
import torch

from conftest import DEVICE, svd_flop, sync

N_TASKS = 8
# (our method, our options, FusionBench's algorithm factory, the coefficient for both)
CASES = {
    "ta": ({}, lambda fb: fb.TaskArithmeticAlgorithm(scaling_factor=0.3), 0.3),
    "ties": ({"merge": "sum"}, lambda fb: fb.TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[],
                                                                 merge_func="sum"), 0.3),
    "dare": ({"seed": 0}, lambda fb: fb.DareTaskArithmetic(scaling_factor=0.3, sparsity_ratio=0.5,
                                                          only_on_linear_weights=False), 0.3),
    "dare-ties": ({"seed": 0, "merge": "sum"}, lambda fb: _dare_ties(), 0.5),
    "tsvm": ({}, lambda fb: fb.TaskSingularVectorMerging(alpha=1.0), 1.0),
    "isoc": ({}, lambda fb: fb.ISO_C_Merge(scaling_factor=1.0), 1.0),
    "isocts": ({}, lambda fb: fb.ISO_CTS_Merge(scaling_factor=1.0, common_space_fraction=0.8), 1.0),
}


def _dare_ties():
    from fusion_bench.method.dare import DareTiesMerging

    return DareTiesMerging(sparsity_ratio=0.5, only_on_linear_weights=False, rescale=True, scaling_factor=0.5,
                           threshold=20, remove_keys=[], merge_func="sum")


def vit_b32_shapes(width=768, mlp=3072, layers=12, patches=49):
    """``name -> shape`` of a ViT-B/32 ``CLIPVisionModel`` (without the ``vision_model.`` prefix)."""
    shapes = {"embeddings.class_embedding": (width,), "embeddings.patch_embedding.weight": (width, 3, 32, 32),
              "embeddings.position_embedding.weight": (patches + 1, width), "pre_layrnorm.weight": (width,),
              "pre_layrnorm.bias": (width,)}
    for i in range(layers):
        block = f"encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes[f"{block}self_attn.{proj}.weight"] = (width, width)
            shapes[f"{block}self_attn.{proj}.bias"] = (width,)
        for norm in ("layer_norm1", "layer_norm2"):
            shapes[f"{block}{norm}.weight"] = shapes[f"{block}{norm}.bias"] = (width,)
        shapes[f"{block}mlp.fc1.weight"], shapes[f"{block}mlp.fc1.bias"] = (mlp, width), (mlp,)
        shapes[f"{block}mlp.fc2.weight"], shapes[f"{block}mlp.fc2.bias"] = (width, mlp), (width,)
    shapes["post_layernorm.weight"] = shapes["post_layernorm.bias"] = (width,)
    return shapes


class Weights(torch.nn.Module):
    """A module holding the given tensors as parameters (names with dots made flat)."""

    def __init__(self, tensors):
        super().__init__()
        for name, value in tensors.items():
            # trainable, as FusionBench expects (its DARE subtracts and drops trainable ones only)
            self.register_parameter(name.replace(".", "__"), torch.nn.Parameter(value))


def pretrained_state():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    return {k.replace(".", "__"): 0.02 * torch.randn(shape, generator=gen, device=DEVICE)
            for k, shape in vit_b32_shapes().items()}


def task_update(t, like):
    """Task ``t``'s update: small and full-rank (the SVD costs do not depend on the values)."""
    gen = torch.Generator(device=DEVICE).manual_seed(1 + t)
    return {k: 1e-3 * torch.randn(v.shape, generator=gen, device=DEVICE) for k, v in like.items()}


# Built per test, outside the timing: the inputs of one implementation at a time, so that
# FusionBench's TIES (about 5 vector copies per task) fits in a 24 GiB machine beside them.
def fastortho_inputs():
    import fastortho as fo

    pre = pretrained_state()
    return pre, {f"task{t}": fo.TaskVector(task_update(t, pre)) for t in range(N_TASKS)}


def fusionbench_pool():
    from fusion_bench.modelpool import BaseModelPool

    pre = pretrained_state()
    models = {f"task{t}": Weights({k: pre[k] + u for k, u in task_update(t, pre).items()}) for t in range(N_TASKS)}
    return BaseModelPool(models={"_pretrained_": Weights(pre), **models})


class PeakMemory:
    """Peak memory of a block above its start: CUDA's allocator statistics, or on a CPU the
    resident set (``/proc/self/statm``) sampled every 2 ms by a thread."""

    def __enter__(self):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            self.start = self.peak = self._rss()
            self.running = True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated() - self.start
        else:
            self.running = False
            self.thread.join()
            self.peak = max(self.peak, self._rss())
            self.bytes = self.peak - self.start

    @staticmethod
    def _rss() -> int:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)


def _svd_flops(vector, method):
    total = 0
    for x in vector.values():
        if x.dim() != 2:
            continue
        total += {"tsvm": N_TASKS + 2, "isoc": 1, "isocts": N_TASKS + 3}.get(method, 0) * svd_flop(*x.shape)
    return total


def _fusionbench_run(method, pool):
    import fusion_bench.method as fb

    algorithm = CASES[method][1](fb)
    torch.manual_seed(0)
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            merged = algorithm.run(pool)
    finally:
        logging.disable(logging.NOTSET)
    sync()
    return merged


SVD_METHODS = ("tsvm", "isoc", "isocts")
# Two rows of the same merge for the SVD methods, to measure what each part of the design gives
# (on a GPU FusionBench cannot be installed in the device image: these are the comparisons there):
# - fastortho-per-layer: one layer per call (budget=1: every key its own chunk), against
#   batching by shape group;
# - fastortho-1-worker: FASTORTHO_SVD_WORKERS=1, every SVD after the previous one (torch's own
#   order: on a GPU one cuSOLVER call after another on one stream, as FusionBench's per-layer
#   calls run them), against slices solved at once (CPU threads, CUDA streams).
VARIANTS = ("fastortho-per-layer", "fastortho-1-worker")
IMPLS = [(m, i) for m in CASES for i in ("fusionbench", "fastortho")] + [(m, v) for m in SVD_METHODS
                                                                        for v in VARIANTS]


@pytest.mark.parametrize("method,impl", IMPLS)
def test_merge(benchmark, method, impl, monkeypatch):
    import fastortho as fo

    if impl == "fusionbench":
        pytest.importorskip("fusion_bench")
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if method == "dare-ties" and total < 48 * 2**30:
            pytest.skip("FusionBench's DareTiesMerging on 8 ViT-B-32 models was killed for memory on the 24 GiB "
                        "CPU machine (it holds the task vectors as models, then stacked, cloned and masked)")
    options, _, alpha = CASES[method]
    benchmark.group = f"merge {method}, {N_TASKS} x ViT-B-32"
    peaks = []

    if impl == "fastortho-per-layer":
        options = {**options, "budget": 1}
    if impl == "fastortho-1-worker":
        monkeypatch.setenv("FASTORTHO_SVD_WORKERS", "1")

    def setup():
        return ((fusionbench_pool(),) if impl == "fusionbench" else (fastortho_inputs(),)), {}

    def run(inputs):
        with PeakMemory() as mem:
            if impl != "fusionbench":
                pre, vectors = inputs
                merged = fo.merge_vectors(vectors, method, progress=False, **options).apply_to(pre, alpha)
                sync()
            else:
                merged = _fusionbench_run(method, inputs)
        peaks.append(mem.bytes)  # the merged weights were alive until here: counted
        del merged

    failure = None
    warmup_rounds = 0  # a CPU run is long enough that its first round is already warm
    if DEVICE == "cuda" and impl != "fusionbench" and method in SVD_METHODS:
        # the one-time costs on a GPU (streams, a cuSOLVER and cuBLAS handle per worker thread)
        # paid by a small merge: a full warm-up round would double the device call's longest rows
        # (16 matrices of a shape: even Iso-C's batch of task sums reaches every worker)
        small = {f"task{t}": fo.TaskVector({f"w{i}": torch.randn(96, 64, device=DEVICE) for i in range(16)})
                 for t in range(N_TASKS)}
        fo.merge_vectors(small, method, progress=False, **options)
        sync()
    elif DEVICE == "cuda":
        warmup_rounds = 1  # (the allocator's pool too: the fast methods take milliseconds)
    try:
        benchmark.pedantic(run, setup=setup, rounds=1, iterations=1, warmup_rounds=warmup_rounds)
    except torch.linalg.LinAlgError as error:
        if impl != "fusionbench" or method != "isocts":
            raise
        failure = str(error)[:120]  # (fastortho solves such a batch again in float64)
    if failure:  # outside the except block: its traceback (holding FusionBench's pool) is gone
        pytest.xfail(f"FusionBench's Iso-CTS: its float32 SVD of a projected task matrix fails: {failure}")
    shapes = vit_b32_shapes()
    vector_bytes = 4 * sum(math.prod(s) for s in shapes.values())
    benchmark.extra_info.update(impl=impl, method=method, peak_bytes=peaks[-1],
                                peak_vectors=round(peaks[-1] / vector_bytes, 2), vector_bytes=vector_bytes,
                                n_tasks=N_TASKS,
                                svd_flop=_svd_flops({k: torch.empty(s, device="meta") for k, s in shapes.items()},
                                                    method))
