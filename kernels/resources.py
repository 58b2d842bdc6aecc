"""What a Triton kernel compiles to for a GPU target, without a GPU: registers and spills
(``ptxas -v``), shared memory, pipelined loads and tensor-core waits (the TTGIR).

A kernel is compiled the way a launch would specialize it (16-byte aligned pointers, the
integer arguments named ``aligned`` divisible by 16, unit strides as constants) for sm_90a.
:func:`gpu_launch_cases` lists every kernel at the configuration its launcher uses on CUDA, so
that a configuration that cannot launch on an H100 (more shared memory than a block may have)
is caught on a CPU machine: ``tests/test_kernel_resources.py``. ``bench/static_kernels.py``
prints the report.
"""
from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from ._common import H100

# Largest dynamic shared memory of one block on sm_90 (H100 / H200): 227 KiB.
SM90_SHARED_LIMIT = H100.shared_per_block



def ptxas() -> str | None:
    """The ptxas triton itself uses (its wheel ships one), or TRITON_PTXAS_PATH."""
    import triton

    if os.environ.get("TRITON_PTXAS_PATH"):
        return os.environ["TRITON_PTXAS_PATH"]
    found = sorted(Path(triton.__file__).parent.glob("backends/nvidia/bin/ptxas*"))
    return str(found[0]) if found else None


def compile_report(fn, params: dict, consts: dict, *, num_warps: int, num_stages: int, arch: int = 90,
                   aligned: tuple[str, ...] = ()) -> dict:
    """Compile ``fn`` for ``sm_<arch>a``. ``params``: every parameter's Triton type ("*fp32",
    "i32", ...; those in ``consts`` become constexprs with the given values)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {n: ("constexpr" if n in consts else t) for n, t in params.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, (n, t) in enumerate(sig.items())
             if t.startswith("*") or n in aligned}
    compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ttgir = compiled.asm["ttgir"]
    report = {"shared_bytes": compiled.metadata.shared, "registers": None, "spill_store_bytes": None,
              "spill_load_bytes": None}
    tool = ptxas()
    if tool is not None:
        with tempfile.TemporaryDirectory() as tmp:
            ptx = Path(tmp) / "k.ptx"
            ptx.write_text(compiled.asm["ptx"])
            out = subprocess.run([tool, f"-arch=sm_{arch}a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                                 capture_output=True, text=True, check=True).stderr
        for key, pattern in (("registers", r"Used (\d+) registers"), ("spill_store_bytes", r"(\d+) bytes spill stores"),
                             ("spill_load_bytes", r"(\d+) bytes spill loads")):
            m = re.search(pattern, out)
            report[key] = int(m.group(1)) if m else None
    pendings = re.findall(r"warp_group_dot_wait[^\n]*pendings = (\d+)", ttgir)
    report.update(async_copies=ttgir.count("async_copy_global_to_local"),
                  wgmma=len(re.findall(r"ttng.warp_group_dot ", ttgir)),
                  waits_with_no_pending=sum(p == "0" for p in pendings), waits=len(pendings))
    return report


def _types(names: str, t: str) -> dict:
    return {n: t for n in names.split()}


def orthoreg_cases(precision: str = "tf32"):
    """The OrthoReg passes: the delta pass for each scratch format (fp32, bf16, and the
    "tf32" mode's scaled fp16 with its fix-up), the Gram in the mode's operand format
    (``precision``) and in bf16, and the "tf32" mode's gradient."""
    from . import orthoreg as S
    from ._common import H100

    common = {"layer_table": "*i64", "tile_table": "*i32", "num_tiles": "i32"}
    for fmt, mode, fixup in (("fp32", "ieee", False), ("bf16", "bf16", False), ("fp16", "tf32", False),
                             ("fp16", "tf32", True)):
        cfg = S.default_config(mode, H100)
        params = {**_types("w_base w0_base", "*fp32"), "xt_ptr": f"*{fmt}", **common,
                  **_types("prev_scale_ptr scale_ptr", "*fp32"), "amax_bits_ptr": "*i32",
                  **_types("NF BR BC FORMAT EMULATE_BF16 FIXUP", "")}
        consts = {"NF": S.LAYER_FIELDS, "BR": cfg.delta_rows, "BC": cfg.delta_cols, "FORMAT": fmt,
                  "EMULATE_BF16": False, "FIXUP": fixup}
        yield (f"orthoreg delta {fmt}{' fix-up' if fixup else ''}", S.delta_kernel, params, consts,
               dict(num_warps=cfg.delta_warps, num_stages=1), ())
    for mode in dict.fromkeys((precision, "bf16")):
        cfg = S.default_config(mode, H100)
        fmt = {"bf16": "bf16", "tf32": "fp16"}.get(mode, "fp32")
        params = {"xt_ptr": f"*{fmt}", **common, **_types("gmi_ptr partial_ptr scale_ptr", "*fp32"), "gmax_ptr": "*i32",
                  **_types("NF BT BK PRECISION EMULATE_BF16 SCALED", "")}
        consts = {
            "NF": S.LAYER_FIELDS,
            "BT": cfg.gram_block,
            "BK": cfg.gram_k,
            "PRECISION": mode,
            "EMULATE_BF16": False,
            "SCALED": mode == "tf32",
        }
        yield (f"orthoreg gram {mode}", S.scratch_gram_kernel, params, consts,
               dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), ())
    cfg = S.default_config("tf32", H100)
    params = {"xt_ptr": "*fp16", **_types("gmi_ptr out_ptr scale_ptr", "*fp32"), "gmax_ptr": "*i32",
              "coef_ptr": "*fp32", **common, **_types("NF BT BN BK ACCUMULATE", "")}
    for accumulate in (False, True):
        consts = {"NF": S.LAYER_FIELDS, "BT": cfg.grad_rows, "BN": cfg.grad_cols, "BK": cfg.grad_k,
                  "ACCUMULATE": accumulate}
        yield (f"orthoreg grad tf32{' accumulate' if accumulate else ''}", S.scratch_grad_kernel, params,
               consts, dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages), ())


