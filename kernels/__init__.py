"""Triton kernels of fastortho, installed as ``fastortho.kernels`` (docs/design.md section 3).

- ``_common.py``   the device-side helpers every kernel shares (operand rounding, the
                   precision-dispatching product) and the lazily probed device description
- ``layout.py``    flat-buffer layouts shared with the fake (meta) kernels; no triton import
- ``orthoreg.py``  OrthoReg penalty: the delta pass writing ``X^T`` once into a scratch, the
                   pipelined upper-triangle Gram over it, and the "tf32" mode's gradient
- ``lora_orthoreg.py``  exact low-rank penalty of LoRA adapters and its gradients
- ``dual_linear.py``    fused primal + tangent linear layer (one and many tangents)
- ``attention_tangent.py``  one-pass attention with its tangent, and the tangent's backward
- ``resources.py`` what each kernel compiles to for sm_90a, without a GPU

Importing this package does not import triton; each kernel module does, on first use.
"""
if __package__ != "fastortho.kernels":
    # The repository root is on sys.path (python run from it) and something imported a
    # top-level "kernels" (transformers probes for Hugging Face's package of that name).
    raise ImportError("this 'kernels' is fastortho's kernel folder, installed as fastortho.kernels; it was found as a "
                      "top-level package because Python runs from the fastortho repository root. Run from another "
                      "directory (or use python -P / PYTHONSAFEPATH=1)")

from .._config import interpreting  # noqa: E402

__all__ = ["interpreting"]
