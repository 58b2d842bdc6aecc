"""Time the two OrthoReg Triton phases for a few kernel configurations on the ViT shape sets
(GPU only), checking each against the torch backend. Prints one line per (model, precision,
config); used to choose ``kernels.orthoreg.default_config``.

    python bench/sweep_orthoreg.py [--json OUT.json]
"""
import argparse
import json

import torch
import triton.testing

from fastortho.kernels import orthoreg as K
from fastortho.ops.orthoreg.torch_backend import gram_minus_identity, layer_groups, scaled_grads
from fastortho.testing import random_layers, vit_weight_shapes

CONFIGS = {
    "default": None,
    "p2": K.KernelConfig(128, 32, 128, 128, 32, num_warps=8, num_stages=3, programs_per_sm=2),
    "grad128x64": K.KernelConfig(128, 32, 128, 64, 32, num_warps=8, num_stages=3),
    "gram64-w4-p2": K.KernelConfig(64, 32, 128, 128, 32, num_warps=4, num_stages=3, programs_per_sm=2),
    # spill-free phase 1 at sm_90a since the 32-bit indices (bench/static_kernels.py)
    "gram-bk16": K.KernelConfig(128, 16, 128, 128, 32, num_warps=8, num_stages=3),
    "gram-bk16-s4": K.KernelConfig(128, 16, 128, 128, 32, num_warps=8, num_stages=4),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name in ("ViT-B-32", "ViT-L-14"):
        shapes = vit_weight_shapes(name)
        weights, bases = random_layers(shapes, device="cuda", generator=torch.Generator().manual_seed(0))
        coef = torch.full((len(shapes),), 4.0, device="cuda")
        for precision in ("tf32",):
            ref_sq, deltas, gmis = gram_minus_identity(weights, bases, "ieee", keep=True)
            ref_bufs = scaled_grads(deltas, gmis, [torch.full((d.shape[0],), 4.0, device="cuda") for d in deltas], "ieee")
            del deltas, gmis
            for label, cfg in CONFIGS.items():
                cfg = cfg or K.default_config(precision, weights[0].device)
                try:
                    sq, gmi = K.gram_penalty(weights, bases, precision, config=cfg)
                    flat = K.penalty_grad(weights, bases, gmi, coef, precision, config=cfg)
                    torch.cuda.synchronize()
                except Exception as e:  # a config that does not compile is reported, not fatal
                    print(f"{name} {precision} {label}: FAILED {type(e).__name__}: {str(e)[-600:]}", flush=True)
                    continue
                err_sq = float((sq - ref_sq).norm() / ref_sq.norm())
                plan = K.launch_plan(weights, bases, cfg)
                grads = K.layer_views(flat, shapes, plan.shape.out_offsets)
                # the torch backend groups by shape on CUDA: undo the grouping
                ref_grads = [None] * len(shapes)
                for buf, (_, idx) in zip(ref_bufs, layer_groups(weights)):
                    for j, i in enumerate(idx):
                        ref_grads[i] = buf[j]
                err_g = max(float((g.float() - r).norm() / r.norm()) for g, r in zip(grads, ref_grads))
                t1 = triton.testing.do_bench(lambda: K.gram_penalty(weights, bases, precision, config=cfg),
                                             warmup=25, rep=200, return_mode="median")
                t2 = triton.testing.do_bench(lambda: K.penalty_grad(weights, bases, gmi, coef, precision, config=cfg),
                                             warmup=25, rep=200, return_mode="median")
                row = dict(model=name, precision=precision, config=label, phase1_ms=t1, phase2_ms=t2,
                           total_ms=t1 + t2, err_value=err_sq, err_grad=err_g, aligned=plan.aligned)
                rows.append(row)
                print(f"{name} {precision:4s} {label:22s} p1 {t1:.3f} ms  p2 {t2:.3f} ms  total {t1 + t2:.3f} ms"
                      f"  err {err_sq:.1e}/{err_g:.1e} aligned={plan.aligned}", flush=True)
    if args.json:
        json.dump(rows, open(args.json, "w"), indent=1)


if __name__ == "__main__":
    main()
