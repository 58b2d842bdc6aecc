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

import torch
from torch import Tensor

VISION_PREFIX = "vision_model."
PROJECTION = "visual_projection.weight"
# A key every CLIP image tower has, in the two namings.
_PATCH = "embeddings.patch_embedding.weight"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
# FusionBench's names of the eight tasks -> the project's (fastortho.datasets.TASKS8)
FUSIONBENCH_TASKS = {"sun397": "SUN397", "stanford-cars": "Cars", "resisc45": "RESISC45", "eurosat": "EuroSAT",
                     "svhn": "SVHN", "gtsrb": "GTSRB", "mnist": "MNIST", "dtd": "DTD"}
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
    from ._files import load_checkpoint

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


def task_name(name: str) -> str:
    """A task named FusionBench's way (``stanford-cars``) or the project's (``Cars``), as the
    project names it; other names as given."""
    return FUSIONBENCH_TASKS.get(name, FUSIONBENCH_TASKS.get(name.lower(), name))


def model_pool(path) -> dict[str, Path]:
    """The local model folders of a FusionBench model-pool YAML (``models:`` mapping a name to
    a path; ``_pretrained_`` included), keyed by the project's task names. Relative paths are
    read from the YAML's folder. Entries that are hub names rather than local folders, or
    loader specifications (``_target_: ...``), raise: fastortho never downloads."""
    path = Path(path).expanduser()
    try:
        import yaml
    except ImportError:
        raise ImportError("reading a FusionBench model-pool YAML needs PyYAML: pip install pyyaml") from None
    try:
        cfg = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"--finetuned: {path} is not a readable YAML file ({e})") from None
    models = cfg.get("models") if isinstance(cfg, dict) else None
    if not isinstance(models, dict) or not models:
        raise ValueError(f"--finetuned: {path} has no 'models:' mapping (a FusionBench model pool names its models "
                         f"there, e.g. 'sun397: <folder>')")
    out, problems = {}, []
    for name, where in models.items():
        if not isinstance(where, str):
            problems.append(f"{name}: a loader specification ({type(where).__name__}); only folder paths are read")
            continue
        folder = Path(where).expanduser()
        folder = folder if folder.is_absolute() else path.parent / folder
        if not folder.is_dir():
            problems.append(f"{name}: {where} is not a local folder (a hub name? fastortho never downloads: "
                            f"huggingface-cli download {where} --local-dir <dir>, then put <dir> here)")
            continue
        out[task_name(str(name))] = folder
    if problems:
        raise ValueError(f"--finetuned: {path}: " + "; ".join(problems))
    return out


def yaml_models(path) -> dict[str, str]:
    """The ``models:`` mapping of a model-pool YAML as written (names and folder paths, as
    strings): what FusionBench's ``CLIPVisionModelPool(models=...)`` takes."""
    import yaml

    return {str(k): str(v) for k, v in yaml.safe_load(Path(path).read_text())["models"].items()}


def finetuned_folders(path, tasks) -> dict[str, Path]:
    """Per task the fine-tuned model folder: from a FusionBench model-pool YAML, or from a
    folder with one sub-folder per task, named the project's way (``Cars``), FusionBench's
    (``stanford-cars``) or as the hub repository (``clip-vit-base-patch32_stanford-cars``)."""
    path = Path(path).expanduser()
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        pool = model_pool(path)
    elif path.is_dir():
        pool = {}
        for sub in sorted(p for p in path.iterdir() if p.is_dir()):
            name = sub.name.rpartition("_")[2] if "_" in sub.name else sub.name
            for candidate in (sub.name, name):
                task = task_name(candidate)
                if task in tasks and task not in pool:
                    pool[task] = sub
                    break
    else:
        raise FileNotFoundError(f"--finetuned: {path} is neither a folder of fine-tuned model folders nor a "
                                f"FusionBench model-pool YAML")
    missing = [t for t in tasks if t not in pool]
    if missing:
        fb = {v: k for k, v in FUSIONBENCH_TASKS.items()}
        raise FileNotFoundError(f"--finetuned: {path} has no fine-tuned model of {missing} (a sub-folder named e.g. "
                                f"{missing[0]} or {fb.get(missing[0], missing[0])}, or a 'models:' entry)")
    return {t: pool[t] for t in tasks}


# ----------------------------------------------------------------------------- open_clip <-> HF

# open_clip VisionTransformer names -> CLIPVisionModel names (transformers-4 layout: every key
# under vision_model.), per block and outside the blocks; in_proj is split into q / k / v.
_OUTER = {"conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
          "positional_embedding": "embeddings.position_embedding.weight", "ln_pre.weight": "pre_layrnorm.weight",
          "ln_pre.bias": "pre_layrnorm.bias", "ln_post.weight": "post_layernorm.weight",
          "ln_post.bias": "post_layernorm.bias"}
