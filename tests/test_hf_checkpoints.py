"""Hugging Face CLIP checkpoints in the formats FusionBench distributes (issue 29, items 1-2):
a ``CLIPModel`` pretrained folder and ``CLIPVisionModel`` fine-tuned folders written by
transformers itself (``save_pretrained``: transformers 5's layout, single and sharded), and the
transformers-4 layout (the same tensors with the ``vision_model.`` prefix, as the hub's
files are). Tiny random models; nothing is downloaded."""
import copy
import json
import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

import fastortho as fo  # noqa: E402
from fastortho import hf  # noqa: E402
from fastortho.clip import load_clip  # noqa: E402
from fastortho.export import main as export_main  # noqa: E402

from conftest import TOL, worst_abs_diff  # noqa: E402

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=99,
            max_position_embeddings=16)


@pytest.fixture(autouse=True)
def quiet_transformers():
    level = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(level)


def _pretrained(folder, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16))
    model.save_pretrained(folder)
    return model


def _finetuned(pretrained, folder, seed, *, layout="t5", shard=False):
    """A CLIPVisionModel with the pretrained image tower plus a small update, written as
    transformers writes it (``layout="t5"``), or with its keys prefixed as transformers 4 wrote
    them (``"t4"``)."""
    vision = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**VISION))
    tower = {k.removeprefix("vision_model."): v for k, v in pretrained.state_dict().items()
             if k.startswith("vision_model.")}
    gen = torch.Generator().manual_seed(seed)
    missing, unexpected = vision.load_state_dict(tower, strict=False)
    assert not [k for k in missing if not k.endswith("position_ids")] and not unexpected
    with torch.no_grad():
        for p in vision.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    vision.save_pretrained(folder, max_shard_size="40KB" if shard else "5GB")
    if layout == "t4":
        path = folder / "model.safetensors"
        save_file({"vision_model." + k: v for k, v in load_file(path).items()}, str(path), metadata={"format": "pt"})
    return vision


def test_a_vision_model_folder_is_refused_where_a_full_clip_is_needed(tmp_path):
    pre = _pretrained(tmp_path / "pre")
    _finetuned(pre, tmp_path / "fine", seed=1)
    with pytest.raises(ValueError, match="is a transformers CLIPVisionModel folder: an image tower alone.*"
                                         "TaskVector.from_checkpoints"):
        load_clip("ViT-B-32", tmp_path / "fine")
    model, _, _ = load_clip("ViT-B-32", tmp_path / "pre")  # the full CLIPModel loads
    assert torch.equal(model.hf.visual_projection.weight, pre.visual_projection.weight)


def test_a_clip_folder_missing_tensors_is_refused_not_left_random(tmp_path):
    _pretrained(tmp_path / "pre")
    path = tmp_path / "pre" / "model.safetensors"
    tensors = load_file(path)
    del tensors["visual_projection.weight"], tensors["text_model.final_layer_norm.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not hold the CLIPModel its config.json describes: 2 missing "
                                         r"\(e\.g\. .*visual_projection.weight.*partly random"):
        load_clip("ViT-B-32", tmp_path / "pre")


