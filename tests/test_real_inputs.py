"""Real inputs (issue 19): merging a deep copy of a LoRA model leaves the original working,
tied weights are one entry of a task vector."""
import copy

import pytest
import torch
from torch import nn

import fastortho as fo


def test_merging_a_copy_leaves_the_original_working():
    pytest.importorskip("open_clip")
    from fastortho.offline import EncoderConfig, build_encoder

    model = fo.add_lora(build_encoder(EncoderConfig(width=32, layers=1, heads=2, output_dim=16)), targets="qkvo",
                        rank=4, alpha=4)
    with torch.no_grad():
        for a in fo.lora_adapters(model):
            a.B.normal_(0, 0.1)  # a non-zero update
    x = torch.randn(2, 3, 32, 32)
    before = model(x)
    merged = fo.merge_lora(copy.deepcopy(model))
    assert torch.allclose(merged(x), before, atol=1e-5)
    assert torch.equal(model(x), before) and len(fo.lora_adapters(model)) == 4  # once an AttributeError
    fo.merge_lora(model)
    assert torch.allclose(model(x), before, atol=1e-5)


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(4, 4)
        self.decoder = self.encoder  # one module under two names: two state_dict keys, one tensor

    def forward(self, x):
        return self.decoder(self.encoder(x))


def test_tied_weights_are_one_entry_of_a_task_vector(tmp_path):
    pre = Tied()
    fine = copy.deepcopy(pre)
    with torch.no_grad():
        fine.encoder.weight.add_(1.0)
    tv = fo.TaskVector.from_models(pre, fine)
    assert list(tv) == ["encoder.weight", "encoder.bias"]
    assert tv.norm() == pytest.approx(4.0)  # 16 entries of 1, counted once
    merged = tv.apply_to(pre)
    assert torch.allclose(merged.encoder.weight, pre.encoder.weight + 1)  # once added twice: + 2
    state = tv.apply_to(pre.state_dict())
    assert torch.allclose(state["decoder.weight"], pre.encoder.weight + 1)
    tv.save(tmp_path / "tv.safetensors")
    again = fo.TaskVector.load(tmp_path / "tv.safetensors")
    assert torch.allclose(again.apply_to(pre.state_dict())["decoder.weight"], pre.encoder.weight + 1)
    plain = fo.TaskVector.from_models(pre.state_dict(), fine)  # a clone of the state (no aliases) on one side
    assert list(plain) == ["encoder.weight", "encoder.bias"]


# ----------------------------------------------------------------------------- OpenAI weights (items 1, 2)

@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    open_clip = pytest.importorskip("open_clip")
    import json

    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    path = tmp_path_factory.mktemp("cfg") / "fastortho-tiny-openai.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    # the weights as OpenAI trained them: with QuickGELU
    return "fastortho-tiny-openai", open_clip.create_model("fastortho-tiny-openai", pretrained=None,
                                                           force_quick_gelu=True).eval()


def _activation(model):
    return type(model.visual.transformer.resblocks[0].mlp.gelu).__name__


def test_openai_weights_get_quickgelu_and_torchscript_needs_consent(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    from fastortho import clip

    name, original = tiny_clip
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = original.encode_image(x)
    state = {k: v.contiguous() for k, v in original.state_dict().items()}
    save_file(state, str(tmp_path / "tiny-openai.safetensors"))
    with pytest.raises(ValueError, match="looks like OpenAI's CLIP weights, which need QuickGELU.*--pretrained openai"):
        clip.load_clip(name, tmp_path / "tiny-openai.safetensors")  # once: GELU, silently
    save_file(state, str(tmp_path / "tiny.safetensors"))
    gelu_model = clip.load_clip(name, tmp_path / "tiny.safetensors")[0]  # not named OpenAI: as configured
    assert _activation(gelu_model) == "GELU"

    archive = tmp_path / "ViT-tiny.pt"  # OpenAI's format: a TorchScript archive
    torch.jit.save(torch.jit.trace_module(original, {"encode_image": x}, check_trace=False), str(archive))
    assert clip.is_torchscript(archive) and not clip.is_torchscript(tmp_path / "tiny.safetensors")
    with pytest.raises(ValueError, match="TorchScript archive .* runs code .*--allow-torchscript"):
        clip.load_clip(name, archive)
    model = clip.load_clip(name, archive, allow_torchscript=True)[0]
    assert _activation(model) == "QuickGELU"
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), expected, atol=1e-5)

    clip.main(["convert", str(archive), str(tmp_path / "converted.safetensors")])
    model = clip.load_clip(name, tmp_path / "converted.safetensors")[0]  # no code runs; QuickGELU from metadata
    assert _activation(model) == "QuickGELU"
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), expected, atol=1e-5)


def test_a_pretrained_tag_sets_the_architecture(tiny_clip):
    from pathlib import Path

    from fastortho import clip

    options = clip._architecture_options("ViT-B-32", "openai", Path("w.safetensors"), {})
    assert options["force_quick_gelu"] is True and options["image_interpolation"] == "bicubic"
    assert clip._architecture_options("ViT-B-32", "laion2b_s34b_b79k", Path("w.bin"), {})["force_quick_gelu"] is False
    with pytest.raises(ValueError, match="'nope' is not an open_clip pretrained tag of ViT-B-32 .*openai"):
        clip._architecture_options("ViT-B-32", "nope", Path("w.bin"), {})


