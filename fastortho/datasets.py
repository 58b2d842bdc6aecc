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


# The tasks' Hugging Face datasets (FusionBench's ``tanganke/<name>``), as folders under the
# root: ``save_to_disk`` output (``dataset_dict.json``) or the hub's parquet snapshot
# (``data/<split>-*.parquet``, what ``huggingface-cli download --repo-type dataset`` leaves).
HF_NAMES = {"Cars": "stanford-cars", "DTD": "dtd", "EuroSAT": "eurosat", "GTSRB": "gtsrb", "MNIST": "mnist",
            "RESISC45": "resisc45", "SUN397": "sun397", "SVHN": "svhn"}
DATA_FORMATS = ("auto", "folder", "hf")
HF_EXPECTED = ("<root>/{name}/ as a Hugging Face dataset: DatasetDict.save_to_disk output (dataset_dict.json) or "
               "the hub's parquet snapshot (data/train-*.parquet, data/test-*.parquet)")


def hf_location(name: str, root: Path) -> tuple[str, Path] | None:
    """``("disk" | "parquet", folder)`` where task ``name``'s Hugging Face dataset is under
    ``root``, or None."""
    hf_name = HF_NAMES.get(name)
    if hf_name is None:
        return None
    folder = root / hf_name
    if (folder / "dataset_dict.json").is_file():
        return "disk", folder
    if folder.is_dir() and (any((folder / "data").glob("*.parquet")) or any(folder.glob("*.parquet"))):
        return "parquet", folder
    return None


def check_format(data_format: str) -> str:
    if data_format not in DATA_FORMATS:
        raise ValueError(f"data_format: expected one of {DATA_FORMATS}, got {data_format!r}")
    return data_format


class HFImageDataset(Dataset):
    """One split of a Hugging Face image-classification dataset (an image column, ``image`` or
    ``img``, and a ``ClassLabel`` ``label``) as ``(transform(image), label)`` pairs; ``classes``
    are the ClassLabel's names."""

    def __init__(self, split, transform=None, where: str = ""):
        features = split.features
        self.image_key = next((k for k in ("image", "img") if k in features), None)
        label = features.get("label")
        if self.image_key is None or label is None or not hasattr(label, "names"):
            raise ValueError(f"dataset {where}: expected an image column ('image' or 'img') and a ClassLabel 'label' "
                             f"column, got {list(features)}")
        self.data, self.transform, self.classes = split, transform, list(label.names)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        item = self.data[int(i)]
        image = item[self.image_key].convert("RGB")
        return (self.transform(image) if self.transform is not None else image), int(item["label"])


_HF_LOADED: dict[tuple, object] = {}


def _load_hf(kind: str, folder: Path):
    """The DatasetDict of a task's folder, read once per process, offline."""
    key = (kind, str(folder))
    if key not in _HF_LOADED:
        try:
            import datasets
        except ImportError:
            raise ImportError(f"{folder} is a Hugging Face dataset: reading it needs the datasets library "
                              f"(pip install datasets)") from None
        if kind == "disk":
            loaded = datasets.load_from_disk(str(folder))
        else:
            files = sorted((folder / "data").glob("*.parquet")) or sorted(folder.glob("*.parquet"))
            by_split: dict[str, list[str]] = {}
            for f in files:
                by_split.setdefault(f.name.split("-")[0].split(".")[0], []).append(str(f))
            from ._config import cache_dir

            loaded = datasets.load_dataset("parquet", data_files=by_split, cache_dir=str(cache_dir() / "hf-datasets"))
        if not isinstance(loaded, datasets.DatasetDict):
            raise ValueError(f"{folder}: expected a DatasetDict (splits), got a {type(loaded).__name__}")
        _HF_LOADED[key] = loaded
    return _HF_LOADED[key]


def _hf_dataset(name: str, root: Path, split_name: str, transform, part: str) -> Dataset:
    kind, folder = hf_location(name, root)
    splits = _load_hf(kind, folder)
    for needed in ("train", "test"):
        if needed not in splits:
            raise FileNotFoundError(f"dataset {name!r}: {folder} has the splits {list(splits)}, no {needed!r}")

    def make(split):
        return HFImageDataset(splits[split], transform, f"{name!r} ({folder}, {split})")
    if "validation" in splits:  # the dataset's own held-out split
        if split_name.endswith("Val"):
            return make("validation")
        return make("train" if part == "train" else "test")
    if part == "train" or split_name.endswith("Val"):
        full = make("train")
        train_idx, val_idx = val_split(len(full))
        return Subset(full, val_idx if split_name.endswith("Val") else train_idx)
    return make("test")


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


def dataset_format(name: str, root: Path, data_format: str = "auto") -> str:
    """"hf" or "folder": how dataset ``name`` is read under ``root``. "auto" takes the
    Hugging Face dataset when its folder is there (a ``save_to_disk`` folder has ``train/``
    like the folder layout, so it is looked for first), else the folder layout."""
    check_format(data_format)
    if data_format == "auto":
        return "hf" if hf_location(name, root) is not None else "folder"
    return data_format


def missing_layout(name: str, root: Path, split: str, data_format: str = "auto") -> str | None:
    """Why dataset ``name``'s ``split`` cannot be read under ``root`` (its folder is absent),
    or None: the up-front check, without reading any file."""
    fmt = dataset_format(name, root, data_format)
    if fmt == "hf":
        if hf_location(name, root) is None:
            return (f"dataset {name!r}: no Hugging Face dataset under {root / HF_NAMES.get(name, name)}. Expected "
                    f"layout: {HF_EXPECTED.format(name=HF_NAMES.get(name, name))}")
        return None
    layout = LAYOUTS[name]
    where = root / layout.paths[split]
    if not where.exists():
        hf_name = HF_NAMES.get(name)
        also = (f", or {HF_EXPECTED.format(name=hf_name)} (--data-format auto finds either)"
                if hf_name and data_format == "auto" else "")
        return (
            f"dataset {name!r} ({split}): {where} does not exist. Expected layout: {layout.expected}{also}. "
            f"fastortho never downloads datasets; prepare them under --data-root first"
        )
    return None


def _base(name: str, root: Path, split: str, transform) -> Dataset:
    layout = LAYOUTS[name]
    where = root / layout.paths[split]
    problem = missing_layout(name, root, split, "folder")
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


def get_dataset(split_name: str, root, transform=None, part: str = "eval", data_format: str = "auto") -> Dataset:
    """The dataset of a split name: ``"MNIST"`` (test split), ``"MNISTVal"`` (held-out 10% of
    train), or with ``part="train"`` the training split minus the validation part.
    ``data_format``: "folder" (the task-vectors layout), "hf" (a Hugging Face dataset, whose own
    validation split, when it has one, is ``{name}Val`` and leaves train whole) or "auto"."""
    check_format(data_format)
    name = split_name.removesuffix("Val")
    if name not in LAYOUTS:
        raise ValueError(f"split_name: expected one of {sorted(LAYOUTS)} (or ...Val), got {split_name!r}")
    if root is None:
        raise ValueError("root: pass the directory holding the datasets (--data-root)")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"root: {root} is not a directory")
    if dataset_format(name, root, data_format) == "hf":
        problem = missing_layout(name, root, "train", data_format)
        if problem:
            raise FileNotFoundError(problem)
        return _hf_dataset(name, root, split_name, transform, part)
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
