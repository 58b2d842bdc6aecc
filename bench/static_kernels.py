"""What every Triton kernel compiles to on a GPU target, without a GPU
(``fastortho.kernels.resources``): per kernel at its CUDA launch configuration, the ptxas registers and spills, shared
memory (against the 227 KiB an sm_90 block may have), pipelined async copies, and the
tensor-core waits inside the loop (``pendings = 0``: the loop does not overlap its products).

It predicts no time; it is how a register or layout change is checked on a machine with no
GPU before the GPU benchmarks time it. For the first OrthoReg Triton design (since removed) it
reproduced what ncu measured on an H100 (255 registers, about 52 spilled).

    python bench/static_kernels.py [--precision tf32] [--json OUT.json]
"""
import argparse
import json
import os
from pathlib import Path

import triton

from fastortho.kernels.resources import SM90_SHARED_LIMIT, compile_report, gpu_launch_cases


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="tf32", choices=["tf32", "ieee"], help="of the fp32 cases")
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name, fn, params, consts, run, aligned in gpu_launch_cases(args.precision):
        row = {"kernel": name, **compile_report(fn, params, consts, aligned=aligned, **run)}
        rows.append(row)
        over = "  OVER THE SHARED-MEMORY LIMIT" if row["shared_bytes"] > SM90_SHARED_LIMIT else ""
        print(f"{name:36s} regs {row['registers']}  spills st/ld {row['spill_store_bytes']}/{row['spill_load_bytes']} B"
              f"  smem {row['shared_bytes'] // 1024} KiB  async copies {row['async_copies']}  wgmma {row['wgmma']}"
              f"  waits(pending 0) {row['waits_with_no_pending']}/{row['waits']}{over}", flush=True)
    if args.json:
        meta = {"triton": triton.__version__, "arch": "sm_90a", "precision": args.precision,
                "commit": os.environ.get("FASTORTHO_COMMIT", "unknown")}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
