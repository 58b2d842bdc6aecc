"""fastortho.merge against FusionBench's own implementations (the real ``fusion-bench``
package) on the same task vectors of Hugging Face CLIPVisionModels, plus what FusionBench
cannot show: chunking invariance, hand-worked cases, determinism and the input checks."""
import contextlib
import copy
import io
import logging

import pytest
import torch

import fastortho as fo
from fastortho.merge import METHODS, check_mergeable, merge_tasks, merge_vectors, method_names

from conftest import worst_abs_diff

# fc1 (80 x 32) is tall enough for the CPU's QR-reduced top singular triplets, fc2 (32 x 80) is
# solved transposed: FusionBench's agreement covers both of fastortho.merge._svd's CPU routes
VISION = dict(hidden_size=32, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)


@pytest.fixture(scope="module")
def clip_models():
    """A tiny CLIPVisionModel and four fine-tuned copies of it (every tensor moved)."""
    transformers = pytest.importorskip("transformers")
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    pre = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION)).eval()
    transformers.logging.set_verbosity(level)
    gen = torch.Generator().manual_seed(1)
    fines = []
    for t in range(4):
        fine = copy.deepcopy(pre)
        with torch.no_grad():
            for p in fine.parameters():
                p.add_((0.01 + 0.01 * t) * torch.randn(p.shape, generator=gen))
        fines.append(fine)
    return pre, fines


def _vectors(clip_models):
    pre, fines = clip_models
    return {f"task{i}": fo.TaskVector.from_models(pre, f) for i, f in enumerate(fines)}


def _fusionbench(algorithm, clip_models, seed=None):
    """FusionBench's merged model (it edits the models it is given: copies go in)."""
    pytest.importorskip("fusion_bench")
    from fusion_bench.modelpool import BaseModelPool

    pre, fines = clip_models
    pool = BaseModelPool(models={"_pretrained_": copy.deepcopy(pre),
                                 **{f"task{i}": copy.deepcopy(f) for i, f in enumerate(fines)}})
    if seed is not None:
        torch.manual_seed(seed)
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return algorithm.run(pool)
    finally:
        logging.disable(logging.NOTSET)


def _worst(ours, theirs_model, clip_models) -> float:
    theirs = theirs_model.state_dict()
    assert set(ours) <= set(theirs)
    untouched = [k for k in theirs if k not in ours and theirs[k].is_floating_point()]
    assert not untouched, untouched
    return worst_abs_diff(ours, theirs)


def _fb_algorithms():
    fb = pytest.importorskip("fusion_bench.method")
    from fusion_bench.method.dare import DareTiesMerging

    # (our method, our options, FusionBench's algorithm, its coefficient, its seed, tolerance)
    return [
        ("ta", {}, fb.TaskArithmeticAlgorithm(scaling_factor=0.3), 0.3, None, 0.0),
        ("ties", {"merge": "sum"}, fb.TiesMergingAlgorithm(scaling_factor=0.3, threshold=20, remove_keys=[],
                                                           merge_func="sum"), 0.3, None, 0.0),
        ("ties", {}, fb.TiesMergingAlgorithm(scaling_factor=1.0, threshold=20, remove_keys=[],
                                             merge_func="mean"), 1.0, None, 0.0),
        ("ties", {"merge": "max", "keep": 0.5}, fb.TiesMergingAlgorithm(scaling_factor=0.7, threshold=50,
                                                                      remove_keys=[], merge_func="max"),
         0.7, None, 0.0),
        ("dare", {"seed": 3}, fb.DareTaskArithmetic(scaling_factor=0.3, sparsity_ratio=0.5,
                                                    only_on_linear_weights=False), 0.3, 3, 0.0),
        ("dare-ties", {"seed": 4, "merge": "sum"},
         DareTiesMerging(sparsity_ratio=0.5, only_on_linear_weights=False, rescale=True, scaling_factor=0.5,
                         threshold=20, remove_keys=[], merge_func="sum"), 0.5, 4, 0.0),
        ("tsvm", {}, fb.TaskSingularVectorMerging(alpha=0.8), 0.8, None, 4e-6),
        ("isoc", {}, fb.ISO_C_Merge(scaling_factor=1.3), 1.3, None, 2e-6),
        ("isocts", {}, fb.ISO_CTS_Merge(scaling_factor=1.3, common_space_fraction=0.8), 1.3, None, 1e-5),
    ]


