"""Per-op dual functions: each takes primal inputs and their tangents (``None`` = zero) and
returns ``(primal output, tangent output)`` (docs/design.md section 1, "linearized model").

The primal is computed without autograd: in a linearized model ``f(x; th0)`` does not depend
on the trained parameters. The tangent is computed with autograd, as ordinary differentiable
PyTorch ops that are linear in the tangents, so its backward keeps only primal activations
(never a second copy of the network's activations, as ``torch.func.jvp`` does). These
functions are the seams where fused kernels plug in.

Which file holds what (one job each):

- ``__init__.py``       the names the rest of fastortho imports (this package's API)
- ``policy.py``         how a dual op runs: ``fastortho.set_kernels`` resolved through the
                        registries ``DUAL_LINEAR`` / ``ATTENTION_TANGENT``, and the per-shape
                        measurement of "auto" on CUDA
- ``rules.py``          linear, conv2d, LayerNorm, BatchNorm, GELU, softmax, elementwise
- ``attention.py``      scaled dot-product attention and ``nn.MultiheadAttention`` (through
                        the linear and SDPA rules)
- ``values.py``         the ``Dual`` value, ``split`` / ``wrap``, argument binding, the
                        ``torch.func.jvp`` fallback
- ``triton_backend.py`` autograd Functions (with vmap rules) over the Triton kernels of
                        ``fastortho/kernels/dual_linear.py`` and ``attention_tangent.py``

The ``Dual`` tensor that routes a module's forward through these rules is
``fastortho/dual.py``. Reference: ``torch.func.jvp`` (``fastortho/reference.py``
``jvp_linearized``); tests ``tests/test_linearize.py`` and ``tests/test_dual_kernels.py``;
benchmarks ``bench/test_bench_linearize.py``, ``bench/test_bench_dual_kernels.py``.
"""
from __future__ import annotations

from .attention import (
    AttentionTangent,
    additive_mask,
    attention_runs_triton,
    attention_tangent,
    dual_multi_head_attention,
    dual_sdpa,
)
from .policy import ATTENTION_TANGENT, DUAL_LINEAR, MEASURED_KERNELS, kernel_choice, measured_triton
from .rules import (
    GeluTangent,
    LayerNormTangent,
    add_terms,
    dual_batch_norm,
    dual_conv2d,
    dual_gelu,
    dual_layer_norm,
    dual_linear,
    dual_pointwise,
    dual_softmax,
    linear_runs_triton,
)

__all__ = [
    "ATTENTION_TANGENT",
    "AttentionTangent",
    "DUAL_LINEAR",
    "GeluTangent",
    "LayerNormTangent",
    "MEASURED_KERNELS",
    "add_terms",
    "additive_mask",
    "attention_runs_triton",
    "attention_tangent",
    "dual_batch_norm",
    "dual_conv2d",
    "dual_gelu",
    "dual_layer_norm",
    "dual_linear",
    "dual_multi_head_attention",
    "dual_pointwise",
    "dual_sdpa",
    "dual_softmax",
    "kernel_choice",
    "linear_runs_triton",
    "measured_triton",
]
