#!/usr/bin/env bash
# One device call: install, check on the GPU, tune, time. Writes logs and JSONs to $OUT.
#   device run, carry [".whl"]:  bash bench/gpu_run.sh [static|diag|profile|tests|bench|lora|kernels|linearize ...]
# Each step must fit the device's 10-minute call limit together with the others named.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
steps=${*:-"tests bench"}
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
# the CUDA extension is built here ahead of time (sm_90: H100 / H200)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
python3 -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | tail -2
nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
export PYTHONUNBUFFERED=1
# the tree arrives without .git; the caller passes the commit (FASTORTHO_COMMIT=... bash ...)
export FASTORTHO_COMMIT=${FASTORTHO_COMMIT:-unknown}
for step in $steps; do
  case $step in
    static) timeout 120 python3 bench/static_kernels.py --json "$OUT/static.json" 2>&1 | tee "$OUT/static.log" ;;
    diag) timeout 180 ncu --kernel-name regex:"delta_kernel|scratch_gram_kernel|scratch_grad_kernel" --launch-count 4 \
            --section SpeedOfLight --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis \
            python3 bench/diagnose_orthoreg.py 2>&1 | grep -v "^==PROF==" | tee "$OUT/ncu.log" | \
            grep -E "Kernel|gram|grad|Throughput|Duration|Pipe|Hit Rate|Bandwidth|Executed Ipc" ;;
    profile) timeout 120 python3 bench/profile_orthoreg.py ViT-B-32 2>&1 | tee "$OUT/profile.log" | \
               grep -E "=====|Self CUDA time total|^ *[a-zA-Z_:<>]" | cut -c1-160 | head -60 ;;
    tests) timeout 300 python3 -m pytest -q -x tests/ -p no:logging 2>&1 | tee "$OUT/tests.log" | tail -15 ;;
    bench) timeout 400 python3 -m pytest -q bench/test_bench_orthoreg.py bench/test_bench_train_step.py \
             --benchmark-only -p no:logging --benchmark-json="$OUT/bench.json" 2>&1 | tail -5
           python3 bench/summarize.py "$OUT/bench.json" | tee "$OUT/summary.md" ;;
    lora) timeout 200 python3 -m pytest -q bench/test_bench_lora.py --benchmark-only -p no:logging \
             --benchmark-json="$OUT/lora.json" 2>&1 | tail -5
           python3 bench/summarize.py "$OUT/lora.json" | tee "$OUT/lora.md" ;;
    kernels) timeout 300 python3 -m pytest -q bench/test_bench_dual_kernels.py --benchmark-only -p no:logging \
             --benchmark-json="$OUT/kernels.json" 2>&1 | tail -5
           python3 bench/summarize.py "$OUT/kernels.json" | tee "$OUT/kernels.md" ;;
    linearize) timeout 500 python3 -m pytest -q bench/test_bench_linearize.py --benchmark-only -p no:logging \
             --benchmark-json="$OUT/linearize.json" 2>&1 | tail -5
           python3 bench/summarize.py "$OUT/linearize.json" | tee "$OUT/linearize.md" ;;
  esac
done