@pytest.mark.parametrize("case", range(9))
def test_every_method_agrees_with_fusionbench(clip_models, case):
    """Same vectors, same coefficient: the merged model equals FusionBench's, exactly for the
    elementwise methods (DARE with the same seed draws the same masks) and to float32
    round-off for the SVD-based ones (tolerances against weights of size ~0.1; FusionBench's
    own TSV-M is 2e-6 from the float64 merge here, fastortho's 1e-6)."""
    method, options, algorithm, alpha, seed, tol = _fb_algorithms()[case]
    theirs = _fusionbench(algorithm, clip_models, seed)
    pre = clip_models[0]
    ours = merge_vectors(_vectors(clip_models), method, **options).apply_to(pre.state_dict(), alpha)
    worst = _worst(ours, theirs, clip_models)
    assert worst <= tol, (method, options, worst)
    moved = max(float((ours[k] - pre.state_dict()[k]).abs().max()) for k in ours)
    assert moved > 100 * max(tol, 1e-7)  # the merge did something measurable
    if tol:  # SVD-based: ours is about as close as FusionBench's to the float64 merge (Iso-CTS
        # amplifies float32 round-off by its conditioning, so the two differ by route: 2x allowed)
        vectors64 = {n: fo.TaskVector({k: v.double() for k, v in tv.items()})
                     for n, tv in _vectors(clip_models).items()}
        exact = merge_vectors(vectors64, method, **options).apply_to(
            {k: v.double() for k, v in pre.state_dict().items()}, alpha)
        ours_error = worst_abs_diff(ours, exact, exact)
        theirs_error = worst_abs_diff(theirs.state_dict(), exact, exact)
        assert ours_error <= 2 * theirs_error, (method, ours_error, theirs_error)


def test_ties_default_is_the_papers_disjoint_mean_not_fusionbenchs_sum(clip_models):
    """The one difference on purpose: fastortho's TIES defaults to the paper's disjoint mean;
    FusionBench's config uses ``merge_func="sum"``. On entries where k tasks agree, the sum is k
    times the mean."""
    fb = pytest.importorskip("fusion_bench.method")
    vectors = _vectors(clip_models)
    mean = merge_vectors(vectors, "ties")
    total = merge_vectors(vectors, "ties", merge="sum")
    theirs = _fusionbench(fb.TiesMergingAlgorithm(scaling_factor=1.0, threshold=20, remove_keys=[],
                                                  merge_func="sum"), clip_models)
    pre = clip_models[0].state_dict()
    assert _worst(total.apply_to(pre, 1.0), theirs, clip_models) == 0.0
    assert _worst(mean.apply_to(pre, 1.0), theirs, clip_models) > 1e-3
    ratio = torch.cat([(total[k] / mean[k])[mean[k] != 0] for k in mean])
    assert torch.allclose(ratio, ratio.round()) and ratio.min() >= 1 and ratio.max() <= len(vectors)
    assert ratio.max() > 1


@pytest.mark.parametrize("method", [m for m in METHODS if m != "ta"])
def test_chunking_and_device_do_not_change_the_result(clip_models, method):
    """One key per chunk (budget=1) and the default chunks give the same merge; so does
    stacking in float64 (the reference precision) up to float32 round-off."""
    vectors = _vectors(clip_models)
    a = merge_vectors(vectors, method)
    b = merge_vectors(vectors, method, budget=1)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    wide = {t: fo.TaskVector({k: x.double() for k, x in v.items()}) for t, v in vectors.items()}
    c = merge_vectors(wide, method)
    for k in a:
        assert c[k].dtype == torch.float64
        torch.testing.assert_close(a[k].double(), c[k], rtol=1e-4, atol=1e-5)


