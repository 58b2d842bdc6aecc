#!/usr/bin/env bash
# The one device call (bench/gpu_check.py says what it runs): correctness of every kernel
# family first, then the benchmarks, the summary printed last, every JSON under OUT.
#   device run, carry [".whl"], timeout_s ~560:  FASTORTHO_COMMIT=<sha> bash bench/gpu_check.sh "$OUT"
#   here, on a CPU:                              bash bench/gpu_check.sh --dry-run /tmp/gpu-check
set -uo pipefail
cd "$(dirname "$0")/.."
exec python3 bench/gpu_check.py "$@"
