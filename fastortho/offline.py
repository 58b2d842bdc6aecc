"""An offline benchmark that runs anywhere with no download: four image tasks with distinct
input domains, a small open_clip ViT, and a "pretrained" starting point that the benchmark
trains once and caches. It exists so that the whole pipeline (fine-tuning in every mode, task
vectors, merging, negation, the analyses) runs end to end on a CPU; it makes no claim to
reproduce the papers' numbers.

Tasks (32 x 32 RGB):

- ``Digits``: scikit-learn's bundled handwritten digits (8 x 8, upscaled, tinted), 10 classes;
- ``Textures``: crops of the two photographs bundled with scikit-learn, by image and
  quadrant, 8 classes;
- ``Shapes``: drawn circles, squares, triangles and crosses on noise, 4 classes;
- ``Gratings``: sinusoidal gratings by orientation (6 angles), 6 classes.

Control task ``Rotation`` (for negation): which of 0/90/180/270 degrees an image of any task
was rotated by, the task the encoder was pretrained on. The heads are frozen, like CLIP's
zero-shot heads: normalized class prototypes of the pretrained features (the analogue of
class-name text embeddings), and the pretraining head for ``Rotation``.
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, TensorDataset

from ._config import cache_dir, offline_config_json
from ._files import read_safetensors, save_safetensors

TASKS = ("Digits", "Textures", "Shapes", "Gratings")
CONTROL = "Rotation"
SIZE = 32


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _digits(seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0  # [N, 1, 8, 8]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).numpy()
    rng = _rng(seed)
    tint = rng.uniform(0.4, 1.0, size=(x.shape[0], 3, 1, 1))
    back = rng.uniform(0.0, 0.3, size=(x.shape[0], 3, 1, 1))
    x = back + (tint - back) * x + rng.normal(0, 0.05, size=(x.shape[0], 3, SIZE, SIZE))
    return x.astype(np.float32), d.target.astype(np.int64)


def _textures(seed: int, n: int = 1600) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_sample_images

    images = [np.asarray(im, dtype=np.float32) / 255.0 for im in load_sample_images().images]
    rng = _rng(seed)
    xs, ys = [], []
    for _ in range(n):
        label = int(rng.integers(0, 8))
        im = images[label // 4]
        h, w = im.shape[0] // 2, im.shape[1] // 2
        qy, qx = divmod(label % 4, 2)
        y0 = qy * h + int(rng.integers(0, h - SIZE))
        x0 = qx * w + int(rng.integers(0, w - SIZE))
        crop = im[y0:y0 + SIZE, x0:x0 + SIZE].transpose(2, 0, 1)
        if rng.random() < 0.5:
            crop = crop[:, :, ::-1]
        xs.append(crop)
        ys.append(label)
    return np.stack(xs).astype(np.float32), np.array(ys, dtype=np.int64)


def _shapes(seed: int, n: int = 1600) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    xs, ys = [], []
    for _ in range(n):
        label = int(rng.integers(0, 4))
        cy, cx = rng.uniform(10, 22, size=2)
        r = rng.uniform(5, 9)
        if label == 0:
            mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        elif label == 1:
            mask = (np.abs(yy - cy) <= r * 0.8) & (np.abs(xx - cx) <= r * 0.8)
        elif label == 2:
            mask = (yy - cy <= r * 0.8) & (yy - cy >= -r) & (np.abs(xx - cx) <= (yy - cy + r) * 0.6)
        else:
            mask = ((np.abs(yy - cy) <= r * 0.25) & (np.abs(xx - cx) <= r)) | \
                   ((np.abs(xx - cx) <= r * 0.25) & (np.abs(yy - cy) <= r))
        color = rng.uniform(0.5, 1.0, size=(3, 1, 1))
        img = rng.uniform(0, 0.35, size=(3, 1, 1)) + rng.normal(0, 0.1, size=(3, SIZE, SIZE))
        img = np.where(mask[None], color, img)
        xs.append(img)
        ys.append(label)
    return np.stack(xs).astype(np.float32), np.array(ys, dtype=np.int64)


def _gratings(seed: int, n: int = 1600) -> tuple[np.ndarray, np.ndarray]:
    rng = _rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    xs, ys = [], []
    for _ in range(n):
        label = int(rng.integers(0, 6))
        theta = math.pi * label / 6 + rng.normal(0, 0.05)
        freq = rng.uniform(0.15, 0.45)
        wave = np.sin(freq * (xx * math.cos(theta) + yy * math.sin(theta)) + rng.uniform(0, 2 * math.pi))
        color = rng.uniform(0.2, 1.0, size=(3, 1, 1))
        img = 0.5 + 0.4 * wave[None] * color + rng.normal(0, 0.15, size=(3, SIZE, SIZE))
        xs.append(img)
        ys.append(label)
    return np.stack(xs).astype(np.float32), np.array(ys, dtype=np.int64)


_MAKERS = {"Digits": _digits, "Textures": _textures, "Shapes": _shapes, "Gratings": _gratings}
CLASSES = {
    "Digits": [str(i) for i in range(10)],
    "Textures": [
        f"{im} {q}" for im in ("china", "flower") for q in ("top-left", "top-right", "bottom-left", "bottom-right")
    ],
    "Shapes": ["circle", "square", "triangle", "cross"],
    "Gratings": [f"{a} degrees" for a in range(0, 180, 30)],
    "Rotation": ["0", "90", "180", "270"],
}

MEAN = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
STD = torch.tensor([0.25, 0.25, 0.25]).view(1, 3, 1, 1)


def splits(task: str, seed: int = 0) -> dict[str, TensorDataset]:
    """``{"train", "val", "test"}`` (60 / 20 / 20 %, fixed by ``seed``), normalized tensors."""
    if task not in _MAKERS:
        raise ValueError(f"task: expected one of {TASKS}, got {task!r}")
    x, y = _MAKERS[task](seed + TASKS.index(task))
    x = ((torch.from_numpy(x) - MEAN) / STD).float()
    y = torch.from_numpy(y)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train, n_val = int(0.6 * len(y)), int(0.2 * len(y))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {k: TensorDataset(x[idx], y[idx]) for k, idx in parts.items()}


def rotation_split(datasets: list[TensorDataset], seed: int) -> TensorDataset:
    """Every image of ``datasets`` rotated by a random multiple of 90 degrees, labelled by it."""
    x = torch.cat([d.tensors[0] for d in datasets])
    k = torch.randint(0, 4, (x.shape[0],), generator=torch.Generator().manual_seed(seed))
    rotated = torch.stack([torch.rot90(img, int(r), dims=(1, 2)) for img, r in zip(x, k)])
    return TensorDataset(rotated, k)


@dataclass(frozen=True)
class EncoderConfig:
    width: int = 64
    layers: int = 3
    heads: int = 4
    patch_size: int = 8
    output_dim: int = 32
    pretrain_steps: int = 400
    seed: int = 0

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    from open_clip.transformer import VisionTransformer

    torch.manual_seed(cfg.seed)
    return VisionTransformer(image_size=SIZE, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
                             heads=cfg.heads, mlp_ratio=2.0, output_dim=cfg.output_dim)


def config_from_env() -> EncoderConfig:
    """``EncoderConfig`` with the fields of the JSON in ``FASTORTHO_OFFLINE_CONFIG`` (for quick
    runs and tests, e.g. ``{"width": 32, "layers": 1, "pretrain_steps": 10}``)."""
    raw = offline_config_json()
    if not raw:
        return EncoderConfig()
    try:
        values = json.loads(raw)
        return EncoderConfig(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"FASTORTHO_OFFLINE_CONFIG: expected a JSON object of EncoderConfig fields, got {raw!r} ({e})"
        ) from None


class OfflineBenchmark:
    """The offline benchmark: ``tasks``, ``control``, a pretrained ``encoder()``, frozen
    ``head(task)``, and datasets by split name (``"Digits"`` test, ``"DigitsVal"``
    validation, ``train_data("Digits")``)."""

    name = "offline"

    def __init__(self, cfg: EncoderConfig | None = None, seed: int = 0, progress: bool = True):
        self.cfg, self.seed, self.progress = cfg or config_from_env(), seed, progress
        self.tasks = list(TASKS)
        self.control = CONTROL
        self.classnames = CLASSES
        self._splits = {t: splits(t, seed) for t in TASKS}
        self._rotation = {s: rotation_split([self._splits[t][s] for t in TASKS], seed + i)
                          for i, s in enumerate(("train", "val", "test"))}
        self._encoder_state, self._rotation_head = self._pretrained()
        self._heads: dict[str, nn.Module] = {}

    # ------------------------------------------------------------------------- pretraining

    def _pretrained(self):
        path = cache_dir() / f"offline-encoder-{self.cfg.key()}.safetensors"
        if path.exists():
            try:
                state = read_safetensors(path, "offline encoder cache")[0]
            except ValueError as e:  # a cache: regenerated, not a dead end
                warnings.warn(f"{e}; it is a cache and is regenerated", stacklevel=3)
            else:
                head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
                return {k: v for k, v in state.items() if not k.startswith("head.")}, head
        encoder = build_encoder(self.cfg)
        head = nn.Linear(self.cfg.output_dim, 4)
        opt = torch.optim.AdamW(list(encoder.parameters()) + list(head.parameters()), lr=2e-3, weight_decay=0.05)
        data = self._rotation["train"]
        gen = torch.Generator().manual_seed(self.cfg.seed)
        steps = range(self.cfg.pretrain_steps)
        if self.progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="offline benchmark: pretraining the encoder (cached once)")
        for _ in steps:
            idx = torch.randint(0, len(data), (128,), generator=gen)
            x, y = data[idx]
            loss = F.cross_entropy(head(F.normalize(encoder(x), dim=-1) * 10.0), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {k: v.detach().contiguous() for k, v in encoder.state_dict().items()}
        head_state = {k: v.detach().contiguous() for k, v in head.state_dict().items()}
        save_safetensors({**state, **{f"head.{k}": v for k, v in head_state.items()}}, path,
                         {"config": json.dumps(asdict(self.cfg))}, "offline encoder cache")
        return state, head_state

    # ------------------------------------------------------------------------- interface

    def encoder(self) -> nn.Module:
        enc = build_encoder(self.cfg)
        enc.load_state_dict(self._encoder_state)
        return enc

    def head(self, task: str) -> nn.Module:
        """The frozen head of ``task`` (also ``...Val``)."""
        task = task.removesuffix("Val")
        if task not in self._heads:
            if task == CONTROL:
                head = nn.Linear(self.cfg.output_dim, 4)
                head.load_state_dict(self._rotation_head)
                head.weight.data.mul_(10.0)  # the temperature the pretraining used
                self._heads[task] = PrototypeHead(head.weight.data, head.bias.data, normalize=True)
            else:
                self._heads[task] = prototype_head(self.encoder(), self._splits[task]["train"], len(CLASSES[task]))
        return self._heads[task]

    def train_data(self, task: str) -> Dataset:
        return self._rotation["train"] if task == CONTROL else self._splits[task]["train"]

    def eval_data(self, split: str) -> Dataset:
        task = split.removesuffix("Val")
        part = "val" if split.endswith("Val") else "test"
        if task == CONTROL:
            return self._rotation[part]
        if task not in self._splits:
            raise ValueError(f"split: expected a task of {self.tasks + [CONTROL]} (or its ...Val), got {split!r}")
        return self._splits[task][part]


class PrototypeHead(nn.Module):
    """A frozen linear head ``logits = W normalize(f) + b`` (CLIP's zero-shot head form)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None, normalize: bool = True):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.normalize = normalize

    def forward(self, features: Tensor) -> Tensor:
        if self.normalize:
            features = F.normalize(features, dim=-1)
        return F.linear(features, self.weight.to(features.dtype),
                        None if self.bias is None else self.bias.to(features.dtype))


@torch.no_grad()
def prototype_head(encoder: nn.Module, data: TensorDataset, num_classes: int, scale: float = 30.0) -> PrototypeHead:
    """Normalized class means of the normalized pretrained features, times ``scale``."""
    encoder.eval()
    x, y = data.tensors
    feats = torch.cat([F.normalize(encoder(x[i:i + 256]), dim=-1) for i in range(0, len(x), 256)])
    protos = torch.stack([feats[y == c].mean(0) for c in range(num_classes)])
    return PrototypeHead(F.normalize(protos, dim=-1) * scale)
