"""What the OrthoReg Triton kernels compile to on a GPU target, without a GPU: both phases
are compiled for sm_90a (H100 / H200) by the installed triton, ``ptxas -v`` reports registers
and spills, and the TTGIR tells whether the loads are pipelined (async copies into shared
memory) and whether the tensor-core products are waited on in the same iteration
(``warp_group_dot_wait`` with ``pendings = 0``: the loop does not overlap its MMAs).

It predicts nothing about time; it is how a register or layout change is checked on a
machine with no GPU before the GPU sweep (``bench/sweep_orthoreg.py``) times it.

    python bench/static_orthoreg.py [--precision tf32] [--arch 90] [--json OUT.json]
"""
import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastortho.kernels import orthoreg as K
from sweep_orthoreg import CONFIGS as SWEEP_CONFIGS

# the configurations the GPU sweep times (programs_per_sm does not change the compiled code)
CONFIGS = {name: cfg or K.KernelConfig() for name, cfg in SWEEP_CONFIGS.items()}

_COMMON = {"w_base": "*fp32", "w0_base": "*fp32", "layer_table": "*i64", "tile_table": "*i32", "num_tiles": "i32"}


def ptxas() -> str:
    """The ptxas triton itself uses (its wheel ships one), or TRITON_PTXAS_PATH."""
    if os.environ.get("TRITON_PTXAS_PATH"):
        return os.environ["TRITON_PTXAS_PATH"]
    found = sorted(Path(triton.__file__).parent.glob("backends/nvidia/bin/ptxas*"))
    if not found:
        raise SystemExit("no ptxas found in the triton package; set TRITON_PTXAS_PATH")
    return str(found[0])


def _signature(phase: str) -> tuple[dict, list[str]]:
    if phase == "gram":
        sig = dict(_COMMON, gmi_ptr="*fp32", partial_ptr="*fp32")
        return sig, ["NF", "BT", "BK", "PRECISION", "EMULATE_BF16", "ALIGNED"]
    sig = dict(_COMMON, gmi_ptr="*fp32", coef_ptr="*fp32", out_ptr="*fp32")
    return sig, ["NF", "BM", "BN", "BK", "PRECISION", "EMULATE_BF16", "ALIGNED"]


def inspect(phase: str, cfg: K.KernelConfig, precision: str, arch: int) -> dict:
    sig, const_names = _signature(phase)
    consts = {"NF": K.LAYER_FIELDS, "PRECISION": precision, "EMULATE_BF16": False, "ALIGNED": True}
    if phase == "gram":
        consts.update(BT=cfg.gram_block, BK=cfg.gram_k)
        fn = K.gram_penalty_kernel
    else:
        consts.update(BM=cfg.grad_m, BN=cfg.grad_n, BK=cfg.grad_k)
        fn = K.penalty_grad_kernel
    sig.update({n: "constexpr" for n in const_names})
    # What a launch specializes on: every pointer 16-byte aligned (PyTorch's allocations are).
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(sig.values()) if t.startswith("*")}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
    ttgir = compiled.asm["ttgir"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        out = subprocess.run([ptxas(), f"-arch=sm_{arch}a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True, check=True).stderr

    def number(pattern):
        m = re.search(pattern, out)
        return int(m.group(1)) if m else None
    pendings = re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", ttgir)
    return {
        "phase": phase, "registers": number(r"Used (\d+) registers"),
        "spill_store_bytes": number(r"(\d+) bytes spill stores"), "spill_load_bytes": number(r"(\d+) bytes spill loads"),
        "shared_bytes": compiled.metadata.shared,
        "async_copies": len(re.findall(r"async_copy_global_to_local", ttgir)),
        "wgmma": len(re.findall(r"ttng.warp_group_dot ", ttgir)),
        "mma_v2": len(re.findall(r"#ttg.nvidia_mma<\{versionMajor = 2", ttgir)) > 0,
        "waits_in_loop_with_no_pending": sum(p == "0" for p in pendings), "waits": len(pendings),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="tf32", choices=K.PRECISIONS)
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for label, cfg in CONFIGS.items():
        for phase in ("gram", "grad"):
            row = {"config": label, **inspect(phase, cfg, args.precision, args.arch)}
            rows.append(row)
            print(f"{label:12s} {phase:4s} regs {row['registers']:3d}  spills st/ld {row['spill_store_bytes']:5d}/"
                  f"{row['spill_load_bytes']:5d} B  smem {row['shared_bytes'] // 1024:3d} KiB  async copies "
                  f"{row['async_copies']:2d}  wgmma {row['wgmma']}  waits(pending 0) "
                  f"{row['waits_in_loop_with_no_pending']}/{row['waits']}", flush=True)
    if args.json:
        meta = {"triton": triton.__version__, "arch": f"sm_{args.arch}a", "precision": args.precision,
                "commit": os.environ.get("FASTORTHO_COMMIT", "unknown")}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