def test_an_open_clip_model_refuses_weights_that_do_not_fit(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    small = open_clip.create_model("RN50", pretrained=None).state_dict()
    save_file({k: v.contiguous() for k, v in list(small.items())[:40]}, str(tmp_path / "rn50.safetensors"))
    with pytest.raises(ValueError, match=r"does not fit ViT-B-32: \d+ missing .*; \d+ unexpected .*; 2 of another "
                                         r"shape"):
        load_clip("ViT-B-32", tmp_path / "rn50.safetensors")
    pre = _pretrained(tmp_path / "pre")
    save_file({k: v.contiguous() for k, v in pre.state_dict().items()}, str(tmp_path / "hf.safetensors"))
    with pytest.raises(ValueError, match="holds a transformers CLIPModel state dict, not open_clip's ViT-B-32"):
        load_clip("ViT-B-32", tmp_path / "hf.safetensors")


@pytest.mark.parametrize("layout, shard", [("t5", False), ("t5", True), ("t4", False)])
def test_fusionbench_folders_make_task_vectors_of_the_image_tower(tmp_path, layout, shard):
    pre = _pretrained(tmp_path / "pre")
    fine = _finetuned(pre, tmp_path / "fine", seed=2, layout=layout, shard=shard)
    if shard:
        assert (tmp_path / "fine" / "model.safetensors.index.json").is_file()
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("fastortho")
    logger.addHandler(handler)
    try:
        tv = fo.TaskVector.from_checkpoints(tmp_path / "pre", tmp_path / "fine")
    finally:
        logger.removeHandler(handler)
    assert any("visual_projection.weight is not in the fine-tuned" in r.getMessage() for r in records)
    assert json.loads(tv.metadata["frozen"]) == ["visual_projection.weight"]
    pre_state, fine_state = pre.state_dict(), fine.state_dict()
    tower = [k for k in pre_state if k.startswith("vision_model.") and not k.endswith("position_ids")]
    assert sorted(tv) == sorted(tower)
    for k in tower:
        assert torch.equal(tv[k], fine_state[k.removeprefix("vision_model.")] - pre_state[k]), k


def test_vectors_of_either_transformers_layout_are_the_same(tmp_path):
    pre = _pretrained(tmp_path / "pre")
    _finetuned(pre, tmp_path / "t5", seed=3, layout="t5")
    _finetuned(pre, tmp_path / "t4", seed=3, layout="t4")
    a = fo.TaskVector.from_checkpoints(tmp_path / "pre", tmp_path / "t5")
    b = fo.TaskVector.from_checkpoints(tmp_path / "pre", tmp_path / "t4")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    # a t4 file against a t5 file (both CLIPVisionModel): paired on one naming, nothing frozen
    c = fo.TaskVector.from_checkpoints(tmp_path / "t4" / "model.safetensors", tmp_path / "t5" / "model.safetensors")
    assert "frozen" not in c.metadata and all(float(v.abs().max()) == 0 for v in c.values())


def test_broken_folders_name_what_is_wrong(tmp_path):
    pre = _pretrained(tmp_path / "pre")
    _finetuned(pre, tmp_path / "fine", seed=4, shard=True)
    shards = sorted((tmp_path / "fine").glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match="lacks 1 of the .* shards its index names"):
        fo.TaskVector.from_checkpoints(tmp_path / "pre", tmp_path / "fine")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="finetuned_path: .*empty is a folder without Hugging Face weights"):
        fo.TaskVector.from_checkpoints(tmp_path / "pre", tmp_path / "empty")


def test_eval_takes_fusionbench_fine_tuned_folders_and_model_pools(tmp_path, monkeypatch, capsys,
                                                                  tilted_zero_shot_heads):
    """fastortho-eval --finetuned on the clip8 benchmark: a CLIPModel pretrained folder, one
    CLIPVisionModel folder per task named FusionBench's way, the hub's way or the project's,
    in both transformers layouts; then the same models through a FusionBench model-pool YAML.
    Single-task accuracy is that of the fine-tuned tower itself."""
    pytest.importorskip("scipy")
    from test_real_inputs import write_benchmark_root

    from fastortho.commands import eval as eval_command
    from fastortho.datasets import TASKS8

    write_benchmark_root(tmp_path / "data", monkeypatch, first_only=True)
    text = dict(TEXT, max_position_embeddings=77, vocab_size=49408)  # open_clip's tokenizer reads the prompts
    torch.manual_seed(0)
    pre = transformers.CLIPModel(transformers.CLIPConfig(text_config=text, vision_config=VISION, projection_dim=16))
    pre.save_pretrained(tmp_path / "pre")
    names = {"SUN397": "sun397", "Cars": "clip-vit-base-patch32_stanford-cars", "RESISC45": "RESISC45",
             "EuroSAT": "eurosat", "SVHN": "svhn", "GTSRB": "gtsrb", "MNIST": "mnist", "DTD": "dtd"}
    for i, folder in enumerate(names.values()):
        _finetuned(pre, tmp_path / "pool" / folder, seed=10 + i, layout="t4" if i % 2 else "t5")
    common = ["--benchmark", "clip8", "--model", "ViT-B-32", "--weights", str(tmp_path / "pre"), "--data-root",
              str(tmp_path / "data"), "--device", "cpu", "--workers", "0", "--no-progress"]
    # negation (ImageNet the control) and two merge methods on FusionBench's folders, end to end
    eval_command.main([*common, "--finetuned", str(tmp_path / "pool"), "--out", str(tmp_path / "from-folders"),
                       "--merge", "ta,ties"])
    results = json.loads((tmp_path / "from-folders" / "results.json").read_text())
    assert set(results["single_task"]) == set(TASKS8) == set(results["negation"])
    assert list(results["merge"]) == ["ta", "ties"]
    assert "| task | zero-shot | single-task | task arithmetic | TIES | negated: target |" in capsys.readouterr().out
    common.append("--no-negation")
    pool = {"_pretrained_": "../pre", **{fb: f"../pool/{names[t]}" for fb, t in
                                        hf.FUSIONBENCH_TASKS.items()}}
    (tmp_path / "yaml").mkdir()
    (tmp_path / "yaml" / "pool.yaml").write_text(
        "_target_: fusion_bench.modelpool.CLIPVisionModelPool\nmodels:\n"
        + "".join(f"  {k}: {v}\n" for k, v in pool.items()))
    eval_command.main([*common, "--finetuned", str(tmp_path / "yaml" / "pool.yaml"), "--out",
                       str(tmp_path / "from-yaml")])
    again = json.loads((tmp_path / "from-yaml" / "results.json").read_text())
    assert again["single_task"] == results["single_task"] and again["addition"] == results["addition"]
    assert "negation" not in again


