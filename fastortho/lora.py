"""LoRA on attention (and MLP) projections, attention-only fine-tuning, and reading LoRA
adapters (fastortho's own and Hugging Face PEFT's) as dense task-vector updates.

Projections are named by the letters of the OrthoReg paper's Table 6: ``q k v o`` (attention
query, key, value, output) and ``f p`` (the MLP's first and second linear layer); target
strings are any subset, e.g. ``"qkvofp"``, ``"qkvo"``, ``"qkv"``, ``"qv"``, ``"fp"`` (the
paper's dashes, as in ``"q-v-"``, are ignored).

Adapters are ``torch.nn.utils.parametrize`` parametrizations of the weight they adapt:
``W = W0 + s B A`` per adapted row block. That works where a module reads its weight tensor
directly instead of calling a submodule, as ``nn.MultiheadAttention`` does with its fused
``in_proj_weight`` and ``out_proj.weight``, so open_clip ViTs need no patching. By default
q, k and v get one adapter each even inside a fused ``in_proj_weight`` (each regularized on
its own ``s B A``); ``fused_qkv=True`` puts one adapter on the whole fused weight, as the
released OrthoReg code does.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .layers import is_attention_module

TARGET_LETTERS = "qkvofp"
_IGNORED = "-\u2013\u2014 _"
# Linear submodules of an attention module, by their path relative to it.
_ATTENTION_LINEARS = {
    "q": ("q_proj", "query", "q", "to_q", "wq", "q_lin"),
    "k": ("k_proj", "key", "k", "to_k", "wk", "k_lin"),
    "v": ("v_proj", "value", "v", "to_v", "wv", "v_lin"),
    "o": ("out_proj", "o_proj", "out", "to_out", "to_out.0", "wo", "proj", "output.dense", "out_lin"),
}
# A fused (3E x E) q/k/v Linear inside an attention module (timm's ``qkv``).
_FUSED_QKV_LINEARS = ("qkv", "in_proj", "qkv_proj", "Wqkv")
_MLP_LINEARS = {
    "f": ("c_fc", "fc1", "fc", "up_proj", "w1", "lin1", "dense_h_to_4h"),
    "p": ("c_proj", "fc2", "proj", "down_proj", "w2", "lin2", "dense_4h_to_h"),
}


def parse_targets(targets: str) -> str:
    """The projection letters of a Table-6 target string, in ``qkvofp`` order."""
    if not isinstance(targets, str):
        raise TypeError(f"targets: expected a string of letters from {TARGET_LETTERS!r}, got {type(targets).__name__}")
    letters = [c for c in targets if c not in _IGNORED]
    bad = sorted({c for c in letters if c not in TARGET_LETTERS})
    if bad or not letters or len(set(letters)) != len(letters):
        raise ValueError(f"targets: expected distinct letters from {TARGET_LETTERS!r} (q k v o attention "
                         f"projections, f p MLP layers), e.g. 'qkvo' or 'qv', got {targets!r}")
    return "".join(c for c in TARGET_LETTERS if c in letters)


@dataclass(frozen=True)
class Slot:
    """One projection: the ``tensor_name`` weight of ``module`` (at ``path``), rows
    ``rows`` of it (None: all rows; a row block of a fused q/k/v weight otherwise)."""
    letter: str
    path: str
    module: nn.Module = field(compare=False, hash=False, repr=False)
    tensor_name: str
    rows: tuple[int, int] | None

    @property
    def weight_name(self) -> str:
        return f"{self.path}.{self.tensor_name}" if self.path else self.tensor_name


def _child(module: nn.Module, rel: str) -> nn.Module | None:
    try:
        return module.get_submodule(rel)
    except AttributeError:
        return None


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _is_mlp(path: str, module: nn.Module) -> bool:
    return path.rsplit(".", 1)[-1].lower() in ("mlp", "ffn", "feed_forward") or "mlp" in type(module).__name__.lower()


def projection_slots(model: nn.Module, letters: str) -> list[Slot]:
    """Every projection of ``model`` named by ``letters``, in module order, each once."""
    found: dict[tuple[str, str, tuple[int, int] | None], Slot] = {}

    def add(letter, path, module, tensor_name, rows=None):
        if letter in letters:
            found.setdefault((path, tensor_name, rows), Slot(letter, path, module, tensor_name, rows))

    for path, mod in model.named_modules():
        if is_attention_module(mod):
            w = getattr(mod, "in_proj_weight", None)
            if isinstance(w, Tensor) and w.dim() == 2 and w.shape[0] == 3 * w.shape[1]:
                e = w.shape[1]
                for j, letter in enumerate("qkv"):
                    add(letter, path, mod, "in_proj_weight", (j * e, (j + 1) * e))
            elif isinstance(mod, nn.MultiheadAttention):
                for letter in "qkv":
                    if isinstance(getattr(mod, f"{letter}_proj_weight", None), Tensor):
                        add(letter, path, mod, f"{letter}_proj_weight")
            for rel in _FUSED_QKV_LINEARS:
                lin = _child(mod, rel)
                if isinstance(lin, nn.Linear) and lin.out_features == 3 * lin.in_features:
                    e = lin.in_features
                    for j, letter in enumerate("qkv"):
                        add(letter, _join(path, rel), lin, "weight", (j * e, (j + 1) * e))
            _add_named_linears(mod, path, _ATTENTION_LINEARS, add)
        elif _is_mlp(path, mod):
            _add_named_linears(mod, path, _MLP_LINEARS, add)
    return list(found.values())


def _add_named_linears(mod: nn.Module, path: str, table: dict[str, tuple[str, ...]], add) -> None:
    """For each letter, the first of its candidate child names that is an nn.Linear."""
    for letter, rels in table.items():
        for rel in rels:
            lin = _child(mod, rel)
            if isinstance(lin, nn.Linear):
                add(letter, _join(path, rel), lin, "weight")
                break


# ----------------------------------------------------------------------------- reports

@dataclass
class TrainableReport:
    """What a fine-tuning set-up leaves trainable."""
    names: list[str]
    trainable: int
    total: int

    @property
    def fraction(self) -> float:
        return self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        head = (f"{len(self.names)} trainable tensors, {self.trainable:,} of {self.total:,} parameters "
                f"({100 * self.fraction:.2f}%)")
        shown = "\n".join(f"  {n}" for n in self.names[:8])
        more = f"\n  ... and {len(self.names) - 8} more" if len(self.names) > 8 else ""
        return f"{head}\n{shown}{more}"


def trainable_report(model: nn.Module) -> TrainableReport:
    params = list(model.named_parameters())
    names = [n for n, p in params if p.requires_grad]
    return TrainableReport(names, sum(p.numel() for _, p in params if p.requires_grad),
                           sum(p.numel() for _, p in params))


def attention_only(model: nn.Module) -> tuple[nn.Module, TrainableReport]:
    """Freeze everything except the attention projection weights (q, k, v, o; biases stay
    frozen), in place. ``nn.MultiheadAttention`` keeps q, k and v in one ``in_proj_weight``,
    which becomes trainable as a whole. Returns the model and a :class:`TrainableReport`."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    slots = projection_slots(model, "qkvo")
    if not slots:
        raise ValueError("model: found no attention projection (nn.MultiheadAttention, or q/k/v/o "
                         "nn.Linear layers inside a module whose class name ends in 'Attention')")
    model.requires_grad_(False)
    for s in slots:
        getattr(s.module, s.tensor_name).requires_grad_(True)
    return model, trainable_report(model)


