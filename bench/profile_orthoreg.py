"""Where the time of one OrthoReg forward+backward goes (GPU only): torch.profiler's table
of device kernels for each backend on a ViT shape set.

    python bench/profile_orthoreg.py [ViT-B-32]
"""
import sys

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

import fastortho as fo
from fastortho.testing import random_layers, vit_weight_shapes


def main(name: str) -> None:
    weights, bases = random_layers(vit_weight_shapes(name), device="cuda",
                                   generator=torch.Generator().manual_seed(0))
    model = nn.ParameterList(nn.Parameter(w) for w in weights)
    base = {n: b for (n, _), b in zip(model.named_parameters(), bases)}
    for backend in ("torch", "triton"):
        reg = fo.OrthoReg(model, base, squared=False, precision="tf32", backend=backend, check_finite=False)

        def step(reg=reg):
            model.zero_grad(set_to_none=True)
            reg().backward()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        print(f"===== {name} backend={backend} (5 steps)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ViT-B-32")
