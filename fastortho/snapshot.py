"""A frozen copy of exactly the weights a regularizer measures updates against."""
from __future__ import annotations

import json
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from .layers import LayerSpec, select_parameters


class Snapshot(Mapping[str, Tensor]):
    """Read-only ``name -> tensor`` mapping of detached copies of the selected parameters.

    Pass it as ``base`` to :func:`fastortho.ortho_loss`. Only the regularized tensors are kept,
    not the whole model. Save and load with safetensors (nothing is unpickled).
    """

    def __init__(self, tensors: Mapping[str, Tensor], layers: str = "custom"):
        self._tensors = {n: t.detach() for n, t in tensors.items()}
        self.layers = layers

    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __repr__(self) -> str:
        numel = sum(t.numel() for t in self._tensors.values())
        return f"Snapshot({len(self)} tensors, {numel:,} elements, layers={self.layers!r})"

    def to(self, *args, **kwargs) -> Snapshot:
        """A snapshot with every tensor converted as ``Tensor.to(*args, **kwargs)``."""
        return Snapshot({n: t.to(*args, **kwargs) for n, t in self._tensors.items()}, self.layers)

    def save(self, path: str) -> None:
        """Safetensors, written atomically (a unique temporary name, then a rename)."""
        from ._files import save_safetensors

        save_safetensors({n: t.contiguous() for n, t in self._tensors.items()}, path,
                         {"format": "fastortho.snapshot", "layers": json.dumps(self.layers),
                          "order": json.dumps(list(self._tensors))})

    @classmethod
    def load(cls, path: str, device: str | torch.device = "cpu") -> Snapshot:
        from ._files import json_metadata, read_safetensors

        tensors, meta = read_safetensors(path, "path", device)
        if meta.get("format") != "fastortho.snapshot":
            raise ValueError(f"path: {path} is not a fastortho snapshot (metadata format={meta.get('format')!r})")
        # safetensors sorts its keys; put back the model's parameter order.
        order = json_metadata(meta, "order", [], path) or sorted(tensors)
        if not isinstance(order, list) or sorted(map(str, order)) != sorted(tensors):
            raise ValueError(f"path: the metadata entry 'order' of {path} does not list the file's tensors")
        return cls({k: tensors[k] for k in order}, json_metadata(meta, "layers", "custom", path))


def snapshot(model: nn.Module, layers: LayerSpec = "trainable-2d") -> Snapshot:
    """Frozen copy of exactly the weights :func:`fastortho.ortho_loss` with the same ``layers``
    will regularize. Take it before fine-tuning starts."""
    selected = select_parameters(model, layers)
    with torch.no_grad():
        tensors = {n: p.detach().clone() for n, p in selected}
    return Snapshot(tensors, layers if isinstance(layers, str) else "custom")