def test_ties_by_hand():
    """Three tasks, one tensor of four entries: worked on paper. ``keep=0.25`` keeps the top
    two of each: the entries at least the (4 - int(0.25 * 4)) = 3rd smallest magnitude (the
    released TIES code's rule, and FusionBench's: int(keep * d) + 1 entries without ties)."""
    tvs = [fo.TaskVector({"w": torch.tensor(x)}) for x in
           ([4.0, -1.0, 0.5, -3.0], [-2.0, 5.0, 0.1, -0.2], [1.0, 2.0, -6.0, 0.3])]
    # trimmed (top 2 by magnitude each): [4, 0, 0, -3], [-2, 5, 0, 0], [0, 2, -6, 0]
    # elected signs: +, +, -, -; agreeing entries: {4}, {5, 2}, {-6}, {-3}
    torch.testing.assert_close(merge_vectors(tvs, "ties", keep=0.25)["w"], torch.tensor([4.0, 3.5, -6.0, -3.0]))
    torch.testing.assert_close(merge_vectors(tvs, "ties", keep=0.25, merge="sum")["w"],
                               torch.tensor([4.0, 7.0, -6.0, -3.0]))
    torch.testing.assert_close(merge_vectors(tvs, "ties", keep=0.25, merge="max")["w"],
                               torch.tensor([4.0, 5.0, -6.0, -3.0]))