def gpu_launch_cases(precision: str = "tf32"):
    """``(name, kernel, params, constexprs, launch options, aligned ints)`` for every Triton
    kernel of the package at the configuration its launcher picks on CUDA."""
    import torch

    from . import attention_tangent as AT
    from . import dual_linear as DL
    from . import lora_orthoreg as LO

    cuda = H100  # the device description the launchers read; no CUDA call is made
    yield from orthoreg_cases(precision)

    bm, bn, bk, warps = DL.launch_blocks(cuda)
    strides = "sxm sxk sdxt sdxm sdxk swn swk sdwt sdwn sdwk sdbt syt sym syn sdyt sdym sdyn"
    for dtype, prec in (("fp32", precision), ("bf16", "ieee")):
        params = {
            **_types("x_ptr dx_ptr w_ptr dw_ptr b_ptr db_ptr y_ptr dy_ptr", f"*{dtype}"),
            **_types("M N K", "i32"),
            **_types(strides, "i32"),
            **_types("HAS_DX HAS_DW HAS_B HAS_DB WRITE_Y BM BN BK PRECISION", ""),
        }
        consts = dict(HAS_DX=True, HAS_DW=True, HAS_B=True, HAS_DB=True, WRITE_Y=True, BM=bm, BN=bn, BK=bk,
                      PRECISION=prec, sxk=1, sdxk=1, swk=1, sdwk=1, syn=1, sdyn=1)
        yield (f"dual_linear {dtype}", DL.dual_linear_kernel, params, consts, dict(num_warps=warps, num_stages=3),
               ("K", "N", "sxm", "sdxm", "swn", "sdwn", "sym", "sdym"))

    sizes = {**_types("L S D", "i32"), "scale": "fp32"}
    flags = _types("BM BN BD CAUSAL PRECISION", "")
    for head_dim in (64, 80, 128):
        aligned = ("D",) if head_dim % 16 == 0 else ()
        for dtype, prec in (("fp32", precision), ("bf16", "ieee")):
            cfg = AT.launch_config(cuda, head_dim, torch.float32 if dtype == "fp32" else torch.bfloat16)
            run = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
            consts = {"BM": cfg["BM"], "BN": cfg["BN"], "BD": cfg["BD"], "CAUSAL": True, "PRECISION": prec}
            fwd = {
                **_types("q_ptr k_ptr v_ptr dq_ptr dk_ptr dv_ptr o_ptr do_ptr", f"*{dtype}"),
                "lse_ptr": "*fp32",
                **sizes,
                **flags,
            }
            dq = {
                **_types("q_ptr k_ptr v_ptr g_ptr", f"*{dtype}"),
                **_types("lse_ptr delta_ptr", "*fp32"),
                "gdq_ptr": f"*{dtype}",
                **sizes,
                **flags,
            }
            dkdv = {**_types("q_ptr k_ptr v_ptr g_ptr", f"*{dtype}"), **_types("lse_ptr delta_ptr", "*fp32"),
                    **_types("gdk_ptr gdv_ptr", f"*{dtype}"), **sizes, **flags}
            for name, fn, params in (
                ("fwd", AT.attention_tangent_fwd, fwd),
                ("bwd dq", AT.attention_tangent_bwd_dq, dq),
                ("bwd dkdv", AT.attention_tangent_bwd_dkdv, dkdv),
            ):
                yield f"attention {name} d{head_dim} {dtype}", fn, params, consts, run, aligned

    lcfg = LO.default_config(cuda)
    for rank in (16, 64):
        rp = LO.rank_padding(rank)
        flags = _types("NF RP BL PRECISION EMULATE_BF16", "")
        consts = {"NF": LO.FIELDS, "RP": rp, "BL": lcfg.block, "PRECISION": precision, "EMULATE_BF16": False}
        pen_run = dict(num_warps=LO.penalty_warps(lcfg, rp), num_stages=3)
        run = dict(num_warps=lcfg.num_warps, num_stages=3)
        pen = {**_types("a_base b_base", "*fp32"), "table": "*i64", **_types("s2_ptr values_ptr small_ptr", "*fp32"),
               **flags}
        yield f"lora penalty r{rank}", LO.lora_penalty_kernel, pen, consts, pen_run, ()
        grad = {**_types("a_base b_base", "*fp32"), "table": "*i64", "tiles": "*i32", "num_tiles": "i32",
                **_types("small_ptr coef_ptr out_ptr", "*fp32"), **flags}
        yield f"lora grad r{rank}", LO.lora_grad_kernel, grad, consts, run, ()


def main(argv=None) -> None:
    """``python -m fastortho.kernels.resources [--precision tf32]``: one JSON row per kernel
    of :func:`gpu_launch_cases` on stdout (a process without TRITON_INTERPRET: the interpreter
    replaces the kernels by Python functions that cannot be compiled)."""
    import argparse
    import json

    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", default="tf32", choices=["tf32", "ieee"])
    args = ap.parse_args(argv)
    for name, fn, params, consts, run, aligned in gpu_launch_cases(args.precision):
        print(json.dumps({"kernel": name, **compile_report(fn, params, consts, aligned=aligned, **run)}), flush=True)


if __name__ == "__main__":
    main()
