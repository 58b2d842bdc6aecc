"""Compile report of the OrthoReg Triton kernels on the ViT-B-32 shapes (GPU only): registers,
spills, shared memory, and which matrix instructions and copies the PTX uses.

    python bench/diagnose_orthoreg.py            # report
    python bench/diagnose_orthoreg.py --once     # one launch of each phase (for ncu)
"""
import re
import sys

import torch

from fastortho.kernels import orthoreg as K
from fastortho.testing import random_layers, vit_weight_shapes


def main():
    weights, bases = random_layers(vit_weight_shapes("ViT-B-32"), device="cuda",
                                   generator=torch.Generator().manual_seed(0))
    coef = torch.full((len(weights),), 4.0, device="cuda")
    for precision in ("tf32", "bf16"):
        _, gmi = K.gram_penalty(weights, bases, precision)
        K.penalty_grad(weights, bases, gmi, coef, precision)
        torch.cuda.synchronize()
        if "--once" in sys.argv:
            return
        for phase, kernel in K.last_launch.items():
            ptx = kernel.asm["ptx"]
            counts = {name: len(re.findall(pat, ptx)) for name, pat in (
                ("wgmma", r"wgmma\.mma_async"), ("mma.sync", r"mma\.sync"), ("cp.async", r"cp\.async\.(?:ca|cg)"),
                ("cp.async.bulk", r"cp\.async\.bulk"), ("ld.global.v4", r"ld\.global[^;]*\.v4"),
                ("ld.global", r"ld\.global"), ("ld.shared", r"ld\.shared"), ("st.shared", r"st\.shared"),
                ("ldmatrix", r"ldmatrix"))}
            print(f"{precision:4s} {phase:4s} regs={kernel.n_regs} spills={kernel.n_spills} "
                  f"shared={kernel.metadata.shared} {counts}", flush=True)


if __name__ == "__main__":
    main()