def test_an_open_clip_hub_folder_is_read_by_open_clip(tiny_clip, tmp_path):
    import json

    import open_clip
    from safetensors.torch import save_file

    from fastortho import clip

    name, original = tiny_clip
    folder = tmp_path / "hub"
    folder.mkdir()
    cfg = json.loads(json.dumps(open_clip.get_model_config(name)))
    cfg["quick_gelu"] = True  # how the hub configs of OpenAI weights say it
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": {}}))
    with pytest.raises(FileNotFoundError, match="no weights"):
        clip.load_clip("ignored", folder)
    save_file(
        {k: v.contiguous() for k, v in original.state_dict().items()}, str(folder / "open_clip_model.safetensors")
    )
    model, preprocess, tokenizer = clip.load_clip("ignored", folder)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), original.encode_image(x), atol=1e-6)
    assert _activation(model) == "QuickGELU" and tokenizer(["a photo"]).shape[0] == 1
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="has config.json but is not a readable transformers CLIPModel folder"):
        clip.load_clip("ViT-B-32", hf)


# ----------------------------------------------------------------------------- datasets in their real formats

def _png_folder(root, classes, n=3, ext=".png", first_only=False):
    from PIL import Image

    for k, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n if k == 0 or not first_only else 1):
            Image.new("RGB", (8, 8), color=(40 * i, 10, 20)).save(root / c / f"{i}{ext}")


def _write_mnist(raw, n_train=20, n_test=6, first_only=False):
    import numpy as np

    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = np.random.default_rng(0).integers(0, 255, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10 * (not first_only)).astype(np.uint8)
        # idx files: a big-endian magic (0x0803 images, 0x0801 labels), the dimensions, the bytes
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            (0x803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in images.shape) + images.tobytes())
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes((0x801).to_bytes(4, "big") + n.to_bytes(4, "big") +
                                                         labels.tobytes())


def _write_svhn(folder, n=12, first_only=False):
    import numpy as np
    import scipy.io

    folder.mkdir(parents=True)
    for split in ("train", "test"):
        x = np.random.default_rng(1).integers(0, 255, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8)  # SVHN's labels: 1..10, 10 is the digit 0
        if first_only:
            y[:] = 10
        scipy.io.savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})


def _write_gtsrb(folder, first_only=False):
    from PIL import Image

    _png_folder(folder / "GTSRB" / "Training", ["00000", "00001"], n=12, ext=".ppm", first_only=first_only)
    images = folder / "GTSRB" / "Final_Test" / "Images"
    images.mkdir(parents=True)
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i in range(4):
        Image.new("RGB", (8, 8)).save(images / f"{i:05d}.ppm")
        rows.append(f"{i:05d}.ppm;8;8;0;0;7;7;{0 if first_only else i % 2}")
    (folder / "GT-final_test.csv").write_text("\n".join(rows) + "\n")


def _write_cars(folder, n=12, first_only=False):
    import numpy as np
    import scipy.io
    from PIL import Image

    annotation = [
        ("bbox_x1", "O"),
        ("bbox_y1", "O"),
        ("bbox_x2", "O"),
        ("bbox_y2", "O"),
        ("class", "O"),
        ("fname", "O"),
    ]
    (folder / "devkit").mkdir(parents=True)
    for split, annos in (("train", folder / "devkit" / "cars_train_annos.mat"),
                         ("test", folder / "cars_test_annos_withlabels.mat")):
        (folder / f"cars_{split}").mkdir()
        records = np.zeros((1, n), dtype=annotation)
        for i in range(n):
            Image.new("RGB", (8, 8)).save(folder / f"cars_{split}" / f"{i:05d}.jpg")
            records[0, i] = (1, 1, 7, 7, 1 if first_only else i % 2 + 1, f"{i:05d}.jpg")  # classes count from 1
        scipy.io.savemat(annos, {"annotations": records})
    names = np.empty((1, 2), dtype=object)
    names[0, 0], names[0, 1] = "AM General Hummer SUV 2000", "Acura RL Sedan 2012"
    scipy.io.savemat(folder / "devkit" / "cars_meta.mat", {"class_names": names})


def write_benchmark_root(root, monkeypatch, first_only=False):
    """All nine datasets of the CLIP benchmark, tiny, each in its real on-disk format
    (``first_only``: nearly every image of the first class)."""
    import torchvision.datasets as tv

    _write_mnist(root / "MNIST" / "raw", first_only=first_only)
    _write_svhn(root / "svhn", first_only=first_only)
    # torchvision checks SVHN's files against the md5 of the real release; these are tiny fakes
    monkeypatch.setattr(tv.SVHN, "_check_integrity", lambda self: True)
    _write_gtsrb(root / "gtsrb", first_only=first_only)
    _write_cars(root / "stanford_cars", first_only=first_only)
    for folder, classes in (("dtd", ["banded", "woven"]), ("EuroSAT_splits", ["Forest", "River"]),
                            ("resisc45", ["airport", "beach"]), ("sun397", ["abbey", "bakery"]),
                            ("imagenet", ["n01440764", "n01443537"])):
        for split in ("train", "val" if folder == "imagenet" else "test"):
            _png_folder(root / folder / split, classes, n=11, first_only=first_only)


