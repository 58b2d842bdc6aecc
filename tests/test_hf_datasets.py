"""Hugging Face datasets on disk (issue 29, item 3), read through the ``datasets`` library,
offline: ``DatasetDict.save_to_disk`` folders and the hub's parquet snapshot layout, with the
class names of the ``ClassLabel`` feature, the dataset's own validation split when it has one,
and ``{Dataset}Val`` carved from train as for the folder layout when it has none."""
import pytest
import torch

datasets = pytest.importorskip("datasets")
from PIL import Image  # noqa: E402

from fastortho import datasets as fd  # noqa: E402
from fastortho.commands._common import InputProblems, check_clip_inputs  # noqa: E402

CLASSES = ["abbey", "bakery", "canyon"]


def _split(n, seed):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASSES), (n,), generator=gen).tolist()
    images = [Image.fromarray((torch.rand(8, 8, 3, generator=gen) * 255).byte().numpy()) for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features), labels


def _dataset_dict(validation=False):
    train, train_labels = _split(30, 0)
    test, test_labels = _split(7, 1)
    splits = {"train": train, "test": test}
    if validation:
        splits["validation"] = _split(5, 2)[0]
    return datasets.DatasetDict(splits), train_labels, test_labels


def _to_tensor(image):
    return torch.tensor(list(image.getdata()), dtype=torch.uint8).view(8, 8, 3)


@pytest.mark.parametrize("how", ["save_to_disk", "parquet"])
def test_a_hugging_face_dataset_reads_with_its_class_names_and_splits(tmp_path, monkeypatch, how):
    monkeypatch.setenv("FASTORTHO_CACHE", str(tmp_path / "cache"))
    dd, train_labels, test_labels = _dataset_dict()
    folder = tmp_path / "root" / "sun397"
    if how == "save_to_disk":
        dd.save_to_disk(str(folder))
    else:  # the hub's layout: data/<split>-00000-of-00001.parquet
        (folder / "data").mkdir(parents=True)
        for split, ds in dd.items():
            ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    root = tmp_path / "root"
    assert fd.dataset_format("SUN397", root) == "hf"
    test = fd.get_dataset("SUN397", root, _to_tensor)
    assert len(test) == 7 and [int(test[i][1]) for i in range(7)] == test_labels
    assert torch.equal(test[3][0], torch.tensor(list(dd["test"][3]["image"].convert("RGB").getdata()),
                                                 dtype=torch.uint8).view(8, 8, 3))
    assert fd.classnames(test, "SUN397") == CLASSES
    train, val = fd.get_dataset("SUN397", root, _to_tensor, part="train"), fd.get_dataset("SUN397Val", root, _to_tensor)
    train_idx, val_idx = fd.val_split(30)
    assert len(val) == len(val_idx) == 3 and len(train) == len(train_idx) == 27
    assert [int(val[i][1]) for i in range(len(val))] == [train_labels[i] for i in val_idx]


def test_a_validation_split_of_the_dataset_is_its_val_and_train_stays_whole(tmp_path):
    dd, _, _ = _dataset_dict(validation=True)
    dd.save_to_disk(str(tmp_path / "stanford-cars"))
    assert len(fd.get_dataset("CarsVal", tmp_path)) == 5
    assert len(fd.get_dataset("Cars", tmp_path, part="train")) == 30


def test_the_format_is_chosen_per_dataset_and_a_missing_one_names_both_layouts(tmp_path):
    _dataset_dict()[0].save_to_disk(str(tmp_path / "dtd"))
    for split in ("train", "test"):
        for c in CLASSES[:2]:
            (tmp_path / "resisc45" / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / "resisc45" / split / c / "x.png")
    assert fd.dataset_format("DTD", tmp_path) == "hf" and fd.dataset_format("RESISC45", tmp_path) == "folder"
    assert len(fd.get_dataset("RESISC45", tmp_path)) == 2
    with pytest.raises(FileNotFoundError, match="no Hugging Face dataset under .*resisc45"):
        fd.get_dataset("RESISC45", tmp_path, data_format="hf")
    with pytest.raises(InputProblems) as problems:
        check_clip_inputs(None, tmp_path, ["DTD", "RESISC45", "EuroSAT"])
    text = str(problems.value)
    assert "EuroSAT_splits/train does not exist" in text and "save_to_disk" in text and "DTD" not in text
    with pytest.raises(ValueError, match="data_format: expected one of"):
        fd.get_dataset("DTD", tmp_path, data_format="arrow")
