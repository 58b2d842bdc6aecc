"""Helpers for tests and benchmarks: the real 2-D weight shapes of open_clip vision towers
(without building or downloading a model) and random (W, W0) layer sets of given shapes."""
from __future__ import annotations

import torch
from torch import Tensor

# open_clip vision tower configs: (width, layers, patch_size, image_size, embed_dim, mlp_ratio)
VIT_CONFIGS = {
    "ViT-B-32": (768, 12, 32, 224, 512, 4.0),
    "ViT-B-16": (768, 12, 16, 224, 512, 4.0),
    "ViT-L-14": (1024, 24, 14, 224, 768, 4.0),
}


def vit_weight_shapes(name: str) -> list[tuple[int, int]]:
    """Shapes of the parameters the released-code rule regularizes in an open_clip ViT's
    visual tower, in ``named_parameters()`` order (50 for ViT-B-32, 98 for ViT-L-14)."""
    if name not in VIT_CONFIGS:
        raise ValueError(f"name: expected one of {sorted(VIT_CONFIGS)}, got {name!r}")
    width, layers, patch, image, embed, ratio = VIT_CONFIGS[name]
    hidden = int(width * ratio)
    tokens = (image // patch) ** 2 + 1
    shapes = [(tokens, width), (width, embed)]  # positional_embedding, proj
    for _ in range(layers):
        shapes += [(3 * width, width), (width, width), (hidden, width), (width, hidden)]
    return shapes


def random_layers(shapes, *, scale: float | None = None, dtype=torch.float32, device="cpu",
                  generator: torch.Generator | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """Random pretrained weights ``W0`` and tuned ``W = W0 + scale * noise`` per shape.

    ``scale`` sets the entries of ``D``; the default ``1 / sqrt(max(rows, cols))`` makes the
    Gram of order 1, so neither ``||G||^2`` nor ``-2||D||^2 + k`` dominates the penalty.
    """
    bases, weights = [], []
    for r, c in shapes:
        w0 = torch.randn(r, c, generator=generator, dtype=torch.float64) * 0.02
        s = scale if scale is not None else max(r, c) ** -0.5
        d = torch.randn(r, c, generator=generator, dtype=torch.float64) * s
        bases.append(w0.to(dtype=dtype, device=device))
        weights.append((w0 + d).to(dtype=dtype, device=device))
    return weights, bases


def saved_activation_bytes(loss_fn, exclude=()) -> int:
    """Bytes of the distinct tensors autograd saves for backward while ``loss_fn()`` runs (the
    activation memory of a training step, measurable on any device), not counting the
    storages of the tensors in ``exclude`` (parameters and buffers, which exist anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip and ptr != 0:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn()
    del loss
    return sum(seen.values())


def count_aten_ops(fn) -> dict:
    """ATen ops dispatched while ``fn()`` runs (forward and backward included when ``fn`` calls
    backward), counted at the dispatcher, where every op a GPU step launches or a tensor
    subclass constructs (its detach/alias) passes: the CPU proxy for a step being host-bound.
    Returns ``{"total": n, "by_op": {name: count}}``."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: dict[str, int] = {}

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func.overloadpacket.__name__)
            counts[name] = counts.get(name, 0) + 1
            return func(*args, **(kwargs or {}))

    with Counter():
        fn()
    return {"total": sum(counts.values()), "by_op": dict(sorted(counts.items(), key=lambda kv: -kv[1]))}


def linearized_op_ratio(layers: int = 4) -> dict:
    """ATen ops of a linearized forward + backward against an ordinary step's, on the block
    structure of an open_clip ViT (``layers`` blocks, CPU): the measure that predicts a
    linearized step's host cost. Each ``Dual`` made by ``Tensor._make_subclass`` is a
    construction the dispatcher does not count; ``with_constructions`` adds them."""
    from open_clip.transformer import VisionTransformer

    import fastortho as fo

    with torch.random.fork_rng():  # the caller's random state is left as it was
        torch.manual_seed(0)
        model = VisionTransformer(image_size=32, patch_size=8, width=64, layers=layers, heads=4, mlp_ratio=4.0,
                                  output_dim=16).train()
        x = torch.randn(2, 3, 32, 32)
    lin = fo.linearize(model)

    def ordinary():
        model(x).square().mean().backward()

    def linearized():
        lin(x).square().mean().backward()

    ordinary(), linearized()  # the first calls build caches
    plain = count_aten_ops(ordinary)["total"]
    made = [0]
    original = torch.Tensor._make_subclass

    def counting(cls, data, *args, **kwargs):
        made[0] += 1
        return original(cls, data, *args, **kwargs)

    torch.Tensor._make_subclass = staticmethod(counting)
    try:
        ours = count_aten_ops(linearized)["total"]
    finally:
        torch.Tensor._make_subclass = original
    return {"ordinary_ops": plain, "linearized_ops": ours, "constructions": made[0],
            "ratio": ours / plain, "ratio_with_constructions": (ours + made[0]) / plain}