# ----------------------------------------------------------------------------- adapters

class LoRAParametrization(nn.Module):
    """``W0 -> W0 + s B_j A_j`` on row blocks ``j`` of a weight (one block: all rows).

    ``lora_A[j]`` is ``r x in`` (Kaiming-uniform init), ``lora_B[j]`` is ``rows_j x r`` (zero
    init, so the model is unchanged until trained), ``scaling = alpha / rank``.
    """

    def __init__(self, weight: Tensor, blocks: dict[str, tuple[int, int] | None], rank: int, alpha: float):
        super().__init__()
        out, inn = weight.shape
        self.rank, self.alpha, self.scaling = rank, float(alpha), float(alpha) / rank
        self.blocks = {name: (rows if rows is not None else (0, out)) for name, rows in blocks.items()}
        kw = dict(dtype=weight.dtype, device=weight.device)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (r0, r1) in self.blocks.items():
            a = torch.empty(rank, inn, **kw)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as in LoRA and PEFT
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(r1 - r0, rank, **kw))
        self._full = len(self.blocks) == 1 and next(iter(self.blocks.values())) == (0, out)
        self._order = sorted(self.blocks.items(), key=lambda kv: kv[1][0])

    def block_delta(self, name: str) -> Tensor:
        return self.scaling * (self.lora_B[name] @ self.lora_A[name])

    def forward(self, w0: Tensor) -> Tensor:
        if self._full:
            name = self._order[0][0]
            return w0 + self.block_delta(name).to(w0.dtype)
        pieces, pos = [], 0
        for name, (r0, r1) in self._order:
            if r0 > pos:
                pieces.append(w0[pos:r0])
            pieces.append(w0[r0:r1] + self.block_delta(name).to(w0.dtype))
            pos = r1
        if pos < w0.shape[0]:
            pieces.append(w0[pos:])
        return torch.cat(pieces)

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}, rank={self.rank}, alpha={self.alpha}"


