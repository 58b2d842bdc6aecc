"""open_clip integration: models from local weight files, zero-shot classification heads from
class names and prompt templates, the image classifier of the papers (encoder + frozen head),
and the 8-task CLIP benchmark over :mod:`fastortho.datasets`.

Nothing is downloaded: pass the pretrained weights as a local file (safetensors, or a torch
checkpoint read with ``weights_only=True``).
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .offline import PrototypeHead

# A short generic prompt set (the task-vectors code has one list per dataset; any list can be
# passed to zero_shot_head).
TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a bad photo of a {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
    "itap of a {}.",
)


def is_torchscript(path) -> bool:
    """Whether ``path`` is a TorchScript archive (a zip holding ``code/`` and
    ``constants.pkl``: how OpenAI distributes CLIP and open_clip caches it)."""
    import zipfile

    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any("/code/" in n for n in names) and any(n.endswith("constants.pkl") for n in names)


def convert_torchscript(src, dst) -> Path:
    """Write the tensors of the TorchScript archive ``src`` (e.g. OpenAI's ``ViT-B-32.pt``) to
    the safetensors file ``dst``, marked as OpenAI weights (which need QuickGELU). This LOADS
    THE ARCHIVE, which runs code from it: do it once, for a file you trust; the safetensors
    file is then read without running anything."""
    from ._files import save_safetensors

    src = Path(src).expanduser()
    if not is_torchscript(src):
        raise ValueError(f"src: {src} is not a TorchScript archive")
    state = torch.jit.load(str(src), map_location="cpu").state_dict()
    tensors = {k: v.detach().contiguous().clone() for k, v in state.items() if isinstance(v, torch.Tensor)}
    return save_safetensors(tensors, dst, {"source": "openai-torchscript", "quick_gelu": "true",
                                           "converted_from": src.name}, "dst")


def _architecture_options(model_name: str, pretrained: str | None, weights: Path, meta: dict) -> dict:
    """``create_model`` options the weights need: QuickGELU for OpenAI's (named by the tag's
    pretrained config, by a converted file's metadata, or by the archive format itself)."""
    import open_clip

    options = {}
    if pretrained is not None:
        cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
        if not cfg:
            tags = open_clip.list_pretrained_tags_by_model(model_name)
            raise ValueError(f"pretrained: {pretrained!r} is not an open_clip pretrained tag of {model_name} "
                             f"(known: {', '.join(tags) or 'none'})")
        options["force_quick_gelu"] = bool(cfg.get("quick_gelu", False))
        for key, opt in (("mean", "image_mean"), ("std", "image_std"), ("interpolation", "image_interpolation"),
                         ("resize_mode", "image_resize_mode")):
            if cfg.get(key) is not None:
                options[opt] = cfg[key]
    elif meta.get("quick_gelu") == "true":
        options["force_quick_gelu"] = True
    quick = options.get("force_quick_gelu") or model_name.endswith("-quickgelu")
    if not quick and pretrained is None and "openai" in weights.name.lower():
        raise ValueError(f"weights_path: {weights.name} looks like OpenAI's CLIP weights, which need QuickGELU; "
                         f"built as {model_name} the model would use GELU and be silently wrong. Pass --pretrained "
                         f"openai (pretrained='openai') or the model name {model_name}-quickgelu")
    return options


HUB_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


class TransformersImageTower(nn.Module):
    """A transformers CLIP vision tower and its projection as one module, ``pixels ->
    image embedding``: the encoder that is fine-tuned (parameter names those of the
    ``CLIPModel``'s ``vision_model`` and ``visual_projection``)."""

    def __init__(self, vision_model: nn.Module, visual_projection: nn.Module):
        super().__init__()
        self.vision_model, self.visual_projection = vision_model, visual_projection

    def forward(self, pixel_values):
        return self.visual_projection(self.vision_model(pixel_values=pixel_values).pooler_output)


class TransformersCLIP(nn.Module):
    """A transformers ``CLIPModel`` behind the parts of open_clip's interface the benchmark
    uses: ``visual`` (the image tower), ``encode_text`` and ``logit_scale``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model
        self.visual = TransformersImageTower(model.vision_model, model.visual_projection)
        self.logit_scale = model.logit_scale

    def encode_text(self, tokens):
        out = self.hf.get_text_features(input_ids=tokens)
        return out if isinstance(out, torch.Tensor) else out.pooler_output


def _load_transformers_folder(folder: Path, device):
    """A Hugging Face ``CLIPModel`` folder (``config.json`` and the weights, as
    ``save_pretrained`` writes it and model-merging benchmarks distribute fine-tuned
    checkpoints), read by transformers itself, offline. Prompts are tokenized with the
    folder's own tokenizer when it has one, else with CLIP's BPE (open_clip's copy: the
    same 49,408-token vocabulary)."""
    import open_clip
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from transformers import CLIPModel

    from .hf import folder_config

    model_type = folder_config(folder).get("model_type")
    if model_type == "clip_vision_model":
        raise ValueError(f"weights_path: {folder} is a transformers CLIPVisionModel folder: an image tower alone, "
                         f"without the text tower, projection and logit scale a CLIP needs for zero-shot heads. Use "
                         f"it as a fine-tuned model (TaskVector.from_checkpoints(<pretrained CLIPModel folder>, "
                         f"{folder}), or fastortho-eval --finetuned) with the full pretrained CLIPModel as the base")
    if model_type not in (None, "clip"):
        raise ValueError(f"weights_path: {folder} holds a transformers {model_type!r} model, not a CLIPModel")
    try:
        hf, info = CLIPModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"weights_path: {folder} has config.json but is not a readable transformers CLIPModel "
                         f"folder ({first})") from None
    # position_ids: a buffer older transformers saved and newer ones rebuild (not a weight)
    problems = {kind: [k for k in info.get(kind, []) if not str(k).endswith("position_ids")]
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if any(problems.values()):
        raise ValueError(f"weights_path: {folder} does not hold the CLIPModel its config.json describes: "
                         + _key_report(problems["missing_keys"], problems["unexpected_keys"],
                                       [str(m) for m in problems["mismatched_keys"]])
                         + "; the model would be partly random")
    hf = hf.eval()
    image_size = hf.config.vision_config.image_size
    mean, std = OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    processor_cfg = folder / "preprocessor_config.json"
    if processor_cfg.is_file():
        import json

        cfg = json.loads(processor_cfg.read_text())
        mean, std = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    preprocess = open_clip.image_transform(image_size, is_train=False, mean=mean, std=std)
    context = hf.config.text_config.max_position_embeddings
    if (folder / "tokenizer_config.json").is_file():
        from transformers import CLIPTokenizer

        hf_tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)

        def tokenizer(texts):
            return hf_tok(list(texts), padding="max_length", truncation=True, max_length=context,
                          return_tensors="pt")["input_ids"]
    else:
        tokenizer = open_clip.tokenize if context == 77 else (lambda texts: open_clip.tokenize(texts, context))
    return TransformersCLIP(hf).to(device).eval(), preprocess, tokenizer


def _load_hub_folder(folder: Path, device):
    """An open_clip hub folder (``open_clip_config.json`` beside ``open_clip_model.safetensors``
    or ``open_clip_pytorch_model.bin``), read by open_clip's own ``local-dir:`` loader: the
    architecture and preprocessing come from the folder's config, not from ``model_name``."""
    import open_clip

    if not (folder / "open_clip_config.json").is_file():
        if (folder / "config.json").is_file():
            return _load_transformers_folder(folder, device)
        raise ValueError(f"weights_path: {folder} is a folder with neither open_clip_config.json (an open_clip hub "
                         f"folder) nor config.json (a Hugging Face transformers CLIPModel); pass a weights file or one "
                         f"of those folders")
    if not any((folder / name).is_file() for name in HUB_WEIGHTS):
        raise FileNotFoundError(f"weights_path: {folder} has open_clip_config.json but no weights "
                                f"({' or '.join(HUB_WEIGHTS)})")
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.to(device).eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{folder}")


def load_clip(model_name: str, weights_path, device="cpu", *, pretrained: str | None = None,
              allow_torchscript: bool = False):
    """``(model, preprocess, tokenizer)`` for an open_clip model with weights from a local file.

    ``pretrained``: the open_clip tag the weights are (e.g. ``"openai"``, ``"laion2b_s34b_b79k"``):
    the architecture options and preprocessing of that tag's pretrained config follow from it
    (QuickGELU for OpenAI's); nothing is downloaded. A TorchScript archive (OpenAI's own
    format) runs code when loaded: it is refused unless ``allow_torchscript=True``; or convert
    it once with :func:`convert_torchscript`. TorchScript weights are OpenAI's, so they get
    QuickGELU. ``weights_path`` may also be an open_clip hub folder (``open_clip_config.json``
    and the weights beside it): open_clip's own local loader reads it."""
    import open_clip

    if weights_path is None:
        raise ValueError(f"weights_path: pass the local file of {model_name}'s pretrained weights (e.g. the "
                         f"open_clip_pytorch_model.bin or .safetensors of the checkpoint you use); fastortho never "
                         f"downloads weights at run time")
    path = Path(weights_path).expanduser()
    if path.is_dir():
        return _load_hub_folder(path, device)
    if not path.is_file():
        raise FileNotFoundError(f"weights_path: {path} is not a file")
    meta: dict = {}
    if is_torchscript(path):
        if not allow_torchscript:
            raise ValueError(f"weights_path: {path} is a TorchScript archive (OpenAI's format); loading it runs code "
                             f"from the file. Convert it once to safetensors (python -m fastortho.clip convert {path} "
                             f"<out>.safetensors, for a file you trust) or pass --allow-torchscript "
                             f"(allow_torchscript=True)")
        state = {k: v for k, v in torch.jit.load(str(path), map_location="cpu").state_dict().items()}
        meta = {"quick_gelu": "true"}
    elif path.suffix == ".safetensors":
        from ._files import read_safetensors

        state, meta = read_safetensors(path, "weights_path")
    else:
        from ._files import load_checkpoint

        state = load_checkpoint(path)
    from .hf import clip_layout, describe

    layout = clip_layout(state)
    if layout is not None:
        raise ValueError(f"weights_path: {path} holds {describe(layout)} state dict, not open_clip's {model_name}; "
                         f"pass its model folder (config.json beside it) for a CLIPModel, or use a CLIPVisionModel "
                         f"as a fine-tuned model (TaskVector.from_checkpoints)")
    options = _architecture_options(model_name, pretrained, path, meta)
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None, **options)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected and k.rpartition(".")[2] not in _NOT_WEIGHTS]
    mismatched = [f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in the model"
                  for k, v in expected.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or mismatched:
        raise ValueError(f"weights_path: {path} does not fit {model_name}: "
                         + _key_report(missing, unexpected, mismatched)
                         + " (another architecture's weights? check the model name)")
    model.load_state_dict({k: v for k, v in state.items() if k in expected})
    return model.to(device).eval(), preprocess, open_clip.get_tokenizer(model_name)


# Entries of OpenAI's / older checkpoints that are not weights of open_clip's model (a mask
# open_clip rebuilds, position ids, OpenAI's size scalars): ignored when loading.
_NOT_WEIGHTS = ("attn_mask", "position_ids", "input_resolution", "context_length", "vocab_size")


def _key_report(missing, unexpected, mismatched) -> str:
    """One line naming the counts and a few names of each kind of disagreement."""
    parts = [f"{len(keys)} {what} (e.g. {', '.join(map(str, keys[:3]))})"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched))
             if keys]
    return "; ".join(parts)


