"""Fine-tuning in every mode x regularizer, the scripts end to end on the offline benchmark (a
tiny encoder configuration), the dataset registry's errors, and the CLIP integration."""
import csv
import io
import json

import pytest
import torch

import fastortho as fo
from fastortho import datasets
from fastortho.commands import _common as command_common
from fastortho.commands import ablate
from fastortho.commands import eval as eval_command
from fastortho.commands import finetune as finetune_command
from fastortho.merge import METHODS
from fastortho.offline import EncoderConfig, OfflineBenchmark
from fastortho.train import MODES, REGULARIZERS, FinetuneConfig, cosine_with_warmup, finetune, make_evaluator

pytest.importorskip("sklearn")
open_clip = pytest.importorskip("open_clip")

TINY = {"width": 32, "layers": 1, "heads": 2, "output_dim": 16, "pretrain_steps": 10}


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    import os

    os.environ["FASTORTHO_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    return OfflineBenchmark(EncoderConfig(**TINY), progress=False)


def test_offline_benchmark(bench):
    assert bench.tasks == ["Digits", "Textures", "Shapes", "Gratings"] and bench.control == "Rotation"
    for split in ["Digits", "DigitsVal", "Rotation", "ShapesVal"]:
        x, y = bench.eval_data(split).tensors
        assert x.shape[1:] == (3, 32, 32) and torch.isfinite(x).all() and len(x) == len(y)
    acc = make_evaluator(bench)(bench.encoder(), "Digits")
    assert 0.0 <= acc <= 1.0
    again = OfflineBenchmark(EncoderConfig(**TINY), progress=False)  # the cached encoder
    assert all(torch.equal(a, b) for a, b in zip(again.encoder().state_dict().values(),
                                                 bench.encoder().state_dict().values()))
    with pytest.raises(ValueError, match="split"):
        bench.eval_data("Nope")


@pytest.mark.parametrize("reg", REGULARIZERS)
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_and_regularizer(bench, mode, reg):
    cfg = FinetuneConfig(mode=mode, reg=reg, steps=2, batch_size=8, lr=1e-3, warmup=1, lora_rank=4, taujp_batch=4)
    res = finetune(bench, "Shapes", cfg, progress=False)
    tv = res.task_vector
    assert tv.metadata["mode"] == mode and tv.metadata["regularizer"] == reg
    assert all(torch.isfinite(v).all() for v in tv.values()) and tv.norm() > 0
    assert res.steps == 2 and res.memory_bytes > 0
    pretrained = fo.linearize(bench.encoder()) if mode == "linear" else bench.encoder()
    assert 0.0 <= make_evaluator(bench)(tv.apply_to(pretrained), "Shapes") <= 1.0
    if mode == "attention":
        assert all(k.endswith(("in_proj_weight", "out_proj.weight")) for k, v in tv.items() if torch.count_nonzero(v))


def test_finished_checkpoint_is_reused(bench, tmp_path):
    cfg = FinetuneConfig(steps=4, batch_size=8, lr=1e-3, warmup=1, checkpoint_every=2)
    full = finetune(bench, "Digits", cfg, checkpoint_dir=tmp_path / "a", progress=False).task_vector
    finetune(bench, "Digits", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert json.loads((tmp_path / "b" / "step-00000004" / "config.json").read_text())["steps"] == 4
    resumed = finetune(bench, "Digits", cfg, checkpoint_dir=tmp_path / "b", progress=False)
    assert resumed.steps == 0  # nothing left to do: the saved weights are the result
    for k in full:
        assert torch.allclose(full[k], resumed.task_vector[k], atol=1e-6), k
    with pytest.raises(ValueError, match="another configuration"):
        finetune(bench, "Digits", FinetuneConfig(**{**cfg.__dict__, "lr": 5e-4}), checkpoint_dir=tmp_path / "b",
                 progress=False)


class _ItemByItem(torch.utils.data.Dataset):
    """A dataset served one sample at a time, as image-file datasets are (no ``tensors``)."""

    def __init__(self, data):
        self.data = data

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return tuple(t[i] for t in self.data.tensors)


class _FileBenchmark:
    """The offline benchmark with its splits served item by item."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def train_data(self, task):
        return _ItemByItem(self.inner.train_data(task))

    def eval_data(self, split):
        return _ItemByItem(self.inner.eval_data(split))


def test_worker_processes_read_exactly_the_seeded_batches(bench):
    from fastortho.train import batch_stream, sample_batch

    data = _ItemByItem(bench.train_data("Digits"))
    finite = list(batch_stream(data, 5, 3, 4, 9, workers=2))
    endless = batch_stream(data, 5, 3, 4, workers=2)
    assert len(finite) == 5
    for step, batch in zip(range(4, 9), finite):
        want = sample_batch(data, 5, 3, step)
        assert all(torch.equal(a, b) for a, b in zip(batch, want))
        assert all(torch.equal(a, b) for a, b in zip(next(endless), want))
    with pytest.raises(ValueError, match="workers: expected a non-negative integer"):
        next(batch_stream(data, 5, 3, 0, workers=-1))


def test_workers_do_not_change_training_or_evaluation(bench):
    files = _FileBenchmark(bench)
    cfg = FinetuneConfig(mode="nonlinear", reg="taujp-cyclical", steps=3, batch_size=8, lr=1e-3, warmup=1,
                         taujp_batch=4, accumulation=2)
    in_process = finetune(bench, "Shapes", cfg, progress=False).task_vector
    loaded = finetune(files, "Shapes", cfg, progress=False, workers=2).task_vector
    for k in in_process:
        assert torch.allclose(in_process[k], loaded[k], rtol=0, atol=1e-7), k
    model = in_process.apply_to(bench.encoder())
    assert make_evaluator(files, batch_size=50, workers=2)(model, "Shapes") == make_evaluator(bench)(model, "Shapes")


def test_config_checks_and_schedule():
    with pytest.raises(ValueError, match="mode"):
        FinetuneConfig(mode="full").check()
    with pytest.raises(ValueError, match="reg"):
        FinetuneConfig(reg="l2").check()
    with pytest.raises(ValueError, match="steps"):
        FinetuneConfig(steps=0).check()
    assert cosine_with_warmup(0, 10, 100) == pytest.approx(0.1)
    assert cosine_with_warmup(10, 10, 100) == pytest.approx(1.0)
    assert cosine_with_warmup(100, 10, 100) == pytest.approx(0.0)


def test_scripts_end_to_end(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FASTORTHO_OFFLINE_CONFIG", json.dumps(TINY))
    common = ["--steps", "2", "--batch-size", "8", "--no-progress"]
    finetune_command.main(["--mode", "lora", "--reg", "orthoreg", "--out", str(tmp_path / "runs"), "--lr", "1e-3",
                       "--warmup", "1", *common])
    assert all((tmp_path / "runs" / "lora-orthoreg" / f"{t}.safetensors").exists() for t in bench.tasks)
    eval_command.main(["--vectors", str(tmp_path / "runs" / "lora-orthoreg"), "--out", str(tmp_path / "eval"),
                   "--no-progress", "--merge", "ta,tsvm"])
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert {"zero_shot", "single_task", "addition", "merge", "negation"} <= set(res)
    assert list(res["merge"]) == ["ta", "tsvm"] and res["addition"] == res["merge"]["ta"]
    assert [r["alpha"] for r in res["merge"]["tsvm"]["search"]] == list(METHODS["tsvm"].alphas)
    printed = capsys.readouterr().out  # a table of both merging and negation, not only JSON
    assert "| task | zero-shot | single-task | task arithmetic | TSV-M | negated: target |" in printed
    assert "TSV-M: alpha" in printed
    assert all(f"| {t} |" in printed for t in bench.tasks) and "normalized" in printed
    assert "Digits:normalized_top1" in res["addition"] and "0.95" in res["negation"]["Digits"]
    assert (tmp_path / "eval" / "radar.png").stat().st_size > 1000
    args = ["--demo", "--modes", "nonlinear,linear", "--regs", "none,orthoreg", "--out", str(tmp_path / "abl"), *common]
    ablate.main(args)
    table = (tmp_path / "abl" / "table.md").read_text()
    for method in ("task arithmetic", "TIES"):  # the demo's two merge methods, one row group each
        assert table.count(f"| {method} | Non-lin. FT |") == 2 and table.count(f"| {method} | TTA (linear FT) |") == 2
    assert "delta abs" in table
    # the demo's lambda grid: each regularized cell fine-tuned at 0.1 and 1, the one whose merged
    # model has the best absolute accuracy on the validation splits reported (with its test numbers)
    assert ("lambda chosen from {0.1, 1} per (fine-tuning method, regularizer, merge method) by the merged model's "
            "absolute accuracy on the validation splits (--lam-select absolute)") in table
    records = [json.loads(line) for line in (tmp_path / "abl" / "runs.jsonl").read_text().splitlines()]
    for mode, name in (("nonlinear", "Non-lin. FT"), ("linear", "TTA (linear FT)")):
        tried = [r for r in records if r["mode"] == mode and r["reg"] == "orthoreg"]
        assert sorted(r["lam"] for r in tried) == [0.1, 1.0]
        for method, title in (("ta", "task arithmetic"), ("ties", "TIES")):
            best = max(tried, key=lambda r: r["merge"][method]["val_abs"])
            m = best["merge"][method]
            assert (f"| {title} | {name} | orthoreg | {best['lam']:g} | {100 * m['abs']:.1f} | {100 * m['norm']:.1f} |"
                    in table)
    rows = list(csv.DictReader(io.StringIO((tmp_path / "abl" / "table.csv").read_text())))
    assert len(rows) == 2 * 3 * 2  # (mode, regularizer, lambda, method): every lambda, not only the chosen
    assert sum(r["chosen"] == "True" for r in rows) == 2 * 2 * 2
    assert (tmp_path / "abl" / "lambda_sensitivity.png").stat().st_size > 1000
    capsys.readouterr()
    ablate.main(args)  # resumable: every run is found done
    assert capsys.readouterr().out.count("done before, skipped") == 6
    ablate.main([*args, "--merge", "ta,isoc", "--lam-select", "normalized"])  # no fine-tuning: merged again
    out = capsys.readouterr().out
    assert out.count("merging again, for isoc") == 6 and "| Iso-C | Non-lin. FT |" in out
    assert "by the merged model's normalized accuracy" in out
    with pytest.raises(SystemExit):
        ablate.main(["--modes", "full", "--out", str(tmp_path / "x")])


# ----------------------------------------------------------------------------- datasets

def _image_folder(root, classes, n=3):
    from PIL import Image

    for c in classes:
        d = root / c
        d.mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), color=(i * 40, 10, 20)).save(d / f"{i}.png")


def test_dataset_registry(tmp_path):
    with pytest.raises(ValueError, match="split_name"):
        datasets.get_dataset("CIFAR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"EuroSAT_splits/\{train,test\}/<class>/<image>"):
        datasets.get_dataset("EuroSAT", tmp_path)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        datasets.get_dataset("DTD", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="MNIST"):
        datasets.get_dataset("MNIST", tmp_path)
    _image_folder(tmp_path / "EuroSAT_splits" / "train", ["Annual_Crop", "Forest"], n=20)
    _image_folder(tmp_path / "EuroSAT_splits" / "test", ["Annual_Crop", "Forest"], n=2)
    test = datasets.get_dataset("EuroSAT", tmp_path)
    val = datasets.get_dataset("EuroSATVal", tmp_path)
    train = datasets.get_dataset("EuroSAT", tmp_path, part="train")
    assert len(test) == 4 and len(val) == 4 and len(train) == 36
    assert not set(val.indices) & set(train.indices)
    assert datasets.get_dataset("EuroSATVal", tmp_path).indices == val.indices  # fixed
    assert datasets.classnames(val) == ["Annual Crop", "Forest"]


# ----------------------------------------------------------------------------- CLIP

@pytest.fixture(scope="module")
def tiny_clip_name(tmp_path_factory):
    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("clipcfg") / "fastortho-tiny-clip.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return "fastortho-tiny-clip"


def test_load_clip_from_local_file_and_zero_shot_head(tiny_clip_name, tmp_path):
    from safetensors.torch import save_file

    from fastortho import clip

    with pytest.raises(ValueError, match="never downloads"):
        clip.load_clip(tiny_clip_name, None)
    with pytest.raises(FileNotFoundError, match="not a file"):
        clip.load_clip(tiny_clip_name, tmp_path / "missing.safetensors")
    torch.manual_seed(0)
    source = open_clip.create_model(tiny_clip_name, pretrained=None)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(tmp_path / "w.safetensors"))
    model, preprocess, tokenizer = clip.load_clip(tiny_clip_name, tmp_path / "w.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))

    names, templates = ["cat", "dog", "tree"], ["a photo of a {}.", "a drawing of a {}."]
    head = clip.zero_shot_head(model, tokenizer, names, templates)
    with torch.no_grad():  # the definition, one class at a time
        expected = []
        for n in names:
            e = model.encode_text(tokenizer([t.format(n) for t in templates]))
            e = e / e.norm(dim=-1, keepdim=True)
            e = e.mean(0)
            expected.append(e / e.norm() * model.logit_scale.exp())
        expected = torch.stack(expected)
        assert torch.allclose(head.weight, expected, atol=1e-5)
        x = torch.randn(2, 3, 32, 32)
        feats = model.encode_image(x)
        logits = clip.ImageClassifier(model.visual, head)(x)
        assert torch.allclose(logits, (feats / feats.norm(dim=-1, keepdim=True)) @ expected.T, atol=1e-4)
    assert not any(p.requires_grad for p in head.parameters())


@pytest.mark.parametrize("form,expected", [("released", ("mean_norm", "mean")), ("paper", ("sum_sq", "sum"))])
def test_taujp_strict_follows_the_released_code_by_default(bench, monkeypatch, form, expected):
    """--reg taujp-strict is the released code's penalty unless --taujp-form paper: per task the
    mean per-sample norm, averaged over the tasks, the cyclical task moving per optimizer step."""
    import fastortho.train.loop as loop

    built = []
    original = loop.TauJpRegularizer

    def recording(*args, **kwargs):
        built.append(kwargs)
        return original(*args, **kwargs)
    monkeypatch.setattr(loop, "TauJpRegularizer", recording)
    cfg = FinetuneConfig(mode="linear", reg="taujp-strict", steps=1, batch_size=4, taujp_batch=2, accumulation=2,
                         taujp_form=form)
    finetune(bench, "Shapes", cfg, progress=False)
    (kwargs,) = built
    assert (kwargs["reduction"], kwargs["task_reduction"]) == expected and kwargs["accumulation"] == 2
    assert FinetuneConfig().taujp_form == "released"
    with pytest.raises(ValueError, match="taujp_form"):
        FinetuneConfig(taujp_form="both").check()


@pytest.mark.parametrize("command", [finetune_command, eval_command, ablate])
def test_every_option_says_what_it_does_and_its_default(command):
    import argparse

    p = command.build_parser()
    assert p.formatter_class is argparse.ArgumentDefaultsHelpFormatter  # --help shows every default
    for action in p._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
    text = p.format_help()
    assert "(default: " in text
    if command is ablate:
        assert "comma-separated" in text


@pytest.mark.parametrize("reg,expected", [("none", ["DTD"]), ("orthoreg", ["DTD"]), ("taujp-strict", None)])
def test_clip8_reads_only_the_tasks_the_run_uses(monkeypatch, tmp_path, reg, expected):
    """--tasks DTD checks only DTD's data (tau-Jp also reads every other task's)."""
    import fastortho.clip

    seen = []

    class Stop(Exception):
        """The recorder stops the command once the benchmark is built."""

    def recording(model, weights, root, device="cpu", tasks=None, **options):
        seen.append(tasks)
        raise Stop
    checked = []
    monkeypatch.setattr(fastortho.clip, "ClipBenchmark", recording)
    monkeypatch.setattr(command_common, "check_clip_inputs", lambda w, root, tasks, *fmt: checked.append(tasks))
    with pytest.raises(Stop):
        finetune_command.main(["--benchmark", "clip8", "--weights", "w.pt", "--data-root", "/data", "--tasks", "DTD",
                               "--reg", reg, "--out", str(tmp_path / "runs"), "--device", "cpu"])
    assert seen == [expected] and checked == [expected or list(datasets.TASKS8)]
