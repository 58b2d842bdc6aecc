"""Every kernel checked and every benchmark row timed on a lent GPU in ONE device call of at
most 540 s (docs/design.md section 6), most important first; a summary table printed LAST
(only the tail of a device call's output comes back) and every JSON under one folder.

    bash bench/gpu_check.sh OUT                # on the GPU machine (device run, carry [".whl"])
    bash bench/gpu_check.sh --dry-run OUT      # here, on a CPU: the same steps' logic

Steps (each with its own time limit; one that runs out is reported and the next one starts):

1. install: carried wheels, the project (no extension built at install), a check that every
   package the steps need imports (a missing one stops the script at once); GPU, driver,
   torch, triton, commit printed;
2. build: the CUDA extension JIT-built ONCE, in the background while step 3 runs (the tests
   that need it wait on torch's build lock, then load that copy);
3. correctness: the GPU tests of every kernel family, all precisions, awkward shapes, against
   reference.py in float64, the linearized model and tau-Jp end to end on CUDA
   (pytest-xdist when present);
4. sanitizer: compute-sanitizer memcheck on one tiny launch of each kernel family, racecheck
   on those that share memory across warps;
5. benchmarks: OrthoReg (every backend, tf32 and bf16), the training-step overhead, the
   linearized step and tau-Jp, LoRA, the dual kernels, and the host side of a warm penalty
   call (bench/test_bench_host.py: simulated with the GPU hidden, so it runs the same here);
6. summary: one line per step, then the benchmark tables (bench/summarize.py).

The dry run runs the same steps on a CPU: kernels under the Triton interpreter on the smallest
cases, benchmarks with one round of their smallest case, no sanitizer binary; it prints the GPU
plan ("budget: N s") first. tests/test_gpu_check.py runs it in CI.

``--plan merge`` is a second, shorter call for the merge methods (issue 30), which have no
kernel of their own and so no place in the first call's 540 s: install (no extension),
tests/test_merge_device.py's GPU cases (every method on CUDA against the float64 merge, vectors
kept on the CPU, DARE's draws, TF32 and autocast ignored, 1 to 64 SVD streams, peak memory),
then bench/test_bench_merge.py's fastortho rows, with the default 8 SVD streams and with one
SVD at a time (FusionBench's own rows need fusion-bench, which the device image cannot hold),
then bench/test_bench_svd.py's per-matrix SVD costs (each cuSOLVER driver, float64, streams).

    bash bench/gpu_check.sh --plan merge OUT   # on the GPU machine (carry [".whl"] not needed)
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT_S = 540
REQUIRED = ("torch", "triton", "open_clip", "pytest", "pytest_benchmark", "safetensors", "numpy", "tqdm",
            "matplotlib")

KERNEL_TESTS = ["tests/test_orthoreg_kernels.py", "tests/test_orthoreg_triton.py", "tests/test_dual_kernels.py",
                "tests/test_lora.py", "tests/test_cuda_ext.py", "tests/test_gpu_end_to_end.py"]
# In the dry run: the device-generic end-to-end file and one poisoned launch per kernel module
# (the GPU selection itself is only collected, to prove it exists).
DRY_TESTS = ["tests/test_gpu_end_to_end.py", "tests/test_poisoning.py::test_kernel_outputs_are_poisoned_before_launch",
             "tests/test_dual_kernels.py::test_fused_dual_linear_multi_tangent"]
BENCHES = [  # (step, suite, what the dry run keeps: a -k expression for the smallest cases)
    ("bench-orthoreg", "bench/test_bench_orthoreg.py", "torch and not compile"),
    ("bench-train-step", "bench/test_bench_train_step.py", "none"),
    ("bench-linearize", "bench/test_bench_linearize.py", "ordinary or cyclical"),
    ("bench-lora", "bench/test_bench_lora.py", "torch and r8"),
    ("bench-dual-kernels", "bench/test_bench_dual_kernels.py", "two-linear"),
    # the host side of a warm call, simulated on the CPU (meta tensors, launches recorded): the
    # GPU is hidden from it, so it measures the dispatch itself on this machine's host CPU
    ("bench-host", "bench/test_bench_host.py", "ViT-B-32 and triton"),
]
# Steps run with the GPU hidden and the Triton interpreter on (what bench/host_cost.py needs).
HOST_SIMULATED = ("bench-host",)


PER_MODEL = ("bench-orthoreg", "bench-train-step", "bench-linearize")
# The merge plan needs none of the kernels' packages (no triton, no open_clip).
MERGE_REQUIRED = ("torch", "pytest", "pytest_benchmark", "safetensors", "numpy", "tqdm")
# (step, GPU budget s, [(JSON name, -k expression)], what the dry run keeps): each command
# writes its own JSON, so a command cut by its step's limit loses only its own rows; the SVD
# methods, the slow ones, come last and one per command. The per-layer rows are left to the
# CPU: with streams TSV-M's per-layer calls are still 8 matrices at once and Iso-C's one, so
# they would repeat the default and the 1-worker rows.
_DEFAULT_ROWS = "fastortho and not per-layer and not 1-worker"
MERGE_BENCHES = [
    ("bench-merge", 200, [("bench-merge", f"{_DEFAULT_ROWS} and not tsvm and not isocts"),
                          ("bench-merge-tsvm", f"{_DEFAULT_ROWS} and tsvm"),
                          ("bench-merge-isocts", f"{_DEFAULT_ROWS} and isocts")],
     "isoc-fastortho and not per-layer and not 1-worker"),
    ("bench-merge-1-worker", 150, [(f"bench-merge-1-worker-{m}", f"{m}-fastortho-1-worker")
                                   for m in ("isoc", "tsvm", "isocts")], "isoc-fastortho-1-worker"),
]
# (step, GPU budget s, [(JSON name, -k expression)], what the dry run keeps): the per-matrix
# costs under the merge rows (bench/test_bench_svd.py: each cuSOLVER driver, float64, torch's
# batch, one at a time, 8 streams), one shape per command, last: auxiliary to the rows above
SVD_BENCH = ("bench-svd", 60, [(f"bench-svd-{shape}", shape) for shape in ("768x768", "3072x768", "768x3072")],
             "768x768 and fastortho")


@dataclass
class Step:
    name: str
    budget_s: int  # on the GPU
    commands: list = field(default_factory=list)  # argv lists, run in order within the budget
    background: bool = False
    note: str = ""


def plan(dry: bool, out: Path) -> list[Step]:
    py = sys.executable
    steps = [Step("install", 45), Step("build", 0, background=True,
                                       note="background; overlaps correctness")]
    xdist = ["-n", "4"] if importlib.util.find_spec("xdist") and not dry else []
    if dry:
        tests = [[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *DRY_TESTS],
                 [py, "-m", "pytest", "-q", "--co", "-p", "no:cacheprovider", "-m", "gpu", "tests/"]]
    else:
        tests = [[py, "-m", "pytest", "-q", "-p", "no:cacheprovider", *xdist, *KERNEL_TESTS],
                 [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", "tests/test_orthoreg.py",
                  "tests/test_grad_into.py", "tests/test_linearize.py"]]
    steps.append(Step("correctness", 170, tests))
    sanitize = [py, "bench/sanitize_kernels.py"]
    tool = shutil.which("compute-sanitizer")
    if dry or tool is None:
        san = [sanitize + ["all"]]
        note = "no compute-sanitizer: launches only" if not dry else "dry run: launches only"
    else:
        san = [[tool, "--tool", "memcheck", "--error-exitcode", "1", *sanitize, "all"]]
        san += [[tool, "--tool", "racecheck", "--error-exitcode", "1", *sanitize, f] for f in
                ("orthoreg", "attention", "dual_linear")]
        note = ""
    steps.append(Step("sanitizer", 50, san, note=note))
    budgets = {"bench-orthoreg": 83, "bench-train-step": 50, "bench-linearize": 80, "bench-lora": 20,
               "bench-dual-kernels": 20, "bench-host": 12}
    for name, suite, smallest in BENCHES:
        args = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging", suite]
        if name in HOST_SIMULATED:
            args = ["env", "CUDA_VISIBLE_DEVICES=", "TRITON_INTERPRET=1", *args]
        if dry:
            commands = [["env", "FASTORTHO_BENCH_MODELS=ViT-B-32", *args, "-k", smallest, "--benchmark-disable"]]
        else:
            # one run per model, each writing its JSON: a run cut by the step's limit loses only its own rows
            models = ["ViT-B-32", "ViT-L-14"] if name in PER_MODEL else [None]
            commands = [(["env", f"FASTORTHO_BENCH_MODELS={m}"] if m else []) + args +
                        ["--benchmark-only", f"--benchmark-json={out / (name + (f'-{m}' if m else '') + '.json')}"]
                        for m in models]
        steps.append(Step(name, budgets[name], commands))
    steps.append(Step("summary", 10))
    return steps


def merge_plan(dry: bool, out: Path) -> list[Step]:
    py = sys.executable
    pytest_ = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:logging"]
    # the dry run has no CUDA: it runs the CPU cases of the same file instead of the gpu ones
    tests = [pytest_ + ([] if dry else ["-m", "gpu"]) + ["tests/test_merge_device.py"]]
    steps = [Step("install", 45, note="no CUDA extension: the merges have no kernel"),
             Step("correctness", 60, tests)]
    for name, budget, commands, keep_dry in MERGE_BENCHES + [SVD_BENCH]:
        suite = pytest_ + ["bench/test_bench_svd.py" if name == "bench-svd" else "bench/test_bench_merge.py"]
        if dry:
            steps.append(Step(name, budget, [suite + ["-k", keep_dry, "--benchmark-disable"]]))
            continue
        steps.append(Step(name, budget, [suite + ["-k", keep, "--benchmark-only",
                                                  f"--benchmark-json={out / (json_name + '.json')}"]
                                         for json_name, keep in commands]))
    steps.append(Step("summary", 10))
    return steps


def env_for(dry: bool, out: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "FASTORTHO_CACHE": str(out / "cache"),
           "TORCH_EXTENSIONS_DIR": str(out / "torch_extensions"), "MAX_JOBS": str(os.cpu_count() or 4),
           "TORCH_CUDA_ARCH_LIST": os.environ.get("TORCH_CUDA_ARCH_LIST", "9.0")}
    if dry:
        env.update(TRITON_INTERPRET="1", FASTORTHO_BENCH_ROUNDS="1", FASTORTHO_BENCH_MODELS="ViT-B-32")
    if Path("/usr/local/cuda/bin/nvcc").exists():
        env.setdefault("CUDA_HOME", "/usr/local/cuda")
    return env


def run(argv, env, timeout, log) -> tuple[str, float]:
    """Run one command with a time limit, its output appended to ``log`` and echoed."""
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(map(str, argv))}\n")
        f.flush()
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True, timeout=max(1, timeout))
            status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
            text = proc.stdout
        except subprocess.TimeoutExpired as e:
            status, text = f"out of time ({timeout:.0f} s)", (e.stdout or b"").decode(errors="replace") \
                if isinstance(e.stdout, bytes) else (e.stdout or "")
        f.write(text)
    tail = "\n".join(text.strip().splitlines()[-6:])
    if tail:
        print(tail, flush=True)
    return status, time.perf_counter() - t0


def install(dry: bool, env: dict, out: Path, required=REQUIRED) -> str:
    log = out / "install.log"
    if not dry:
        wheels = sorted((ROOT / ".whl").glob("*.whl"))
        if wheels:
            site = out / "site"
            status, _ = run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             "--target", str(site), *map(str, wheels)], env, 40, log)
            if status != "ok":
                return f"wheels: {status}"
            env["PYTHONPATH"] = f"{site}:{env.get('PYTHONPATH', '')}".rstrip(":")
        # The extension is built by the background step, once: not here as well.
        status, _ = run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."],
                        {**env, "FASTORTHO_SKIP_CUDA_BUILD": "1"}, 40, log)
        if status != "ok":
            return f"pip install: {status}"
    probe = ("import importlib.util, sys; missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]; "
             "print('missing: ' + ' '.join(missing) if missing else 'all required packages import'); "
             "sys.exit(1 if missing else 0)")
    status, _ = run([sys.executable, "-c", probe, *required], env, 30, log)
    if status != "ok":
        return f"required package missing (see {log.name}); carry its wheel in .whl/"
    gpu = shutil.which("nvidia-smi")
    if gpu:
        run([gpu, "--query-gpu=name,driver_version,clocks.max.sm,memory.total", "--format=csv,noheader"], env, 15, log)
    else:
        print("no nvidia-smi: no GPU here" + (" (dry run)" if dry else ""), flush=True)
    run([sys.executable, "-c", "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, "
         "'triton', triton.__version__, 'gpu', torch.cuda.is_available())"], env, 30, log)
    print(f"commit {env.get('FASTORTHO_COMMIT', 'unknown')}", flush=True)
    return "ok"


def start_build(env: dict, out: Path, dry: bool):
    """The CUDA extension, JIT-built once in a background process (None where nothing can be
    built: no toolkit or a CPU-only torch). The dry run finds the toolkit and the sources but
    compiles nothing (tests/test_cuda_ext.py compiles it in CI)."""
    if dry:
        return subprocess.Popen([sys.executable, "-c", "from fastortho.ops import cuda_ext; s = cuda_ext.sources(); "
                                 "assert s, 'no extension sources'; print('would build', len(s), 'sources with',"
                                 " cuda_ext.cuda_home())"], cwd=ROOT, env=env, stdout=open(out / "build.log", "w"),
                                stderr=subprocess.STDOUT)
    probe = subprocess.run([sys.executable, "-c", "import torch; from fastortho.ops import cuda_ext; "
                            "print(int(torch.version.cuda is not None and cuda_ext.cuda_home() is not None))"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    if probe.stdout.strip() != "1":
        return None
    log = open(out / "build.log", "w")
    return subprocess.Popen([sys.executable, "-c", "from fastortho.ops import cuda_ext; print('loaded', "
                             "cuda_ext.build())"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def summarize(out: Path, results: list[dict], env: dict) -> None:
    """The benchmark tables, then the step table (last: only the tail comes back). Each bench
    JSON is also copied to ``OUT/results/<device>-<date>-<commit>-<step>.json``, the name it
    gets in bench/results/."""
    (out / "results").mkdir(exist_ok=True)
    for json_file in sorted(out.glob("bench-*.json")):
        subprocess.run([sys.executable, "bench/summarize.py", str(json_file)], cwd=ROOT, env=env, timeout=60)
        name = subprocess.run([sys.executable, "bench/summarize.py", "--name", str(json_file)], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=60).stdout.strip()
        if name:
            shutil.copy(json_file, out / "results" / f"{name}-{json_file.stem}.json")
    print("\n## gpu_check summary\n")
    print("| step | status | seconds | budget s |")
    print("|---|---|---|---|")
    for r in results:
        print(f"| {r['step']} | {r['status']} | {r['seconds']:.0f} | {r['budget_s']} |")
    print(f"\ncommit {env.get('FASTORTHO_COMMIT', 'unknown')}; logs and JSON in {out}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default=os.environ.get("OUT", "/tmp/gpu-check"), type=Path,
                    help="folder for every log and JSON (default: $OUT, else /tmp/gpu-check)")
    ap.add_argument("--dry-run", action="store_true", help="the same steps on a CPU, smallest cases, one round")
    ap.add_argument("--plan", choices=("kernels", "merge"), default="kernels",
                    help="kernels: the one call for every kernel (default); merge: the merge methods' call")
    args = ap.parse_args(argv)
    out, dry = args.out.resolve(), args.dry_run
    out.mkdir(parents=True, exist_ok=True)
    steps = merge_plan(dry, out) if args.plan == "merge" else plan(dry, out)
    required = MERGE_REQUIRED if args.plan == "merge" else REQUIRED
    total = sum(s.budget_s for s in steps)
    print("plan (seconds on the GPU):")
    for s in steps:
        print(f"  {s.name:<20} {s.budget_s:>4}{'  ' + s.note if s.note else ''}")
    print(f"budget: {total} s (limit {LIMIT_S} s)", flush=True)
    if total > LIMIT_S:
        print(f"the plan exceeds {LIMIT_S} s", flush=True)
        return 2
    env = env_for(dry, out)
    # The dry run's CPU is slower than the GPU at everything: its steps get a larger limit.
    scale = 6 if dry else 1
    results, build = [], None
    t_start = time.perf_counter()
    for step in steps:
        print(f"\n== {step.name} (budget {step.budget_s} s)", flush=True)
        t0 = time.perf_counter()
        if step.name == "install":
            status = install(dry, env, out, required)
        elif step.name == "build":
            build = start_build(env, out, dry)
            status = "started in the background" if build else "skipped (no CUDA toolkit or a CPU-only torch)"
        elif step.name == "summary":
            if build is not None:
                try:
                    build.wait(timeout=max(5, LIMIT_S * scale - (time.perf_counter() - t_start)))
                    build_status = "ok" if build.returncode == 0 else f"failed (exit {build.returncode}; build.log)"
                except subprocess.TimeoutExpired:
                    build.kill()
                    build_status = "out of time"
                results[1]["status"] = build_status
            results.append(dict(step="summary", status="ok", seconds=0.0, budget_s=step.budget_s))
            summarize(out, results, env)
            break
        else:
            status, deadline = "ok", t0 + step.budget_s * scale
            for argv_ in step.commands:
                s, _ = run(argv_, env, deadline - time.perf_counter(), out / f"{step.name}.log")
                if s != "ok":
                    status = s
        results.append(dict(step=step.name, status=status, seconds=time.perf_counter() - t0, budget_s=step.budget_s))
        if step.name == "install" and status != "ok":
            print(f"install: {status}; stopping", flush=True)
            summarize(out, results, env)
            return 1
    (out / "summary.json").write_text(json.dumps({"dry_run": dry, "budget_s": total, "steps": results,
                                                  "commit": env.get("FASTORTHO_COMMIT", "unknown")}, indent=1))
    return 0 if all(r["status"].startswith(("ok", "started", "skipped")) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
