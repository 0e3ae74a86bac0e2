#!/usr/bin/env bash
# The GPU checks of the Triton backend in one call, for a session lent a GPU machine (the device tool):
# install lowc the way that machine allows, run the CUDA tests, then the benchmarks, each under its own
# time limit so one slow step cannot eat the others. Results and logs go to $OUT (default
# /tmp/lowc-gpu-out) as log.txt and results.tgz (benchmarks/results/*.md/json written by this run).
#
#   bash benchmarks/gpu_checks.sh [STEP...]     steps: tests bench benchcg sparse decode linattn (default: all)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/lowc-gpu-out}"; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 LOWC_CACHE_DIR=/tmp/lowc-cache PYTHONWARNINGS=ignore
res=/tmp/lowc-gpu-results; mkdir -p "$res"
steps=("$@"); [ ${#steps[@]} -eq 0 ] && steps=(tests bench sparse decode linattn)
{
    date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -m pip install -q -e . --no-deps --no-build-isolation 2>&1 | tail -2
    python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
    for s in "${steps[@]}"; do
        echo "=== step $s ($(date -u +%T))"
        case $s in
        tests)   timeout 150 python3 -m pytest -q -p no:cacheprovider -n 8 --maxfail=20 --timeout 140 \
                     tests/test_triton_linear.py tests/test_triton_sparse.py tests/test_linear_attention.py \
                     $(ls tests/test_triton_ssd.py 2>/dev/null) ;;
        bench)   timeout 130 python3 benchmarks/triton_linear.py --out "$res" ;;
        benchcg) timeout 120 python3 benchmarks/triton_linear.py --cuda-graph --out "$res/cudagraph" ;;
        sparse)  timeout 70 python3 benchmarks/triton_linear.py --sparse --out "$res" ;;
        decode)  timeout 80 python3 benchmarks/triton_linear.py --decode --out "$res" ;;
        linattn) timeout 100 python3 benchmarks/linear_attention.py --parts cuda \
                     && cp benchmarks/results/linear_attention.* "$res"/ ;;
        *) echo "unknown step $s" ;;
        esac
        echo "=== step $s rc=$? ($(date -u +%T))"
        tar -C "$res" -czf "$OUT/results.tgz" . 2>/dev/null
    done
} 2>&1 | tee "$OUT/log.txt"
ls -la "$res"