def test_model_pool_entries_that_are_not_local_folders_are_named(tmp_path):
    (tmp_path / "pool.yaml").write_text("models:\n  _pretrained_: openai/clip-vit-base-patch32\n"
                                        "  sun397:\n    _target_: x.y\n")
    with pytest.raises(ValueError, match=r"_pretrained_: openai/clip-vit-base-patch32 is not a local folder.*"
                                         r"never downloads.*sun397: a loader specification"):
        hf.model_pool(tmp_path / "pool.yaml")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "sun397").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no fine-tuned model of \['Cars'\].*stanford-cars"):
        hf.finetuned_folders(tmp_path / "tasks", ["SUN397", "Cars"])


# ----------------------------------------------------------------------------- open_clip -> HF

@pytest.mark.parametrize("quick_gelu", [False, True])
def test_open_clip_towers_map_exactly_onto_clip_vision_models(tmp_path, quick_gelu):
    """open_clip -> HF -> open_clip gives identical tensors, and transformers' own
    CLIPVisionModel, read from the written folder, computes the same image features."""
    transformer = pytest.importorskip("open_clip.transformer")
    from open_clip.transformer import QuickGELU

    torch.manual_seed(0)
    visual = transformer.VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4, mlp_ratio=4.0,
                                           output_dim=16, act_layer=QuickGELU if quick_gelu else torch.nn.GELU).eval()
    with torch.no_grad():  # non-trivial LayerNorms and embeddings
        for p in visual.parameters():
            p.add_(0.02 * torch.randn_like(p))
    config, state = hf.open_clip_to_hf(visual)
    back = hf.hf_to_open_clip(state)
    original = visual.state_dict()
    assert sorted(back) == sorted(original) and all(torch.equal(back[k], original[k]) for k in original)
    folder = hf.write_vision_folder(tmp_path / "export", config, state)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert all(k.startswith("vision_model.") for k in load_file(folder / "model.safetensors"))  # transformers 4's names
    model, info = transformers.CLIPVisionModel.from_pretrained(str(folder), output_loading_info=True)
    assert not [k for k in info["missing_keys"] if not k.endswith("position_ids")] and not info["unexpected_keys"]
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ours = visual(x)
        theirs = model.eval()(pixel_values=x).pooler_output @ state["visual_projection.weight"].T
    assert (ours - theirs).norm() <= 1e-5 * ours.norm()
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        hf.write_vision_folder(tmp_path / "export", config, state)
    written = load_file(folder / "model.safetensors")
    assert sorted(written) == sorted(k for k in state if k != "visual_projection.weight")
    assert all(torch.equal(written[k], state[k]) for k in written)


