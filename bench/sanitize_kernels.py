"""One tiny launch of each kernel family, for ``compute-sanitizer`` (memcheck; racecheck for the
kernels that share memory across warps) in bench/gpu_check.py. Without a GPU the Triton
families run under the interpreter (the dry run) and the CUDA extension is skipped.

    compute-sanitizer --tool memcheck python bench/sanitize_kernels.py orthoreg
    python bench/sanitize_kernels.py all
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Families that keep tiles in shared memory across warps (racecheck applies).
SHARED_MEMORY_FAMILIES = ("orthoreg", "attention", "dual_linear")


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def orthoreg():
    """Every OrthoReg launch: the delta pass per format (tf32's twice, the fix-up rewriting on a
    first call), the Gram, and tf32's gradient kernel, fresh and accumulating."""
    from fastortho.kernels import orthoreg as S

    weights, bases = [randn(33, 17, seed=1), randn(17, 40, seed=2)], [randn(33, 17, seed=3), randn(17, 40, seed=4)]
    outs = []
    for precision in ("tf32", "bf16", "ieee"):
        x, used, stats = S.write_deltas(weights, bases, precision)
        sq, gmi = S.scratch_gram(weights, bases, x, used, stats, precision)
        outs += [x.float(), sq, gmi]
        if precision == "tf32":
            grads = S.scratch_grads(x, gmi, used, stats, torch.ones(2, device=DEVICE), ((33, 17), (17, 40)))
            outs.append(S.scratch_grads(x, gmi, used, stats, torch.ones(2, device=DEVICE), ((33, 17), (17, 40)),
                                        out=grads))
    return outs


def lora():
    from fastortho.kernels import lora_orthoreg as K

    As, Bs = [randn(4, 40, seed=1), randn(8, 17, seed=2)], [randn(33, 4, seed=3), randn(20, 8, seed=4)]
    values, small = K.lora_penalty(As, Bs, (0.5, 2.0), "tf32")
    return [values, K.lora_grad(As, Bs, (0.5, 2.0), small, torch.ones(2, device=DEVICE), "tf32")]


def dual_linear():
    from fastortho.kernels.dual_linear import dual_linear, dual_linear_multi

    x, dx, w, dw = randn(37, 45, seed=1), randn(37, 45, seed=2), randn(29, 45, seed=3), randn(29, 45, seed=4)
    y, dy = dual_linear(x, dx, w, dw, randn(29, seed=5), randn(29, seed=6))
    return [y, dy, dual_linear_multi(x, randn(3, 37, 45, seed=7), w, randn(3, 29, 45, seed=8))]


def attention():
    from fastortho.kernels.attention_tangent import attention_tangent_backward, attention_with_tangent

    q, k, v, dq, dk, dv = (randn(1, 2, 19, 16, seed=s) for s in range(6))
    o, do, lse = attention_with_tangent(q, k, v, dq, dk, dv, causal=True)
    return [o, do, *attention_tangent_backward(q, k, v, lse, randn(1, 2, 19, 16, seed=9), causal=True)]


def cuda_ext():
    from fastortho.ops import cuda_ext as ext

    if DEVICE != "cuda" or not ext.load():
        print(f"cuda_ext: skipped ({'no GPU' if DEVICE != 'cuda' else ext.error()})")
        return []
    w, b = [randn(33, 17, seed=1), randn(17, 40, seed=2)], [randn(33, 17, seed=3), randn(17, 40, seed=4)]
    outs = []
    for gram in ("gemm", "triangle", "syrk"):
        values, grads = torch.ops.fastortho.ortho_penalty_grouped(w, b, True, gram)
        outs += [values, *grads]
    return outs


FAMILIES = {"orthoreg": orthoreg, "lora": lora, "dual_linear": dual_linear, "attention": attention,
            "cuda_ext": cuda_ext}


def main(names) -> None:
    for name in (FAMILIES if names in ([], ["all"]) else names):
        outs = FAMILIES[name]()
        if not outs:
            continue
        if DEVICE == "cuda":
            torch.cuda.synchronize()
        bad = [i for i, t in enumerate(outs) if not torch.isfinite(t).all()]
        if bad:
            raise SystemExit(f"{name}: non-finite outputs {bad}")
        print(f"{name}: ok ({len(outs)} outputs)", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
