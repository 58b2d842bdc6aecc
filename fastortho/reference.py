"""Plain PyTorch reference semantics for fastortho. Obviously correct, float64-capable, slow.

Every fast path in the package is tested and benchmarked against the functions here:

- the OrthoReg penalty as the paper writes it (Eq. 8, squared Frobenius norm of the Gram
  minus the identity, summed over the tuned layers), and
- the penalty as the released OrthoReg code computes it (Frobenius norm *not* squared, Gram
  of the smaller side, every trainable parameter with ``dim() == 2``).

Nothing here is optimized; clarity wins over speed.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

__all__ = [
    "gram",
    "jvp_linearized",
    "layer_penalty",
    "layer_penalty_grad",
    "lora_delta",
    "lora_layer_penalty",
    "lora_layer_penalty_grads",
    "ortho_penalty",
    "ortho_penalty_of_deltas",
    "released_lora_ortho_loss",
    "released_ortho_loss",
    "released_taujp_penalty",
    "taujp_naive",
]


def gram(delta: Tensor, side: str = "smaller") -> Tensor:
    """Gram matrix of a 2-D update ``delta`` (PyTorch layout, out x in).

    side="smaller": ``D^T D`` when out >= in, else ``D D^T`` (what the released code does);
    side="columns": always ``D^T D`` (the literal form of the paper's Eq. 8).
    """
    if delta.dim() != 2:
        raise ValueError(f"delta: expected a 2-D tensor, got shape {tuple(delta.shape)}")
    if side == "columns":
        return delta.T @ delta
    if side != "smaller":
        raise ValueError(f"side: expected 'smaller' or 'columns', got {side!r}")
    rows, cols = delta.shape
    return delta.T @ delta if rows >= cols else delta @ delta.T


def layer_penalty(delta: Tensor, squared: bool = True, side: str = "smaller") -> Tensor:
    """``||G - I||_F^2`` (squared=True, the paper) or ``||G - I||_F`` (the released code)."""
    g = gram(delta, side)
    eye = torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    sq = ((g - eye) ** 2).sum()
    return sq if squared else sq.sqrt()


def layer_penalty_grad(delta: Tensor, squared: bool = True) -> Tensor:
    """Closed-form gradient of :func:`layer_penalty` (smaller-side Gram) w.r.t. ``delta``.

    ``4 D (G - I)`` for tall/square D, ``4 (G - I) D`` for wide D; divided by
    ``2 ||G - I||_F`` for the not-squared form. Used to check autograd and the fast paths.
    """
    rows, cols = delta.shape
    g = gram(delta, "smaller")
    g_minus_i = g - torch.eye(g.shape[0], dtype=g.dtype, device=g.device)
    grad = 4 * (delta @ g_minus_i if rows >= cols else g_minus_i @ delta)
    if not squared:
        grad = grad / (2 * torch.linalg.matrix_norm(g_minus_i))
    return grad


def ortho_penalty_of_deltas(deltas: Iterable[Tensor], squared: bool = True,
                            side: str = "smaller") -> Tensor:
    """Sum of :func:`layer_penalty` over a list of updates."""
    terms = [layer_penalty(d, squared, side) for d in deltas]
    if not terms:
        raise ValueError("deltas: expected at least one 2-D tensor")
    return torch.stack(terms).sum()


def ortho_penalty(model: nn.Module, base: Mapping[str, Tensor], squared: bool = True,
                  select: Callable[[str, Tensor], bool] | None = None,
                  dtype: torch.dtype | None = torch.float64, side: str = "smaller") -> Tensor:
    """The OrthoReg penalty of ``model`` against pretrained weights ``base`` (name -> tensor).

    ``select(name, param)`` picks the layers; by default the released-code rule (trainable and
    2-D). The computation runs in ``dtype`` (float64 by default; ``None`` keeps the model's
    dtype) and is differentiable through plain autograd.
    """
    if select is None:
        def select(name: str, p: Tensor) -> bool:
            return p.requires_grad and p.dim() == 2
    deltas = []
    for name, p in model.named_parameters():
        if not select(name, p):
            continue
        w, w0 = (p, base[name]) if dtype is None else (p.to(dtype), base[name].to(dtype))
        deltas.append(w - w0.to(w.device))
    return ortho_penalty_of_deltas(deltas, squared, side)


def released_ortho_loss(model: nn.Module, base: Mapping[str, Tensor]) -> Tensor:
    """The penalty exactly as the released OrthoReg code computes it, in the model's dtype:
    a Python loop over every trainable 2-D parameter, the Gram of the smaller side, an
    explicit identity, and the Frobenius norm not squared. This is the speed baseline."""
    loss = 0.0
    for name, p in model.named_parameters():
        if p.requires_grad and p.dim() == 2:
            loss = loss + _released_term(p - base[name])
    return loss


def _released_term(d: Tensor) -> Tensor:
    """One layer of the released code: Gram of the smaller side, an explicit identity, the
    Frobenius norm not squared."""
    rows, cols = d.shape
    if rows < cols:
        g = d @ d.T
        eye = torch.eye(rows, device=d.device)
    else:
        g = d.T @ d
        eye = torch.eye(cols, device=d.device)
    return torch.norm(g - eye, p="fro")


def lora_delta(a: Tensor, b: Tensor, scale: float) -> Tensor:
    """The dense update ``s B A`` of a LoRA adapter (``B: out x r``, ``A: r x in``)."""
    if a.dim() != 2 or b.dim() != 2 or b.shape[1] != a.shape[0]:
        raise ValueError(f"a, b: expected A of shape r x in and B of shape out x r, got "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    return scale * (b @ a)


def lora_layer_penalty(a: Tensor, b: Tensor, scale: float, squared: bool = True) -> Tensor:
    """OrthoReg of a LoRA adapter by the dense definition: ``D = s B A`` materialized, then
    :func:`layer_penalty` (Gram of the smaller side)."""
    return layer_penalty(lora_delta(a, b, scale), squared)


def lora_layer_penalty_grads(a: Tensor, b: Tensor, scale: float, squared: bool = True) -> tuple[Tensor, Tensor]:
    """Gradients of :func:`lora_layer_penalty` w.r.t. ``A`` and ``B`` by the chain rule
    through the dense ``D``: ``dA = s B^T dD``, ``dB = s dD A^T``."""
    grad_d = layer_penalty_grad(lora_delta(a, b, scale), squared)
    return scale * (b.T @ grad_d), scale * (grad_d @ a.T)


def released_lora_ortho_loss(adapters: Iterable[tuple[Tensor, Tensor, float]]) -> Tensor:
    """The released LoRA OrthoReg: per adapter ``(A, B, s)`` the dense ``D = s B A`` is
    materialized and its Gram of the smaller side taken, Frobenius norm not squared, in the
    adapters' dtype. The speed baseline of the exact low-rank penalty."""
    loss = 0.0
    for a, b, s in adapters:
        loss = loss + _released_term(s * (b @ a))
    return loss


# ----------------------------------------------------------------------------- linearized models

@contextlib.contextmanager
def forward_ad_attention() -> Iterator[None]:
    """What the released TTA / tau-Jp code needs to run ``torch.func.jvp`` through attention on
    current PyTorch: the MATH SDPA backend and no nn.MultiheadAttention fast path."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    old = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(old)


def jvp_linearized(model: nn.Module, params0: Mapping[str, Tensor], tau: Mapping[str, Tensor],
                   *args) -> tuple[Tensor, Tensor]:
    """``(f(x; th0), J(x) tau)`` by ``torch.func.jvp`` over ``functional_call``, as the released
    TTA code computes a linearized model (parameters not in ``tau`` keep the model's values)."""
    names = list(tau)

    def f(*ps):
        return torch.func.functional_call(model, dict(zip(names, ps)), args)

    with forward_ad_attention():
        return torch.func.jvp(f, tuple(params0[n] for n in names), tuple(tau[n] for n in names))


def taujp_naive(model: nn.Module, params0: Mapping[str, Tensor], tau: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """Per-sample ``||J(x_i) tau||^2`` (tau-Jp paper Eq. 9-10), by the definition."""
    _, tangent = jvp_linearized(model, params0, tau, x)
    return tangent.flatten(1).square().sum(1)


def released_taujp_penalty(model: nn.Module, params0: Mapping[str, Tensor], tau: Mapping[str, Tensor],
                           batches: Iterable[Tensor]) -> Tensor:
    """The released tau-Jp code's strict penalty (``finetune_reg_strict.py``): one
    ``torch.func.jvp`` call per other task, each the mean over samples of the per-sample L2 norm
    (not squared), and the MEAN of those over the tasks (``torch.stack(penalties).mean()``)."""
    penalties = []
    for x in batches:
        _, tangent = jvp_linearized(model, params0, tau, x)
        penalties.append(tangent.flatten(1).norm(dim=1).mean())
    return torch.stack(penalties).mean()