_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj", "mlp.c_fc": "mlp.fc1",
          "mlp.c_proj": "mlp.fc2"}


def _check_plain_vit(visual) -> None:
    """Only the standard CLIP ViT maps exactly onto CLIPVisionModel."""
    from open_clip.transformer import VisionTransformer

    if not isinstance(visual, VisionTransformer):
        raise ValueError(f"model: expected an open_clip VisionTransformer image tower, got {type(visual).__name__} "
                         f"(CLIPVisionModel is a ViT)")
    blocks = visual.transformer.resblocks
    odd = [what for what, bad in (
        ("attentional pooling", getattr(visual, "attn_pool", None) is not None),
        ("pooling other than the class token", getattr(visual, "pool_type", "tok") != "tok"),
        ("a final LayerNorm after pooling", getattr(visual, "final_ln_after_pool", False)),
        ("no LayerNorm before the blocks", type(visual.ln_pre).__name__ == "Identity"),
        ("layer scale", any(type(b.ls_1).__name__ != "Identity" for b in blocks)),
        ("a patch dropout or a class-token-free stem", getattr(visual, "class_embedding", None) is None),
    ) if bad]
    if odd:
        raise ValueError(f"model: this open_clip ViT has {', '.join(odd)}: no CLIPVisionModel computes the same")