def main(argv=None) -> None:
    """``python -m fastortho.clip convert <archive.pt> <out.safetensors>``."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m fastortho.clip",
                                description="Convert OpenAI's TorchScript CLIP weights to safetensors (runs the "
                                            "archive's code once: use it on a file you trust).")
    sub_ = p.add_subparsers(dest="command", required=True)
    c = sub_.add_parser("convert", help="TorchScript archive -> safetensors (marked as OpenAI: QuickGELU)")
    c.add_argument("src", type=Path, help="the TorchScript archive, e.g. ViT-B-32.pt")
    c.add_argument("dst", type=Path, help="the safetensors file to write")
    args = p.parse_args(argv)
    out = convert_torchscript(args.src, args.dst)
    print(f"wrote {out} (tensors only; load it with --weights {out})")


@torch.no_grad()
def zero_shot_head(model, tokenizer, classnames: Sequence[str], templates: Sequence[str] = TEMPLATES,
                   device="cpu") -> PrototypeHead:
    """CLIP's zero-shot head: per class the normalized mean of the normalized text embeddings
    of the prompts, times the model's logit scale; applied to normalized image features."""
    if not classnames or not templates:
        raise ValueError("classnames and templates: expected non-empty lists")
    weights = []
    for name in classnames:
        tokens = tokenizer([t.format(name) for t in templates]).to(device)
        emb = F.normalize(model.encode_text(tokens).float(), dim=-1).mean(0)
        weights.append(F.normalize(emb, dim=0))
    scale = float(model.logit_scale.exp()) if hasattr(model, "logit_scale") else 100.0
    return PrototypeHead(torch.stack(weights) * scale, normalize=True)


