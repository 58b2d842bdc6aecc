"""Every merge method of fastortho.merge on 8 ViT-B-32 task vectors, against FusionBench's
implementation of the same method in the same run (the real ``fusion-bench`` package).

The vectors are those of Hugging Face ``CLIPVisionModel``s in ViT-B/32's configuration
(FusionBench's checkpoints: 87.8 M values, 73 matrices per vector), random, as the timings do
not depend on the values. FusionBench's time includes taking the task vectors from its models
(8 vector subtractions) and loading the merged state into a model; fastortho's includes
applying the merged vector to the pretrained state dict: both end with merged weights.

Each record's extra_info has the peak memory above what was allocated before the call (on a
GPU ``max_memory_allocated``; on a CPU the resident-set high-water mark, sampled every 2 ms),
in bytes and in vector sizes, and the SVD FLOPs (a floor: ``4 m n^2 + 8 n^3`` per thin SVD).

    pytest bench/test_bench_merge.py --benchmark-only [--benchmark-json=bench/results/NAME.json]
"""
import contextlib
import copy
import io
import logging
import threading
import time

import pytest
import torch

from conftest import DEVICE, sync

transformers = pytest.importorskip("transformers")
pytest.importorskip("fusion_bench")

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


@pytest.fixture(scope="module")
def models():
    """The pretrained ViT-B/32 image tower and 8 fine-tuned copies (small full-rank updates)."""
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    pre = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=224,
        patch_size=32)).to(DEVICE).eval()
    transformers.logging.set_verbosity(level)
    fines = []
    for t in range(N_TASKS):
        fine = copy.deepcopy(pre)
        gen = torch.Generator(device=DEVICE).manual_seed(t)
        with torch.no_grad():
            for p in fine.parameters():
                p.add_(1e-3 * torch.randn(p.shape, generator=gen, device=DEVICE))
        fines.append(fine)
    return pre, fines


@pytest.fixture(scope="module")
def vectors(models):
    import fastortho as fo

    pre, fines = models
    return {f"task{i}": fo.TaskVector.from_models(pre, f) for i, f in enumerate(fines)}


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


def _svd_flops(vectors, method):
    n = len(vectors)
    total = 0
    for x in next(iter(vectors.values())).values():
        if x.dim() != 2:
            continue
        m, k = max(x.shape), min(x.shape)
        one = 4 * m * k * k + 8 * k ** 3
        total += {"tsvm": n + 2, "isoc": 1, "isocts": n + 3}.get(method, 0) * one
    return total


def _pool(models):
    from fusion_bench.modelpool import BaseModelPool

    pre, fines = models  # FusionBench edits the models of its pool: fresh copies per run
    return BaseModelPool(models={"_pretrained_": copy.deepcopy(pre),
                                 **{f"task{i}": copy.deepcopy(f) for i, f in enumerate(fines)}})


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


@pytest.mark.parametrize("impl", ["fusionbench", "fastortho"])
@pytest.mark.parametrize("method", list(CASES))
def test_merge(benchmark, models, vectors, method, impl):
    import fastortho as fo

    options, _, alpha = CASES[method]
    pre_state = models[0].state_dict()
    benchmark.group = f"merge {method}, {N_TASKS} x ViT-B-32"
    peaks = []

    def run(*pool):
        with PeakMemory() as mem:
            if impl == "fastortho":
                merged = fo.merge_vectors(vectors, method, **options).apply_to(pre_state, alpha)
                sync()
            else:
                merged = _fusionbench_run(method, *pool)
        peaks.append(mem.bytes)
        del merged

    def setup():  # the pool's model copies are not FusionBench's merging: built outside the timing
        return ((_pool(models),) if impl == "fusionbench" else ()), {}

    benchmark.pedantic(run, setup=setup, rounds=1, iterations=1, warmup_rounds=0)
    vector_bytes = sum(x.numel() * x.element_size() for x in next(iter(vectors.values())).values())
    benchmark.extra_info.update(peak_bytes=peaks[-1], peak_vectors=round(peaks[-1] / vector_bytes, 2),
                                vector_bytes=vector_bytes, svd_flop=_svd_flops(vectors, method), n_tasks=N_TASKS)
