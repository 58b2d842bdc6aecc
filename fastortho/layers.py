"""Which parameters a regularizer tunes, and the pretrained tensors they are measured from.

Selection only ever considers trainable parameters (``requires_grad=True``): the penalty is
about the layers being tuned. Modes:

- ``"trainable-2d"``: every trainable parameter with ``dim() == 2`` (the released OrthoReg
  rule; on an open_clip ViT that includes ``positional_embedding`` and ``proj``).
- ``"linear"``: weights of ``nn.Linear`` modules and the projection weights of
  ``nn.MultiheadAttention`` (the fused ``in_proj_weight`` or separate q/k/v weights, and
  ``out_proj.weight``).
- ``"attention"``: only attention projections (q, k, v, o): the projection weights of
  ``nn.MultiheadAttention`` and of any module whose class name ends in "Attention"
  (open_clip's ``Attention``, Hugging Face ``CLIPAttention`` / ``ViTAttention``, ...).
  A fused ``in_proj_weight`` counts as one tensor, as in the released code.
- a predicate ``(name, param) -> bool``, called for each trainable parameter.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping

from torch import Tensor, nn

LayerSpec = str | Callable[[str, Tensor], bool]
LAYER_MODES = ("trainable-2d", "linear", "attention")
_MHA_PROJECTIONS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def is_attention_module(module: nn.Module) -> bool:
    """nn.MultiheadAttention, or a class named like an attention layer (``...Attention``,
    ``...Attention2``): CLIPAttention, ViTSelfAttention, open_clip's Attention. Blocks that
    merely contain attention (``ResidualAttentionBlock``, ``AttentionalPooler``) are not."""
    if isinstance(module, nn.MultiheadAttention):
        return True
    return re.sub(r"\d+$", "", type(module).__name__).lower().endswith("attention")


def _projection_weight_names(model: nn.Module, attention_only: bool) -> set[str]:
    names: set[str] = set()

    def add(prefix: str, local: str) -> None:
        names.add(f"{prefix}.{local}" if prefix else local)

    def in_attention(path: str) -> bool:
        # True when `path` or one of its ancestors is an attention module.
        parts = path.split(".") if path else []
        return any(p in attention_paths for p in [".".join(parts[:k]) for k in range(len(parts) + 1)])

    attention_paths = {path for path, mod in model.named_modules() if is_attention_module(mod)}
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and mod.weight is not None:
            if not attention_only or in_attention(path):
                add(path, "weight")
        if isinstance(mod, nn.MultiheadAttention) or (attention_only and path in attention_paths):
            for local in _MHA_PROJECTIONS:
                p = getattr(mod, local, None)
                if isinstance(p, Tensor) and p.dim() == 2:
                    add(path, local)
    return names


def select_parameters(model: nn.Module, layers: LayerSpec = "trainable-2d") -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs a regularizer acts on, in ``named_parameters()`` order.

    Raises ``ValueError`` when the selection is empty or picks a tensor that is not 2-D.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if callable(layers):
        chosen = [(n, p) for n, p in trainable if layers(n, p)]
        bad = [(n, tuple(p.shape)) for n, p in chosen if p.dim() != 2]
        if bad:
            raise ValueError(f"layers: the predicate selected parameters that are not 2-D: {bad[:5]}"
                             f"{' ...' if len(bad) > 5 else ''}; OrthoReg needs matrices")
    elif layers == "trainable-2d":
        chosen = [(n, p) for n, p in trainable if p.dim() == 2]
    elif layers in ("linear", "attention"):
        names = _projection_weight_names(model, attention_only=(layers == "attention"))
        chosen = [(n, p) for n, p in trainable if n in names]
    else:
        raise ValueError(f"layers: expected one of {LAYER_MODES} or a callable (name, param) -> bool, "
                         f"got {layers!r}")
    if not chosen:
        n_frozen = sum(1 for _ in model.parameters()) - len(trainable)
        raise ValueError(
            f"layers={layers!r} selected no parameter of model ({len(trainable)} trainable, "
            f"{n_frozen} frozen): nothing to regularize")
    return chosen


def base_tensors(base: object, model: nn.Module | None = None) -> Mapping[str, Tensor]:
    """``name -> tensor`` view of a snapshot, a state_dict or a module (a Snapshot is a
    Mapping, so this module needs no import of it)."""
    if isinstance(base, nn.Module):
        if base is model:
            raise ValueError("base: got the model itself; pass the pretrained weights "
                             "(fastortho.snapshot(model) taken before fine-tuning, a state_dict or a module)")
        return dict(base.named_parameters())
    if isinstance(base, Mapping):
        return base
    raise TypeError(f"base: expected a fastortho snapshot, a state_dict (mapping name -> tensor) or an "
                    f"nn.Module, got {type(base).__name__}")


def paired_bases(selected: list[tuple[str, Tensor]], base: Mapping[str, Tensor]) -> list[Tensor]:
    """The base tensor of each selected parameter, detached, checked for key, type, shape,
    dtype class and device. Raises ValueError/TypeError naming ``base`` and the key."""
    missing = [n for n, _ in selected if n not in base]
    if missing:
        some = ", ".join(repr(n) for n in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        hint = ""
        keys = list(base.keys())
        if keys and any(k.endswith("." + missing[0]) for k in keys[:10000]):
            hint = (
                " (base keys carry a prefix the model's names do not; strip it, e.g. take the submodule's state_dict)"
            )
        raise ValueError(f"base is missing {len(missing)} key(s) the model regularizes: {some}{more}{hint}")
    out = []
    for n, p in selected:
        b = base[n]
        if not isinstance(b, Tensor):
            raise TypeError(f"base[{n!r}]: expected a tensor, got {type(b).__name__}")
        if tuple(b.shape) != tuple(p.shape):
            raise ValueError(f"base[{n!r}]: shape {tuple(b.shape)} does not match the model's {tuple(p.shape)}")
        if not b.is_floating_point():
            raise TypeError(f"base[{n!r}]: expected a floating-point tensor, got {b.dtype}")
        if b.device != p.device:
            raise ValueError(f"base[{n!r}] is on {b.device} but the model's parameter is on {p.device}; "
                             f"move one of them (e.g. base = base.to({str(p.device)!r}))")
        out.append(b.detach())
    return out