def test_every_benchmark_dataset_reads_from_its_real_format(tmp_path, monkeypatch):
    """Tiny datasets written in each on-disk format the 8-task benchmark reads, loaded through
    fastortho.datasets (torchvision's own classes where torchvision has one)."""
    pytest.importorskip("torchvision")
    pytest.importorskip("scipy")

    from fastortho import datasets

    root = tmp_path
    write_benchmark_root(root, monkeypatch)
    expected_classes = {"Cars": 2, "DTD": 2, "EuroSAT": 2, "GTSRB": 43, "MNIST": 10, "RESISC45": 2, "SUN397": 2,
                        "SVHN": 10, "ImageNet": 2}
    import torchvision.transforms as T

    to_tensor = T.Compose([T.Resize((8, 8)), T.ToTensor()])
    for name, n_classes in expected_classes.items():
        test = datasets.get_dataset(name, root, to_tensor)
        val = datasets.get_dataset(f"{name}Val", root, to_tensor)
        train = datasets.get_dataset(name, root, to_tensor, part="train")
        assert len(test) > 0 and len(val) >= 1 and len(train) > len(val), name
        image, label = train[0]
        assert image.shape[0] in (1, 3) and 0 <= int(label) < n_classes, name
        assert len(datasets.classnames(test, name)) == n_classes, name  # the zero-shot head's prompts
    assert datasets.classnames(datasets.get_dataset("Cars", root))[0] == "AM General Hummer SUV 2000"
    # a damaged one is named with the layout expected
    (root / "gtsrb" / "GT-final_test.csv").unlink()
    with pytest.raises((FileNotFoundError, ValueError), match="GTSRB"):
        datasets.get_dataset("GTSRB", root, to_tensor)


@pytest.mark.parametrize("checkpoint", ["transformers", "open_clip hub", "openai"])
def test_the_readme_benchmark_commands_run_on_local_checkpoints(checkpoint, tiny_clip, tmp_path, monkeypatch, capsys,
                                                                tilted_zero_shot_heads):
    """fastortho-finetune and fastortho-eval on the clip8 benchmark as the README writes them,
    from a Hugging Face CLIPModel folder, an open_clip hub folder and OpenAI's TorchScript
    archive converted once, all built here with random weights in the real file formats."""
    pytest.importorskip("scipy")
    import json

    import open_clip

    from fastortho import clip
    from fastortho.commands import eval as eval_command
    from fastortho.commands import finetune as finetune_command

    write_benchmark_root(tmp_path / "data", monkeypatch, first_only=True)
    name, original = tiny_clip
    if checkpoint == "transformers":
        transformers = pytest.importorskip("transformers")
        cfg = transformers.CLIPConfig(
            text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                         "max_position_embeddings": 77, "vocab_size": 49408},
            vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "image_size": 32, "patch_size": 8}, projection_dim=16)
        torch.manual_seed(0)
        transformers.CLIPModel(cfg).save_pretrained(tmp_path / "weights")  # the folder format of HF checkpoints
        weights = tmp_path / "weights"
    elif checkpoint == "open_clip hub":
        weights = tmp_path / "weights"
        weights.mkdir()
        (weights / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config(name),
                                                                   "preprocess_cfg": {}}))
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in original.state_dict().items()},
                  str(weights / "open_clip_model.safetensors"))
    else:
        archive = tmp_path / "ViT-tiny.pt"
        torch.jit.save(torch.jit.trace_module(original, {"encode_image": torch.randn(1, 3, 32, 32)},
                                              check_trace=False), str(archive))
        weights = tmp_path / "tiny-openai.safetensors"
        clip.main(["convert", str(archive), str(weights)])
    common = ["--benchmark", "clip8", "--model", name, "--weights", str(weights), "--data-root", str(tmp_path / "data"),
              "--device", "cpu", "--workers", "0", "--no-progress"]
    finetune_command.main([*common, "--mode", "lora", "--lora-targets", "qkvo", "--reg", "orthoreg", "--lam", "0.1",
                           "--steps", "1", "--batch-size", "4", "--warmup", "0", "--out", str(tmp_path / "runs")])
    vectors = tmp_path / "runs" / "lora-orthoreg"
    assert len(list(vectors.glob("*.safetensors"))) == 8
    negation = checkpoint == "openai"  # the papers' weights: the whole evaluation; the others: addition only
    eval_command.main([*common, "--vectors", str(vectors), "--out", str(tmp_path / "results"),
                       *([] if negation else ["--no-negation"])])
    results = json.loads((tmp_path / "results" / "results.json").read_text())
    from fastortho.datasets import TASKS8
    assert set(results["single_task"]) == set(TASKS8)
    assert ("negation" in results) == negation and (tmp_path / "results" / "radar.png").exists()
    assert "| task | zero-shot |" in capsys.readouterr().out