def open_clip_to_hf(visual) -> tuple[dict, dict[str, Tensor]]:
    """``(config, state)`` of the ``CLIPVisionModel`` that computes what open_clip's ViT image
    tower ``visual`` computes: the transformers config (``model_type`` "clip_vision_model") and
    the tensors under transformers-4 names (``vision_model.*``, which transformers 4 and 5
    both read), plus ``visual_projection.weight`` (``proj`` transposed: image features are
    ``pooler_output @ visual_projection.weight.T``). Exact: tensors are copied, never
    recomputed."""
    _check_plain_vit(visual)
    state = visual.state_dict()
    blocks = visual.transformer.resblocks
    width = int(state["class_embedding"].shape[0])
    act = type(blocks[0].mlp.gelu).__name__
    if act not in ("GELU", "QuickGELU"):
        raise ValueError(f"model: the MLP activation {act} has no CLIPVisionModel counterpart")
    attn = blocks[0].attn
    config = {
        "model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"], "hidden_size": width,
        "intermediate_size": int(state["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        "num_hidden_layers": len(blocks), "num_attention_heads": int(attn.num_heads),
        "image_size": int(visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size),
        "patch_size": int(state["conv1.weight"].shape[-1]), "num_channels": int(state["conv1.weight"].shape[1]),
        "hidden_act": "quick_gelu" if act == "QuickGELU" else "gelu", "layer_norm_eps": float(visual.ln_pre.eps),
        "projection_dim": int(state["proj"].shape[1]) if "proj" in state else width,
    }
    out: dict[str, Tensor] = {}
    for k, v in _OUTER.items():
        out[VISION_PREFIX + v] = state[k].detach().clone()
    for i in range(len(blocks)):
        src, dst = f"transformer.resblocks.{i}.", f"{VISION_PREFIX}encoder.layers.{i}."
        for a, b in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{dst}{b}.{p}"] = state[f"{src}{a}.{p}"].detach().clone()
        for p in ("weight", "bias"):
            for name, part in zip("qkv", state[f"{src}attn.in_proj_{p}"].chunk(3)):
                out[f"{dst}self_attn.{name}_proj.{p}"] = part.detach().clone()
    if "proj" in state:
        out[PROJECTION] = state["proj"].detach().t().contiguous().clone()
    return config, {k: v.contiguous() for k, v in out.items()}


def hf_to_open_clip(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`open_clip_to_hf`'s tensors: open_clip ViT names from a CLIPVisionModel
    state in any layout (q / k / v concatenated back into ``in_proj``)."""
    tower = image_tower(state)
    out: dict[str, Tensor] = {}
    for k, v in _OUTER.items():
        out[k] = tower[VISION_PREFIX + v]
    layers = sorted({int(k.split(".")[3]) for k in tower if k.startswith(VISION_PREFIX + "encoder.layers.")})
    for i in layers:
        src, dst = f"{VISION_PREFIX}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for a, b in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{dst}{a}.{p}"] = tower[f"{src}{b}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{p}"] = torch.cat([tower[f"{src}self_attn.{n}_proj.{p}"] for n in "qkv"])
    if PROJECTION in tower:
        out["proj"] = tower[PROJECTION].t().contiguous()
    return out


def write_vision_folder(folder, config: Mapping, state: Mapping[str, Tensor], *, overwrite: bool = False,
                        what: str = "out") -> Path:
    """A ``CLIPVisionModel`` folder transformers 4 and 5 read: ``config.json`` and
    ``model.safetensors`` (``vision_model.*`` keys; ``visual_projection.weight``, which
    CLIPVisionModel has not, is left out). Built under a hidden name and renamed into place, so
    the folder appears whole or not at all; an existing one is replaced only with ``overwrite``."""
    import shutil

    from ._files import discard, publish, save_safetensors, temporary_name, write_text

    tensors = {k: v.detach().contiguous() for k, v in state.items() if k.startswith(VISION_PREFIX)}
    if not tensors:
        raise ValueError(f"{what}: no vision_model.* tensors to write")
    folder = Path(folder).expanduser()
    if folder.exists() and not overwrite:
        raise FileExistsError(f"{what}: {folder} exists; pass overwrite=True to replace it")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(folder)
    tmp.mkdir()
    try:
        write_text(tmp / "config.json", json.dumps({**config, "torch_dtype": "float32"}, indent=1), what)
        save_safetensors(tensors, tmp / "model.safetensors", {"format": "pt"}, what)
        if folder.exists():
            discard(folder)
        publish(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


# ----------------------------------------------------------------------------- out to FusionBench

def encoder_to_hf(encoder) -> tuple[dict, dict[str, Tensor]]:
    """``(config, state)`` of a CLIPVisionModel computing what an image encoder computes: an
    open_clip ViT (:func:`open_clip_to_hf`) or fastortho's Hugging Face image tower."""
    vision = getattr(encoder, "vision_model", None)
    if vision is not None and hasattr(vision, "config"):
        config = {k: v for k, v in vision.config.to_dict().items() if not k.startswith("_")}
        config.update(model_type="clip_vision_model", architectures=["CLIPVisionModel"])
        return config, {k: v.detach() for k, v in encoder.state_dict().items()}
    return open_clip_to_hf(encoder)


def write_model_pool(path, folders: Mapping[str, Path]) -> Path:
    """A FusionBench ``CLIPVisionModelPool`` YAML naming local folders (``_pretrained_`` and the
    tasks, FusionBench's names), so that any FusionBench method merges them."""
    from ._files import write_text

    lines = ["_target_: fusion_bench.modelpool.CLIPVisionModelPool", "_recursive_: false", "models:"]
    lines += [f"  {name}: {Path(folder).resolve()}" for name, folder in folders.items()]
    return write_text(path, "\n".join(lines) + "\n", "out")


def export_fusionbench(encoder, vectors: Mapping, out, *, alpha: float = 1.0, overwrite: bool = False) -> Path:
    """The pretrained ``encoder`` and, per task, ``encoder + alpha * vector`` as CLIPVisionModel
    folders under ``out`` (``_pretrained_`` and FusionBench's task names), with
    ``modelpool.yaml`` beside them. A linearized (TTA) vector is refused: its model is the
    linearization, which a CLIPVisionModel folder would silently turn into the network. A
    vector's update of the image projection cannot be written (a CLIPVisionModel has none; a
    warning names the tasks)."""
    linearized = [t for t, v in vectors.items() if getattr(v, "metadata", {}).get("mode") == "linearized"]
    if linearized:
        raise ValueError(f"vectors: {linearized} are linearized (TTA) task vectors: their fine-tuned model is "
                         f"f(x; th0) + J(x) tau, not the network at th0 + tau, so a CLIPVisionModel folder would be "
                         f"evaluated as a different model. Evaluate them with fastortho-eval (linearized mode)")
    dropped = [t for t, v in vectors.items()
               if any(k in v and float(v[k].abs().max()) > 0 for k in ("proj", PROJECTION))]
    if dropped:
        import logging

        logging.getLogger("fastortho").warning(
            "fastortho: the task vectors of %s change the image projection, which a CLIPVisionModel has not: the "
            "exported folders keep the tower's update only (FusionBench applies the pretrained CLIPModel's "
            "projection); fine-tune with the projection frozen for an exact export", ", ".join(dropped))
    out = Path(out).expanduser()
    names = {v: k for k, v in FUSIONBENCH_TASKS.items()}
    folders: dict[str, Path] = {}
    config, state = encoder_to_hf(encoder)
    folders["_pretrained_"] = write_vision_folder(out / "_pretrained_", config, state, overwrite=overwrite)
    for task, vector in vectors.items():
        config, state = encoder_to_hf(vector.apply_to(encoder, alpha))
        name = names.get(task, task)
        folders[name] = write_vision_folder(out / name, config, state, overwrite=overwrite)
    write_model_pool(out / "modelpool.yaml", folders)
    return out