class ImageClassifier(nn.Module):
    """``head(encoder(x))``: the image encoder that is fine-tuned and a frozen zero-shot head."""

    def __init__(self, encoder: nn.Module, head: nn.Module):
        super().__init__()
        self.encoder, self.head = encoder, head
        self.head.requires_grad_(False)

    def forward(self, x):
        return self.head(self.encoder(x))


class ClipBenchmark:
    """The 8 tasks (and ImageNet as the negation control) on an open_clip model."""

    name = "clip8"

    def __init__(
        self,
        model_name: str,
        weights_path,
        data_root,
        device="cpu",
        tasks: Sequence[str] | None = None,
        templates: Sequence[str] = TEMPLATES,
        *,
        pretrained: str | None = None,
        allow_torchscript: bool = False,
        data_format: str = "auto",
    ):
        import functools

        from .datasets import CONTROL, TASKS8, check_format, classnames, get_dataset

        get_dataset = functools.partial(get_dataset, data_format=check_format(data_format))

        self.model, self.preprocess, self.tokenizer = load_clip(model_name, weights_path, device, pretrained=pretrained,
                                                                allow_torchscript=allow_torchscript)
        self.weights = str(weights_path)  # recorded in checkpoints (the base they started from)
        self.model_name = model_name
        self.device, self.templates, self.root = device, templates, data_root
        self.tasks = list(tasks or TASKS8)
        self.control = CONTROL
        self._get, self._classnames = get_dataset, classnames
        for t in self.tasks:  # fail early, with the layout, when a dataset is missing
            get_dataset(t, data_root, self.preprocess)
        self._heads: dict[str, nn.Module] = {}
        self._visual = {k: v.detach().clone() for k, v in self.model.visual.state_dict().items()}

    def encoder(self) -> nn.Module:
        import copy

        enc = copy.deepcopy(self.model.visual)
        enc.load_state_dict(self._visual)
        return enc

    def head(self, task: str) -> nn.Module:
        task = task.removesuffix("Val")
        if task not in self._heads:
            names = self._classnames(self._get(task, self.root, self.preprocess), task)
            self._heads[task] = zero_shot_head(self.model, self.tokenizer, names, self.templates, self.device)
        return self._heads[task]

    def train_data(self, task: str):
        return self._get(task, self.root, self.preprocess, part="train")

    def eval_data(self, split: str):
        return self._get(split, self.root, self.preprocess)


if __name__ == "__main__":
    main()
