"""One OrthoReg forward + backward of the Triton backend per precision mode on the ViT-B-32
shapes (GPU only), for ncu: the delta, Gram and (tf32) gradient launches of
``fastortho/kernels/orthoreg.py``. What they compile to (registers, spills, shared memory,
wgmma and async copies) is ``bench/static_kernels.py``, which needs no GPU.

    python bench/diagnose_orthoreg.py
"""
import torch

from fastortho.ops.orthoreg import ortho_penalty
from fastortho.testing import random_layers, vit_weight_shapes


def main():
    weights, bases = random_layers(vit_weight_shapes("ViT-B-32"), device="cuda",
                                   generator=torch.Generator().manual_seed(0))
    weights = [w.requires_grad_(True) for w in weights]
    for precision in ("tf32", "bf16"):
        ortho_penalty(weights, bases, squared=True, precision=precision, backend="triton").sum().backward()
        torch.cuda.synchronize()
        print(f"{precision}: one forward + backward of {len(weights)} tensors", flush=True)


if __name__ == "__main__":
    main()
