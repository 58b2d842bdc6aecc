"""Hugging Face CLIP weights as researchers have them (docs/design.md section 8): model folders
(``config.json`` beside single or sharded safetensors, or ``pytorch_model.bin``) and the
state dicts inside them, in the layouts transformers writes.

Three layouts of the same image tower exist:

- ``CLIPModel`` (``model_type`` "clip"; the pretrained ``openai/clip-vit-base-patch32``):
  ``vision_model.*``, ``visual_projection.weight``, and the text tower (``text_model.*``,
  ``text_projection.weight``, ``logit_scale``);
- ``CLIPVisionModel`` written by transformers 4 (FusionBench's fine-tuned checkpoints on the
  hub): ``vision_model.*``, no projection;
- ``CLIPVisionModel`` written by transformers 5: the same tensors without the
  ``vision_model.`` prefix.

:func:`image_tower` brings any of them to one naming, that of fastortho's HF image tower
(``fastortho.clip.TransformersImageTower``: ``vision_model.*`` and ``visual_projection.weight``),
so that vectors of checkpoints in different layouts line up. Nothing is downloaded; nothing is
unpickled (``.bin`` files are read with ``weights_only=True``).
"""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

VISION_PREFIX = "vision_model."
PROJECTION = "visual_projection.weight"
# A key every CLIP image tower has, in the two namings.
_PATCH = "embeddings.patch_embedding.weight"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def folder_config(folder) -> dict:
    """The folder's ``config.json`` (``{}`` when it has none); a malformed one raises a
    ValueError naming it."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"path: {path} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"path: {path} holds a {type(cfg).__name__}, not a JSON object")
    return cfg


def is_model_folder(path) -> bool:
    """Whether ``path`` is a folder of Hugging Face weights (a single file or a shard index)."""
    p = Path(path)
    return p.is_dir() and any((p / n).is_file() for n in (*SINGLE_FILES, *SHARD_INDEXES))


def _read_file(path: Path) -> dict[str, Tensor]:
    from .task_vectors import load_checkpoint

    return load_checkpoint(path)


def read_folder(folder) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face model folder: ``model.safetensors``, or the shards its
    index names (each read once; a shard the index names but the folder lacks, or a tensor
    the index maps to a shard that does not hold it, raises), or ``pytorch_model.bin``."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"path: no such folder: {folder}")
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return _read_file(folder / name)
    for name in SHARD_INDEXES:
        index_path = folder / name
        if not index_path.is_file():
            continue
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"path: {index_path} is not a shard index with a weight_map ({e})") from None
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            raise FileNotFoundError(f"path: {folder} lacks {len(missing)} of the {len(shards)} shards its index "
                                    f"names, e.g. {missing[:3]} (an interrupted download?)")
        state: dict[str, Tensor] = {}
        for shard in shards:
            state.update(_read_file(folder / shard))
        absent = [k for k in weight_map if k not in state]
        if absent:
            raise ValueError(f"path: {len(absent)} tensors of {index_path.name} are in none of its shards, "
                             f"e.g. {absent[:3]}")
        return state
    raise FileNotFoundError(f"path: {folder} holds no Hugging Face weights (expected one of "
                            f"{', '.join(SINGLE_FILES + SHARD_INDEXES)})")


def clip_layout(state: Mapping[str, Tensor]) -> str | None:
    """Which CLIP layout a state dict is in: "clip" (a CLIPModel), "vision" (a CLIPVisionModel
    written by transformers 4: ``vision_model.*``), "vision-unprefixed" (by transformers 5),
    or None (not a Hugging Face CLIP: an open_clip model, or anything else)."""
    if VISION_PREFIX + _PATCH in state:
        return "clip" if any(k.startswith("text_model.") for k in state) else "vision"
    if _PATCH in state:
        return "vision-unprefixed"
    return None


def image_tower(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The image tower of a Hugging Face CLIP state dict in any of its layouts, named as
    fastortho's HF image tower names it (``vision_model.*``, ``visual_projection.weight`` when
    present); the text tower and ``logit_scale`` are left out."""
    layout = clip_layout(state)
    if layout is None:
        raise ValueError("state: not a Hugging Face CLIP state dict (no embeddings.patch_embedding.weight, with or "
                         "without the vision_model. prefix)")
    if layout == "vision-unprefixed":
        return {VISION_PREFIX + k: v for k, v in state.items()}
    return {k: v for k, v in state.items() if k.startswith(VISION_PREFIX) or k == PROJECTION}


def describe(layout: str | None) -> str:
    return {"clip": "a transformers CLIPModel", "vision": "a transformers-4 CLIPVisionModel",
            "vision-unprefixed": "a transformers-5 CLIPVisionModel"}.get(layout or "", "not a Hugging Face CLIP")
