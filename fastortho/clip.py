"""open_clip integration: models from local weight files, zero-shot classification heads from
class names and prompt templates, the image classifier of the papers (encoder + frozen head),
and the 8-task CLIP benchmark over :mod:`fastortho.datasets`.

Nothing is downloaded: pass the pretrained weights as a local file (safetensors, or a torch
checkpoint read with ``weights_only=True``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

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


def load_clip(model_name: str, weights_path, device="cpu"):
    """``(model, preprocess, tokenizer)`` for an open_clip model with weights from a local file."""
    import open_clip

    if weights_path is None:
        raise ValueError(f"weights_path: pass the local file of {model_name}'s pretrained weights (e.g. the "
                         f"open_clip_pytorch_model.bin or .safetensors of the checkpoint you use); fastortho never "
                         f"downloads weights at run time")
    path = Path(weights_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights_path: {path} is not a file")
    model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=None)
    from .task_vectors import load_checkpoint

    state = load_checkpoint(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing:
        raise ValueError(f"weights_path: {path} lacks {len(missing)} weights of {model_name}, e.g. {missing[:3]}")
    return model.to(device).eval(), preprocess, open_clip.get_tokenizer(model_name)


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

    def __init__(self, model_name: str, weights_path, data_root, device="cpu", tasks: Sequence[str] | None = None,
                 templates: Sequence[str] = TEMPLATES):
        from .datasets import CONTROL, TASKS8, classnames, get_dataset

        self.model, self.preprocess, self.tokenizer = load_clip(model_name, weights_path, device)
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
            names = self._classnames(self._get(task, self.root, self.preprocess))
            self._heads[task] = zero_shot_head(self.model, self.tokenizer, names, self.templates, self.device)
        return self._heads[task]

    def train_data(self, task: str):
        return self._get(task, self.root, self.preprocess, part="train")

    def eval_data(self, split: str):
        return self._get(split, self.root, self.preprocess)
