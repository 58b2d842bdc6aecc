"""The CLIP task-arithmetic datasets (Cars, DTD, EuroSAT, GTSRB, MNIST, RESISC45, SUN397, SVHN and
the ImageNet control task), read from a local root in the layout of the original
task-vectors code. Nothing is downloaded: a missing dataset raises an error that names the
path and the layout expected.

``f"{name}Val"`` is the held-out validation split used for coefficient search: as in the
task-vectors code, a fixed 10% (at most 5,000 images, seed 0) of the training split, and the
``"train"`` split is the rest.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset

TASKS8 = ("Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SUN397", "SVHN")
CONTROL = "ImageNet"


@dataclass(frozen=True)
class Layout:
    """Where a dataset lives under the root: ImageFolder directories per split, or a
    torchvision dataset class reading its own files."""
    kind: str  # "folder" or "torchvision"
    paths: dict[str, str]  # split -> directory under root ("folder"), or the dataset directory
    expected: str  # human-readable layout, for errors


LAYOUTS: dict[str, Layout] = {
    "Cars": Layout(
        "torchvision",
        {"train": "stanford_cars", "test": "stanford_cars"},
        "<root>/stanford_cars/ as torchvision.datasets.StanfordCars expects (devkit/, cars_train/, cars_test/, "
        "cars_test_annos_withlabels.mat)",
    ),
    "DTD": Layout("folder", {"train": "dtd/train", "test": "dtd/test"}, "<root>/dtd/{train,test}/<class>/<image>"),
    "EuroSAT": Layout(
        "folder",
        {"train": "EuroSAT_splits/train", "test": "EuroSAT_splits/test"},
        "<root>/EuroSAT_splits/{train,test}/<class>/<image>",
    ),
    "GTSRB": Layout(
        "torchvision",
        {"train": "gtsrb/GTSRB/Training", "test": "gtsrb/GTSRB/Final_Test/Images"},
        "<root>/gtsrb/ as torchvision.datasets.GTSRB(<root>) reads it: GTSRB/Training/<class>/*.ppm, "
        "GTSRB/Final_Test/Images/*.ppm and GT-final_test.csv",
    ),
    "MNIST": Layout(
        "torchvision", {"train": "MNIST", "test": "MNIST"}, "<root>/MNIST/raw/ (torchvision.datasets.MNIST files)"
    ),
    "RESISC45": Layout(
        "folder", {"train": "resisc45/train", "test": "resisc45/test"}, "<root>/resisc45/{train,test}/<class>/<image>"
    ),
    "SUN397": Layout(
        "folder", {"train": "sun397/train", "test": "sun397/test"}, "<root>/sun397/{train,test}/<class>/<image>"
    ),
    "SVHN": Layout(
        "torchvision",
        {"train": "svhn", "test": "svhn"},
        "<root>/svhn/{train,test}_32x32.mat (torchvision.datasets.SVHN files)",
    ),
    "ImageNet": Layout(
        "folder", {"train": "imagenet/train", "test": "imagenet/val"}, "<root>/imagenet/{train,val}/<wnid>/<image>"
    ),
}


def _torchvision(name: str, root: Path, split: str, transform):
    import torchvision.datasets as tv

    train = split == "train"
    if name == "MNIST":
        return tv.MNIST(str(root), train=train, transform=transform, download=False)
    if name == "SVHN":
        return tv.SVHN(str(root / "svhn"), split="train" if train else "test", transform=transform, download=False)
    if name == "GTSRB":
        return tv.GTSRB(str(root), split="train" if train else "test", transform=transform, download=False)
    if name == "Cars":
        return tv.StanfordCars(str(root), split="train" if train else "test", transform=transform, download=False)
    raise ValueError(name)


def missing_layout(name: str, root: Path, split: str) -> str | None:
    """Why dataset ``name``'s ``split`` cannot be read under ``root`` (its folder is absent),
    or None: the up-front check, without reading any file."""
    layout = LAYOUTS[name]
    where = root / layout.paths[split]
    if not where.exists():
        return (
            f"dataset {name!r} ({split}): {where} does not exist. Expected layout: {layout.expected}. "
            f"fastortho never downloads datasets; prepare them under --data-root first"
        )
    return None


def _base(name: str, root: Path, split: str, transform) -> Dataset:
    layout = LAYOUTS[name]
    where = root / layout.paths[split]
    problem = missing_layout(name, root, split)
    if problem:
        raise FileNotFoundError(problem)
    if layout.kind == "folder":
        from torchvision.datasets import ImageFolder

        return ImageFolder(str(where), transform=transform)
    try:
        return _torchvision(name, root, split, transform)
    except (RuntimeError, OSError, ValueError, KeyError) as e:  # "Dataset not found or corrupted", a missing file
        raise FileNotFoundError(
            f"dataset {name!r} ({split}) under {where}: {e}. Expected layout: {layout.expected}"
        ) from None


def val_split(n: int, fraction: float = 0.1, max_val: int = 5000, seed: int = 0) -> tuple[list[int], list[int]]:
    """``(train indices, validation indices)`` of a training set of ``n`` items."""
    n_val = min(max_val, int(n * fraction))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_val:]), sorted(order[:n_val])


def get_dataset(split_name: str, root, transform=None, part: str = "eval") -> Dataset:
    """The dataset of a split name: ``"MNIST"`` (test split), ``"MNISTVal"`` (held-out 10% of
    train), or with ``part="train"`` the training split minus the validation part."""
    name = split_name.removesuffix("Val")
    if name not in LAYOUTS:
        raise ValueError(f"split_name: expected one of {sorted(LAYOUTS)} (or ...Val), got {split_name!r}")
    if root is None:
        raise ValueError("root: pass the directory holding the datasets (--data-root)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"root: {root} is not a directory")
    if part == "train" or split_name.endswith("Val"):
        full = _base(name, root, "train", transform)
        train_idx, val_idx = val_split(len(full))
        return Subset(full, val_idx if split_name.endswith("Val") else train_idx)
    return _base(name, root, "test", transform)


DIGITS = tuple(str(d) for d in range(10))
# The 43 GTSRB classes by the meaning of each sign (torchvision's GTSRB has no class names).
GTSRB_CLASSES = (
    "speed limit 20 km/h", "speed limit 30 km/h", "speed limit 50 km/h", "speed limit 60 km/h",
    "speed limit 70 km/h", "speed limit 80 km/h", "end of speed limit 80 km/h", "speed limit 100 km/h",
    "speed limit 120 km/h", "no passing", "no passing for vehicles over 3.5 tons",
    "right of way at the next intersection", "priority road", "yield", "stop", "no vehicles",
    "vehicles over 3.5 tons prohibited", "no entry", "general caution", "dangerous curve to the left",
    "dangerous curve to the right", "double curve", "bumpy road", "slippery road", "road narrows on the right",
    "road work", "traffic signals", "pedestrians", "children crossing", "bicycles crossing", "beware of ice and snow",
    "wild animals crossing", "end of all speed and passing limits", "turn right ahead", "turn left ahead",
    "ahead only", "go straight or right", "go straight or left", "keep right", "keep left", "roundabout mandatory",
    "end of no passing", "end of no passing for vehicles over 3.5 tons",
)
# Names for the prompts where the dataset class has none or an unprompt-like one ("0 - zero").
CLASSNAMES = {"MNIST": DIGITS, "SVHN": DIGITS, "GTSRB": GTSRB_CLASSES}


def classnames(dataset: Dataset, task: str | None = None) -> list[str]:
    """Readable class names of a dataset: the table above for ``task`` in it (MNIST, SVHN,
    GTSRB), else the dataset's own (ImageFolder directory names with ``_`` as spaces)."""
    if task is not None and task.removesuffix("Val") in CLASSNAMES:
        return list(CLASSNAMES[task.removesuffix("Val")])
    base = dataset.dataset if isinstance(dataset, Subset) else dataset
    names = getattr(base, "classes", None)
    if names is None:
        raise ValueError(f"dataset {type(base).__name__} exposes no class names")
    return [str(c).replace("_", " ") for c in names]