def test_svd_methods_by_their_definitions():
    """One task: TSV-M keeps all of it (r = k) and returns it; Iso-C gives its matrix with
    every singular value equal to their mean; non-matrix entries are the task mean."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=gen, dtype=torch.float64), torch.randn(7, 5, generator=gen, dtype=torch.float64)
    bias = [torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(2)]
    one = [fo.TaskVector({"w": a, "b": bias[0]})]
    torch.testing.assert_close(merge_vectors(one, "tsvm")["w"], a)
    iso = merge_vectors(one, "isoc")["w"]
    s = torch.linalg.svdvals(iso)
    torch.testing.assert_close(s, torch.full_like(s, float(torch.linalg.svdvals(a).mean())))
    two = [fo.TaskVector({"w": a, "b": bias[0]}), fo.TaskVector({"w": b, "b": bias[1]})]
    for method in ("tsvm", "isoc", "isocts"):
        torch.testing.assert_close(merge_vectors(two, method)["b"], (bias[0] + bias[1]) / 2)
    # Iso-C of two tasks: the polar factor of a + b, scaled by the mean singular value of a + b
    u, s, vh = torch.linalg.svd(a + b, full_matrices=False)
    torch.testing.assert_close(merge_vectors(two, "isoc")["w"], s.mean() * u @ vh)


def test_bad_inputs_are_named(clip_models):
    vectors = _vectors(clip_models)
    with pytest.raises(ValueError, match="at least one task vector"):
        merge_vectors({}, "ties")
    with pytest.raises(ValueError, match="different keys"):
        merge_vectors([vectors["task0"], fo.TaskVector({"other": torch.zeros(3)})], "tsvm")
    linear = fo.TaskVector(dict(vectors["task1"]), {"mode": "linear"})
    with pytest.raises(ValueError, match="different fine-tuning modes.*task1: linear"):
        merge_vectors({"task0": vectors["task0"], "task1": linear}, "isoc")
    broken = dict(vectors["task2"])
    key = next(iter(broken))
    broken[key] = broken[key].clone()
    broken[key].view(-1)[0] = float("nan")
    with pytest.raises(ValueError, match=f"task2 has NaN.*{key}"):
        merge_vectors({"task0": vectors["task0"], "task2": fo.TaskVector(broken)}, "dare")
    with pytest.raises(ValueError, match="method: expected one of"):
        merge_vectors(vectors, "average")
    with pytest.raises(ValueError, match="ties takes"):
        merge_vectors(vectors, "ties", p=0.5)
    with pytest.raises(ValueError, match="ta takes no options"):
        merge_vectors(vectors, "ta", exclude=["x"])
    with pytest.raises(ValueError, match="keep"):
        merge_vectors(vectors, "ties", keep=0.0)
    with pytest.raises(ValueError, match="p: expected a drop rate"):
        merge_vectors(vectors, "dare", p=1.0)
    with pytest.raises(ValueError, match="common: 0.0 leaves each of 3 tasks round"):  # 3 x 11 > 32 directions
        merge_vectors([fo.TaskVector({"w": torch.randn(32, 32)}) for _ in range(3)], "isocts", common=0.0)
    with pytest.raises(ValueError, match="unknown merge method"):
        method_names("ta,tie")
    with pytest.raises(TypeError, match="task vector"):
        check_mergeable({"a": 3})
    with pytest.raises(ValueError, match="NaN"):  # task arithmetic refuses the same
        fo.task_addition(clip_models[0].state_dict(), {"task2": fo.TaskVector(broken)}, lambda m, s: 1.0,
                         progress=False)


def test_merge_tasks_searches_each_methods_grid_and_selects_as_asked():
    """A fake evaluator whose accuracy peaks at a known coefficient: the search finds it on
    the validation splits, with the method's own grid, by the rule asked."""
    tv = {"A": fo.TaskVector({"w": torch.ones(3)}), "B": fo.TaskVector({"w": torch.ones(3)})}
    base = {"w": torch.zeros(3)}

    def evaluate(model, split):  # merged weight per entry = alpha * merged direction
        x = float(model["w"][0])
        return max(0.0, 1 - abs(x - (1.2 if split.startswith("A") else 0.6)))

    res = merge_tasks(base, tv, evaluate, method="ties", select="absolute", progress=False)
    assert res.method == "ties" and res.select == "absolute"
    assert [r["alpha"] for r in res.search] == list(METHODS["ties"].alphas)
    assert 0.6 <= res.alpha <= 1.2  # TIES' disjoint mean of two ones is one: x = alpha
    ta = merge_tasks(base, tv, evaluate, method="ta", select="absolute", progress=False)
    assert 0.3 <= ta.alpha <= 0.6  # the sum is two: x = 2 alpha
    assert ta.test["avg_top1"] == pytest.approx((evaluate({"w": torch.full((3,), 2 * ta.alpha)}, "A") +
                                                 evaluate({"w": torch.full((3,), 2 * ta.alpha)}, "B")) / 2)


