#!/usr/bin/env bash
# The GPU checks and figures of BENCHMARKS.md, in two stages that each fit a 10-minute command:
#   bash benchmarks/gpu_check.sh check    # GPU tests vs the NumPy twin, engine per box, box 512 under a 24 GB cap
#   bash benchmarks/gpu_check.sh command  # the pipeline's GPU tests, then the whole command cold at box 256
#                                         # (threads, local) against the disk floor
# Logs go to $OUT (default /tmp/dsub-gpu). Needs CuPy; other packages from PYTHONPATH or installed.
set -uo pipefail
OUT=${OUT:-/tmp/dsub-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
cap=$((24 * 2**30))

case "${1:-check}" in
check)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/test_gpu.log" | tail -15
    python3 benchmarks/gpu_throughput.py --boxes 128 256 384 512 --batch 256 2>&1 | tee "$OUT/throughput.log" | tail -12
    echo "== box 512, CuPy's pool capped at 24 GB =="
    CUPY_GPU_MEMORY_LIMIT=$cap python3 benchmarks/bench.py --device gpu --boxes 512 --batch 128 --skip-command \
        2>&1 | tee "$OUT/box512_capped.log" | tail -6
    CUPY_GPU_MEMORY_LIMIT=$cap python3 benchmarks/bench.py --device gpu --skip-engine --box 512 --particles 1024 \
        --schedulers threads --folder /tmp 2>&1 | tee -a "$OUT/box512_capped.log" | tail -6
    ;;
command)
    python3 -c "import matplotlib" 2>/dev/null || echo "matplotlib missing: the QC report is not drawn (a warning)"
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu_pipeline.py 2>&1 | tee "$OUT/test_gpu_pipeline.log" | tail -8
    python3 benchmarks/bench.py --device gpu --skip-engine --box 256 --particles 20000 --schedulers threads local \
        --folder /tmp 2>&1 | tee "$OUT/bench_command.log" | tail -8
    ;;
two-gpu)  # on a host with two GPUs: the GPU tests (the two-GPU one included), one GPU on all its cores, 1 vs 2 GPUs
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
    nproc | tee -a "$OUT/gpu.txt"
    python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py tests/test_gpu_pipeline.py 2>&1 \
        | tee "$OUT/test_gpu.log" | tail -8
    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/bench.py --device gpu --skip-engine --box 256 --particles 20000 \
        --schedulers threads local --warm-up --folder /tmp 2>&1 | tee "$OUT/bench_command_one_gpu.log" | tail -8
    python3 benchmarks/multi_gpu.py --particles 32768 --box 256 --workers 1 2 --warm-up 2>&1 \
        | tee "$OUT/multi_gpu.log" | tail -6
    ;;
esac