def test_an_open_clip_tower_without_a_clip_vision_model_counterpart_is_refused():
    transformer = pytest.importorskip("open_clip.transformer")
    visual = transformer.VisionTransformer(image_size=32, patch_size=8, width=64, layers=1, heads=4, mlp_ratio=4.0,
                                           output_dim=16, ls_init_value=0.1)
    with pytest.raises(ValueError, match="this open_clip ViT has layer scale: no CLIPVisionModel computes the same"):
        hf.open_clip_to_hf(visual)


def test_task_vectors_export_as_a_fusionbench_model_pool(tmp_path):
    """python -m fastortho.export export: an open_clip model's task vectors (as fastortho-finetune
    writes them) applied and written as CLIPVisionModel folders with modelpool.yaml; each folder,
    read by transformers, computes the applied open_clip tower's features; the pool reads back
    through fastortho.hf.model_pool; a linearized vector is refused."""
    open_clip = pytest.importorskip("open_clip")
    yaml = pytest.importorskip("yaml")
    cfg = {"embed_dim": 16, "quick_gelu": True,
           "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "fastortho-export-vit.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / "fastortho-export-vit.json")
    torch.manual_seed(0)
    model = open_clip.create_model("fastortho-export-vit", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "pre.safetensors"))
    visual = model.visual.eval()
    (tmp_path / "vectors").mkdir()
    tuned = {}
    for i, task in enumerate(["SUN397", "Cars"]):
        fine = {k: v + 0.01 * (i + 1) * torch.randn_like(v) for k, v in visual.state_dict().items()}
        tv = fo.TaskVector.from_models(visual.state_dict(), fine, {"task": task, "mode": "nonlinear"})
        tv.save(tmp_path / "vectors" / f"{task}.safetensors")
        tuned[task] = tv.apply_to(visual)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("fastortho").addHandler(handler)
    try:
        export_main(["export", "--model", "fastortho-export-vit", "--weights", str(tmp_path / "pre.safetensors"),
                 "--vectors", str(tmp_path / "vectors"), "--out", str(tmp_path / "fb")])
    finally:
        logging.getLogger("fastortho").removeHandler(handler)
    assert any("Cars, SUN397 change the image projection" in r.getMessage() for r in records)
    pool = yaml.safe_load((tmp_path / "fb" / "modelpool.yaml").read_text())
    assert pool["_target_"] == "fusion_bench.modelpool.CLIPVisionModelPool"
    assert set(pool["models"]) == {"_pretrained_", "sun397", "stanford-cars"}
    assert set(hf.model_pool(tmp_path / "fb" / "modelpool.yaml")) == {"_pretrained_", "SUN397", "Cars"}
    x = torch.randn(2, 3, 32, 32)
    # the merged model too, by a fastortho method, as a folder outside the pool
    export_main(["export", "--model", "fastortho-export-vit", "--weights", str(tmp_path / "pre.safetensors"),
                 "--vectors", str(tmp_path / "vectors"), "--out", str(tmp_path / "fb"), "--overwrite",
                 "--merge", "ties", "--merge-alpha", "0.7"])
    vectors = {t: fo.TaskVector.load(tmp_path / "vectors" / f"{t}.safetensors") for t in ("Cars", "SUN397")}
    reference = fo.merge_vectors(vectors, "ties").apply_to(visual, 0.7)  # a copy: visual keeps its proj
    reference.proj = None
    exported = transformers.CLIPVisionModel.from_pretrained(str(tmp_path / "fb" / "merged-ties")).eval()
    with torch.no_grad():
        ours, theirs = reference(x), exported(pixel_values=x).pooler_output
    assert (ours - theirs).norm() <= 1e-5 * ours.norm()
    assert set(yaml.safe_load((tmp_path / "fb" / "modelpool.yaml").read_text())["models"]) == {
        "_pretrained_", "sun397", "stanford-cars"}
    with pytest.raises(SystemExit, match="--merge and --merge-alpha go together"):
        export_main(["export", "--weights", "w", "--vectors", "v", "--out", "o", "--merge", "ties"])
    for name, reference in (("_pretrained_", visual), ("sun397", tuned["SUN397"]), ("stanford-cars", tuned["Cars"])):
        exported = transformers.CLIPVisionModel.from_pretrained(str(tmp_path / "fb" / name)).eval()
        assert exported.config.hidden_act == "quick_gelu"
        reference.proj = None  # the tower's pooled output: what a CLIPVisionModel computes
        with torch.no_grad():
            ours, theirs = reference(x), exported(pixel_values=x).pooler_output
        assert (ours - theirs).norm() <= 1e-5 * ours.norm(), name
    lin = fo.TaskVector.load(tmp_path / "vectors" / "SUN397.safetensors")
    lin.metadata["mode"] = "linearized"
    with pytest.raises(ValueError, match=r"\['SUN397'\] are linearized \(TTA\) task vectors"):
        hf.export_fusionbench(visual, {"SUN397": lin}, tmp_path / "lin")
    with pytest.raises(SystemExit, match="exists; pass overwrite=True"):
        export_main(["export", "--model", "fastortho-export-vit", "--weights", str(tmp_path / "pre.safetensors"),
                 "--vectors", str(tmp_path / "vectors"), "--out", str(tmp_path / "fb")])