def test_merges_show_progress_unless_asked_not_to(capsys):
    """Every method but task arithmetic (instant) shows a tqdm bar over its steps, named for
    the method; ``progress=False`` (and ``merge_tasks(progress=False)``) shows none."""
    gen = torch.Generator().manual_seed(0)
    tvs = {t: fo.TaskVector({"a": torch.randn(6, 4, generator=gen), "b": torch.randn(5, generator=gen)})
           for t in ("A", "B")}
    bars = {"ties": ["TIES: trim thresholds", "TIES: sign election and merge"],
            "dare": ["DARE: dropping and adding task vectors"],
            "dare-ties": ["DARE + TIES: trim thresholds", "DARE + TIES: sign election and merge"],
            "tsvm": ["TSV-M: per-layer SVDs"], "isoc": ["Iso-C: per-layer SVDs"], "isocts": ["Iso-CTS: per-layer SVDs"]}
    assert set(bars) == set(METHODS) - {"ta"}
    for method, names in bars.items():
        capsys.readouterr()
        shown = merge_vectors(tvs, method)
        err = capsys.readouterr().err
        assert all(name in err for name in names), (method, err)
        quiet = merge_vectors(tvs, method, progress=False)
        assert capsys.readouterr().err == ""
        assert all(torch.equal(shown[k], quiet[k]) for k in shown)
    merge_vectors(tvs, "ta")
    assert capsys.readouterr().err == ""
    merge_tasks({"a": torch.zeros(6, 4), "b": torch.zeros(5)}, tvs, lambda model, split: 0.5, method="tsvm",
                alphas=[0.5, 1.0], finetuned_accuracy={s: 1.0 for s in ("A", "B", "AVal", "BVal")}, progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("kind", ["normal", "half-zero", "few-values"])
def test_kth_smallest_equals_kthvalue_on_large_inputs(kind):
    """TIES' threshold: the bracketed selection returns kthvalue's exact value, also with many
    ties (DARE-dropped vectors are half zeros) and at the ends."""
    from fastortho.merge.methods import kth_smallest

    gen = torch.Generator().manual_seed(0)
    n = (1 << 22) + 12345
    x = torch.randn(n, generator=gen).abs()
    if kind == "half-zero":
        x = torch.where(torch.rand(n, generator=gen) > 0.5, x, 0.0)
    elif kind == "few-values":
        x = torch.randint(0, 4, (n,), generator=gen).float()
    for rank in (1, 777, n // 2, n - int(0.2 * n), n):
        assert torch.equal(kth_smallest(x, rank), x.kthvalue(rank).values), rank


@pytest.mark.parametrize("shape,rank", [((5, 70, 20), 6), ((5, 70, 20), 20), ((2, 3, 20, 70), 7), ((7, 24, 24), 3),
                                        ((1, 41, 9), 2), ((3, 50, 25), 24), ((4, 33, 20), 5)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_svd_routes_equal_one_lapack_call(shape, rank, threads):
    """fastortho.merge._svd's CPU routes (per-thread slices, wide matrices transposed, tall ones
    reduced by QR when only the top triplets are needed) against one ``torch.linalg.svd`` call:
    float64 to round-off, float32 to float32 round-off of the float64 answer; thread setting
    restored."""
    from fastortho.merge._svd import polar, polar_and_values, top_svd

    gen = torch.Generator().manual_seed(sum(shape) + rank)
    # distinct, decaying singular values: the top triplets are well defined
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    x = x * torch.logspace(0, -2, shape[-1], dtype=torch.float64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        u_ref, s_ref, vh_ref = torch.linalg.svd(x, full_matrices=False)
        low_ref = (u_ref[..., :rank] * s_ref[..., None, :rank]) @ vh_ref[..., :rank, :]
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 2e-5)):
            u, s, vh = top_svd(x.to(dtype), rank)
            assert torch.get_num_threads() == threads
            assert u.shape == (*shape[:-1], rank) and s.shape == (*shape[:-2], rank) and vh.shape == (*shape[:-2], rank,
                                                                                                        shape[-1])
            scale = float(s_ref.max())
            assert float((s.double() - s_ref[..., :rank]).abs().max()) <= tol * scale
            assert float(((u * s[..., None, :]) @ vh).double().sub(low_ref).abs().max()) <= tol * scale
            eye = torch.eye(rank, dtype=dtype)
            assert float((u.mT @ u - eye).abs().max()) <= 10 * tol and float((vh @ vh.mT - eye).abs().max()) <= 10 * tol
            factor, values = polar_and_values(x.to(dtype))
            torch.testing.assert_close(factor.double(), u_ref @ vh_ref, rtol=0, atol=100 * tol)
            torch.testing.assert_close(values.double(), s_ref, rtol=0, atol=tol * scale)
            assert torch.equal(polar(x.to(dtype)), factor)
    finally:
        torch.set_num_threads(before)


def test_cpu_svd_routes_are_taken(monkeypatch):
    """The routes are not dead code: a wide matrix is solved transposed, and its top triplets
    and polar factor through Householder QR of the (then tall) matrix and an SVD of the small R."""
    from fastortho.merge._svd import polar, svd, top_svd

    shapes = []
    real_svd, real_geqrf = torch.linalg.svd, torch.geqrf
    monkeypatch.setattr(torch.linalg, "svd", lambda a, *args, **kw: shapes.append(("svd", a.shape)) or
                        real_svd(a, *args, **kw))
    monkeypatch.setattr(torch, "geqrf", lambda a, *args, **kw: shapes.append(("geqrf", a.shape)) or
                        real_geqrf(a, *args, **kw))
    x = torch.randn(1, 12, 40)
    top_svd(x, 3)
    assert shapes == [("geqrf", (1, 40, 12)), ("svd", (1, 12, 12))]
    shapes.clear()
    svd(x)  # all triplets: no QR, still transposed
    assert shapes == [("svd", (1, 40, 12))]
    shapes.clear()
    polar(x)  # Q (U_R V_R^T) of the transpose
    assert shapes == [("geqrf", (1, 40, 12)), ("svd", (1, 12, 12))]


def test_cpu_svd_failure_in_one_slice_is_solved_again_in_float64(monkeypatch):
    """A slice that fails in float32 fails the batch (after every slice has finished): the batch
    is solved again in float64, and the thread setting is restored."""
    from fastortho.merge._svd import svd

    x = torch.randn(6, 30, 10, generator=torch.Generator().manual_seed(0))
    real, calls = torch.linalg.svd, []

    def flaky(a, full_matrices=True, **kw):
        calls.append((a.dtype, a.shape[0]))
        if a.dtype == torch.float32 and len(calls) == 1:
            raise torch.linalg.LinAlgError("linalg.svd: The algorithm failed to converge")
        return real(a, full_matrices=full_matrices, **kw)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(torch.linalg, "svd", flaky)
        u, s, vh = svd(x)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert u.dtype == torch.float32 and [c for c in calls if c[0] == torch.float64] == [(torch.float64, 3)] * 2
    torch.testing.assert_close(u * s[:, None] @ vh, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("merge", ["mean", "sum", "max"])
@pytest.mark.parametrize("lean", [1, -1])
def test_ties_exact_cancellations_take_the_majority_sign_as_fusionbench(merge, lean):
    """Small integers make many entries' trimmed sums exactly zero with nonzero tasks: those
    entries take the sign of the sum of all elected signs, settled after the single pass; the
    result equals FusionBench's ties_merging on the flat stack, over several chunks."""
    utils = pytest.importorskip("fusion_bench.method.ties_merging.ties_merging_utils")
    gen = torch.Generator().manual_seed(3 if lean > 0 else 4)
    values = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    weights = torch.tensor([1.0, 2.0, 1.0, 2.0, 1.0]) + torch.tensor([0.0, 0.0, 0.0, 0.6, 0.6]) * (lean > 0) \
        + torch.tensor([0.6, 0.6, 0.0, 0.0, 0.0]) * (lean < 0)
    flat = values[torch.multinomial(weights, 3 * 1100, replacement=True, generator=gen)].view(3, 1100)
    tvs = [fo.TaskVector({"a": f[:600].view(12, 50), "b": f[600:].view(10, 50)}) for f in flat]
    with contextlib.redirect_stdout(io.StringIO()):
        theirs = utils.ties_merging(flat.clone(), reset_thresh=60, merge_func=merge)
    ours = merge_vectors(tvs, "ties", keep=0.6, merge=merge, budget=1)
    assert torch.equal(torch.cat([ours["a"].reshape(-1), ours["b"].reshape(-1)]), theirs)
    trimmed_sum = flat.sum(0)  # (a superset check: some zero sums exist among nonzero tasks)
    assert bool(((trimmed_sum == 0) & (flat != 0).any(0)).any())