def add_lora(model: nn.Module, targets: str = "qkvo", rank: int = 16, alpha: float = 16.0, *,
             fused_qkv: bool = False) -> nn.Module:
    """Add LoRA adapters to the projections named by ``targets``, in place; every original
    parameter is frozen and only the adapters train. The model's outputs are unchanged at
    initialization (``B = 0``). Returns the model.

    Args:
        targets: letters of ``qkvofp`` (see the module docstring), e.g. ``"qkvo"`` (LoRA-ATT).
        rank, alpha: the adapter rank ``r`` and ``alpha``; the scale is ``s = alpha / r``.
        fused_qkv: one adapter on a fused q/k/v weight (``in_proj_weight``) instead of three;
            needs q, k and v all in ``targets``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    letters = parse_targets(targets)
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank: expected a positive int, got {rank!r}")
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha: expected a positive number, got {alpha!r}")
    if fused_qkv and not set("qkv") <= set(letters):
        raise ValueError(f"fused_qkv=True puts one adapter on the fused q/k/v weight: targets must "
                         f"contain q, k and v, got {targets!r}")
    if lora_adapters(model):
        raise ValueError("model: already has LoRA adapters; merge them first (fastortho.merge_lora)")
    slots = projection_slots(model, letters)
    if not slots:
        raise ValueError(f"targets={targets!r} matched no projection of model (looked for "
                         f"nn.MultiheadAttention, q/k/v/o nn.Linear layers in attention modules, and "
                         f"fc/proj nn.Linear layers in MLP modules)")
    per_tensor: dict[tuple[int, str], list[Slot]] = {}
    for s in slots:
        per_tensor.setdefault((id(s.module), s.tensor_name), []).append(s)
    model.requires_grad_(False)
    for group in per_tensor.values():
        module, tensor_name = group[0].module, group[0].tensor_name
        weight = getattr(module, tensor_name)
        if rank > min(weight.shape):
            raise ValueError(f"rank: {rank} exceeds min(out, in) = {min(weight.shape)} of "
                             f"{group[0].weight_name} {tuple(weight.shape)}")
        if fused_qkv and len(group) == 3 and all(s.rows is not None for s in group):
            blocks = {"qkv": None}
        else:
            blocks = {s.letter: s.rows for s in group}
        parametrize.register_parametrization(module, tensor_name, LoRAParametrization(weight, blocks, rank, alpha))
    return model


@dataclass(frozen=True)
class LoRAAdapter:
    """One adapter as fastortho reads it: ``D = scale * B @ A`` updates rows ``rows`` of the
    weight ``weight_name`` (shape ``weight_shape``); ``transposed`` for PEFT's fan-in-fan-out
    layers, whose update is ``D^T``."""
    weight_name: str
    name: str
    A: Tensor
    B: Tensor
    scale: float
    rows: tuple[int, int] | None
    weight_shape: tuple[int, int]
    transposed: bool = False


@functools.cache
def peft_mha_out_proj_factor() -> float:
    """How many times PEFT applies the out_proj adapter of a LoRA-wrapped
    nn.MultiheadAttention, measured once on a 4-wide MHA (microseconds). PEFT's MHA layer
    merges the out_proj update itself and then calls the inner LoRA Linear's merge, which adds
    it again; its forward runs through that merge, so the model computes ``W0 + 2 s B A``
    (peft 0.21). Measured rather than assumed, so that a PEFT that stops doing so is followed."""
    import copy

    from peft import LoraConfig, get_peft_model

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(4, 1)

    torch.manual_seed(0)
    model = get_peft_model(Holder(), LoraConfig(r=1, lora_alpha=1, target_modules=["mha"], init_lora_weights=False))
    inner = model.base_model.model.mha.base_layer.out_proj
    w0 = inner.base_layer.weight.detach().clone()
    delta = inner.scaling["default"] * (inner.lora_B["default"].weight @ inner.lora_A["default"].weight).detach()
    merged = copy.deepcopy(model).merge_and_unload().mha.out_proj.weight.detach() - w0
    return float(torch.round((merged * delta).sum() / (delta * delta).sum()))


def _peft_adapters(path: str, mod: nn.Module, scale_factor: float = 1.0) -> list[LoRAAdapter]:
    lora_a, lora_b, scaling = mod.lora_A, mod.lora_B, mod.scaling
    active = getattr(mod, "active_adapters", None)
    keys = [k for k in (active if isinstance(active, (list, tuple)) else lora_a.keys()) if k in lora_a]
    dora = [k for k in keys if bool(getattr(mod, "use_dora", {}).get(k, False))]
    if dora:
        raise NotImplementedError(f"model: PEFT adapter {path}[{dora[0]!r}] is DoRA (use_dora=True): its update is "
                                  f"m * (W0 + s B A) / ||W0 + s B A|| per column, not s B A, and fastortho reads only "
                                  f"plain LoRA; train with use_dora=False or merge with PEFT's merge_and_unload()")
    base = getattr(mod, "base_layer", None)
    # PEFT wraps nn.MultiheadAttention: its adapter acts on the fused in_proj_weight (the
    # out_proj inside gets its own LoRA Linear, found as a module of its own)
    attr = "in_proj_weight" if isinstance(base, nn.MultiheadAttention) else "weight"
    base_w = getattr(base, attr, None) if base is not None else getattr(mod, "weight", None)
    # the model's own names: without PEFT's wrapper prefix and the base_layer levels it inserts
    own = ".".join(part for part in path.removeprefix("base_model.model").lstrip(".").split(".")
                   if part and part != "base_layer")
    weight_name = _join(own, attr)
    out = []
    for key in keys:
        a, b = getattr(lora_a[key], "weight", None), getattr(lora_b[key], "weight", None)
        if not (isinstance(a, Tensor) and isinstance(b, Tensor) and a.dim() == 2 and b.dim() == 2):
            raise ValueError(f"model: PEFT adapter {path}.lora_A[{key!r}] is not a linear (2-D) adapter; "
                             f"only LoRA on nn.Linear layers is supported")
        shape = tuple(base_w.shape) if isinstance(base_w, Tensor) else (b.shape[0], a.shape[1])
        out.append(LoRAAdapter(weight_name, f"{path}[{key}]", a, b, scale_factor * float(scaling[key]), None, shape,
                               bool(getattr(mod, "fan_in_fan_out", False))))
    return out


def lora_adapters(model: nn.Module) -> list[LoRAAdapter]:
    """Every LoRA adapter of ``model``: fastortho's (:func:`add_lora`) and Hugging Face PEFT's
    (modules with ``lora_A`` / ``lora_B`` ModuleDicts and a ``scaling`` dict), in module order."""
    found = []
    mha_out_projs: set[int] = set()  # the out_proj LoRA layers inside PEFT's MultiheadAttention wrappers
    for path, mod in model.named_modules():
        if parametrize.is_parametrized(mod):
            for tensor_name, plist in mod.parametrizations.items():
                for p in plist:
                    if isinstance(p, LoRAParametrization):
                        shape = tuple(plist.original.shape)
                        for name, rows in p.blocks.items():
                            full = rows == (0, shape[0])
                            found.append(LoRAAdapter(_join(path, tensor_name), f"{_join(path, tensor_name)}[{name}]",
                                                     p.lora_A[name], p.lora_B[name], p.scaling,
                                                     None if full else rows, shape))
        elif (isinstance(getattr(mod, "lora_A", None), nn.ModuleDict)
              and isinstance(getattr(mod, "lora_B", None), nn.ModuleDict)
              and isinstance(getattr(mod, "scaling", None), dict)):
            base = getattr(mod, "base_layer", None)
            if isinstance(base, nn.MultiheadAttention):
                mha_out_projs.add(id(base.out_proj))
            factor = peft_mha_out_proj_factor() if id(mod) in mha_out_projs else 1.0
            found += _peft_adapters(path, mod, factor)
    return found


@torch.no_grad()
def lora_delta_weights(model: nn.Module) -> dict[str, Tensor]:
    """The dense update ``{original weight name: s B A}`` of every adapted weight (row blocks
    of a fused q/k/v weight assembled into the full weight's shape, zero where no adapter
    acts), detached, in the adapters' dtype: a LoRA run as an ordinary task vector."""
    adapters = lora_adapters(model)
    if not adapters:
        raise ValueError("model: has no LoRA adapters (fastortho.add_lora or Hugging Face PEFT)")
    deltas: dict[str, Tensor] = {}
    for ad in adapters:
        d = ad.scale * (ad.B @ ad.A)
        if ad.transposed:
            d = d.T
        total = deltas.get(ad.weight_name)
        if total is None:
            total = deltas[ad.weight_name] = d.new_zeros(ad.weight_shape)
        if ad.rows is None:
            total += d
        else:
            total[ad.rows[0]:ad.rows[1]] += d
    return deltas