# ----------------------------------------------------------------------------- FusionBench itself

def _ties(scaling):
    from fusion_bench.method import TiesMergingAlgorithm

    return TiesMergingAlgorithm(scaling_factor=scaling, threshold=20, remove_keys=[], merge_func="sum")


def test_fusionbench_task_arithmetic_and_ties_agree_on_its_folders_and_on_exported_ones(tmp_path, capsys):
    """FusionBench's CLIPVisionModelPool + TaskArithmeticAlgorithm and TiesMergingAlgorithm
    (the real library) on (1) folders in its own formats and (2) fastortho's export of an
    open_clip model's vectors: its merged models equal fastortho's merges of the same task
    vectors (its TIES config: top 20%, disjoint sum) applied at the same scale."""
    pytest.importorskip("fusion_bench")
    from fusion_bench.method import TaskArithmeticAlgorithm
    from fusion_bench.modelpool import CLIPVisionModelPool

    pre = _pretrained(tmp_path / "pre")
    for i, task in enumerate(["sun397", "dtd", "mnist"]):
        _finetuned(pre, tmp_path / task, seed=20 + i, layout="t4" if i == 1 else "t5")
    pool = CLIPVisionModelPool(models={"_pretrained_": str(tmp_path / "pre"),
                                       **{t: str(tmp_path / t) for t in ("sun397", "dtd", "mnist")}})
    merged = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool)
    vectors = [fo.TaskVector.from_checkpoints(tmp_path / "pre", tmp_path / t) for t in ("sun397", "dtd", "mnist")]
    tower = hf.image_tower(pre.state_dict())
    ours = sum(vectors).apply_to({k: v for k, v in tower.items() if k in vectors[0]}, 0.3)
    theirs = hf.image_tower(merged.state_dict())
    assert sorted(ours) == sorted(k for k in theirs if not k.endswith("position_ids"))
    worst = worst_abs_diff(ours, theirs)
    assert worst <= 1e-6, worst
    merged = _ties(0.4).run(pool)
    ours = fo.merge_vectors(vectors, "ties", merge="sum").apply_to({k: v for k, v in tower.items() if k in vectors[0]},
                                                                    0.4)
    theirs = hf.image_tower(merged.state_dict())
    worst = worst_abs_diff(ours, theirs)
    assert worst <= 1e-6, worst

    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(1)
    visual = open_clip.transformer.VisionTransformer(image_size=32, patch_size=8, width=64, layers=2, heads=4,
                                                     mlp_ratio=4.0, output_dim=16).eval()
    base = visual.state_dict()
    exported_vectors = {}
    for i, task in enumerate(["SUN397", "DTD"]):
        fine = {k: v + 0.01 * (i + 1) * torch.randn_like(v) for k, v in base.items() if k != "proj"}
        exported_vectors[task] = fo.TaskVector.from_models({k: base[k] for k in fine}, fine)
    hf.export_fusionbench(visual, exported_vectors, tmp_path / "fb")
    pool = CLIPVisionModelPool(models=hf.yaml_models(tmp_path / "fb" / "modelpool.yaml"))
    merged = TaskArithmeticAlgorithm(scaling_factor=0.3).run(pool)
    back = hf.hf_to_open_clip(merged.state_dict())
    ours = sum(exported_vectors.values()).apply_to(base, 0.3)
    worst = worst_abs_diff(ours, back, back)
    assert worst <= 1e-6, worst
    # TIES' threshold is over the whole vector: the split of open_clip's fused attention
    # projection into q, k, v moves no entry in or out of the top 20%
    back = hf.hf_to_open_clip(_ties(0.4).run(CLIPVisionModelPool(models=hf.yaml_models(
        tmp_path / "fb" / "modelpool.yaml"))).state_dict())
    ours = fo.merge_vectors(exported_vectors, "ties", merge="sum").apply_to(base, 0.4)
    worst = worst_abs_diff(ours, back, back)
    assert worst <= 1e-6, worst