def _own_parametrized_class(module: nn.Module) -> None:
    """Give ``module`` a class of its own before a parametrization is removed. parametrize
    keeps each tensor's property on a per-module class that ``copy.deepcopy`` shares between
    the original and the copy; removing it from one would delete the property from both
    (merging a copy would break the original)."""
    cls = type(module)
    body = {k: v for k, v in cls.__dict__.items() if k not in ("__dict__", "__weakref__")}
    module.__class__ = type(cls.__name__, cls.__bases__, body)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every fastortho adapter into its weight (``W0 + s B A``), in place, and remove the
    adapters: parameter names are the original ones again. Returns the model."""
    merged = 0
    for path, mod in list(model.named_modules()):
        if not parametrize.is_parametrized(mod):
            continue
        for tensor_name in list(mod.parametrizations.keys()):
            plist = mod.parametrizations[tensor_name]
            if not any(isinstance(p, LoRAParametrization) for p in plist):
                continue
            if not all(isinstance(p, LoRAParametrization) for p in plist):
                raise ValueError(f"model: {_join(path, tensor_name)} has other parametrizations besides "
                                 f"LoRA; remove them before merging")
            _own_parametrized_class(mod)
            parametrize.remove_parametrizations(mod, tensor_name, leave_parametrized=True)
            merged += 1
    if not merged:
        if lora_adapters(model):
            raise TypeError("model: its adapters are Hugging Face PEFT's; merge them with PEFT's "
                            "merge_and_unload() (fastortho.lora_delta_weights reads them as deltas)")
        raise ValueError("model: has no fastortho LoRA adapters to merge")
    return model