def test_analyses_run_on_fusionbench_checkpoints_as_on_fastorthos_own(tmp_path):
    """Task vectors of FusionBench-format folders (a CLIPModel pretrained, CLIPVisionModel
    fine-tuned models in both layouts) through the cosine matrix, the tau-Jp matrix and the
    disentanglement error on fastortho's Hugging Face image tower, each against its definition
    computed directly (float64: torch.func.jvp for J tau, forwards at th0 + a1 tau1 + a2 tau2)."""
    from torch.func import functional_call, jvp

    from fastortho import analysis
    from fastortho.clip import TransformersImageTower

    pre = _pretrained(tmp_path / "pre")
    tasks = ["sun397", "dtd"]
    for i, task in enumerate(tasks):
        _finetuned(pre, tmp_path / task, seed=40 + i, layout="t4" if i else "t5")
    vectors = [fo.TaskVector.from_checkpoints(tmp_path / "pre", tmp_path / t) for t in tasks]
    tower = TransformersImageTower(pre.vision_model, pre.visual_projection).double().eval()
    tower.visual_projection.weight.requires_grad_(False)  # FusionBench does not tune it: not in the vectors
    vectors = [fo.TaskVector({k: v.double() for k, v in tv.items()}) for tv in vectors]
    assert all(set(tv) == {k for k, p in tower.named_parameters() if p.requires_grad} for tv in vectors)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(3, 3, 32, 32, generator=gen, dtype=torch.float64) for _ in tasks]

    flat = [tv.flatten(torch.float64) for tv in vectors]
    cos = float(flat[0] @ flat[1] / (flat[0].norm() * flat[1].norm()))
    assert fo.cosine_matrix(vectors)[0, 1] == pytest.approx(cos, rel=1e-12)

    params = {k: p.detach() for k, p in tower.named_parameters()}
    # the definition's J tau by forward-mode AD, which SDPA lacks: the same weights with
    # transformers' eager attention
    eager = copy.deepcopy(tower)
    eager.vision_model.config._attn_implementation = "eager"

    def out_tangent(tau, x):
        tangent = {k: tau.get(k, torch.zeros_like(p)) for k, p in params.items()}
        return jvp(lambda p: functional_call(eager, p, (x,)), (params,), (tangent,))[1]

    directed = torch.tensor([[float(out_tangent(vectors[a], xs[b]).flatten(1).square().sum(1).mean())
                              for b in range(2)] for a in range(2)], dtype=torch.float64)
    ours = fo.taujp_matrix(tower, vectors, xs, symmetric=False)
    # transformers' eager attention takes its softmax in float32: the reference is that precise
    assert float((ours - directed).norm() / directed.norm()) <= TOL["float64-taujp-matrix"]

    grid = (-1.0, 0.5)
    xi = analysis.disentanglement_error(tower, vectors[0], vectors[1], tuple(xs), grid=grid, distance="l2",
                                        progress=False)
    state = tower.state_dict()

    def f(c1, c2, x):
        merged = (c1 * vectors[0] + c2 * vectors[1]).apply_to(state, 1.0)
        return functional_call(tower, merged, (x,))

    a1, a2 = grid[0], grid[1]
    expected = sum(float((f(*((a1, 0.0) if t == 0 else (0.0, a2)), xs[t]) - f(a1, a2, xs[t])).norm(dim=1).mean())
                   for t in range(2))
    assert xi[0, 1] == pytest.approx(expected, rel=1e-9)
    assert xi[0, 1] > 0
