#!/usr/bin/env bash
# One call on the lent GPU machine (torch, no TVM) that checks and times the CUDA kernels, everything under
# $OUT: the GPU tests, the training benchmark (forward + backward, forward alone, peak memory, per-kernel times,
# gradient errors; FlexAttention SWA, SDPA and FLA's chunk_gsa in the same run), the inference forward benchmark
# (the same baselines; time per token from T = 1k to 64k), what a step holds at its peak
# memory, and an Nsight Compute profile of the tile programs of one training step. Needs the kernel bundle .bundle
# (README, "GPU tests", plus the benchmark layers: `bla-tvm build --specs` of training_bench's layers) and FLA's
# wheels in .whl/ (carry both). FLA's kernels are compiled first by fla_warmup.py, in parallel: compiled one
# after another on first use they take longer than a call may run.
set -u
export PYTHONUNBUFFERED=1 BLA_TVM_NO_TUNING=1 BLA_TVM_NO_BUILD=1 TRITON_CACHE_DIR=/tmp/triton-cache
python -m pip install -q --no-index --no-deps --target /tmp/bla_site .bundle/wheels/*.whl .whl/*.whl || exit 1
export PYTHONPATH=/tmp/bla_site:. BLA_TVM_PREBUILT_DIR=.bundle/kernels BLA_TVM_RUNTIME_DIR=.bundle/lib
timeout 180 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py > "$OUT/pytest-gpu.log" 2>&1
echo "pytest -m gpu: exit $?"; tail -3 "$OUT/pytest-gpu.log"
timeout 150 python benchmarks/fla_warmup.py --parts 14 > "$OUT/fla-warmup.log" 2>&1
echo "fla_warmup: exit $?"
timeout ${BENCH_S:-240} python benchmarks/training_bench.py --fla --out "$OUT" > "$OUT/training-bench.log" 2>&1
echo "training_bench: exit $?"; grep -E "^BLA" "$OUT/training-bench.log"
timeout 150 python benchmarks/forward_bench.py --fla --out "$OUT" > /tmp/forward-bench.log 2>&1
echo "forward_bench: exit $?"; python -c "import json; d = json.load(open('$OUT/forward_bench.json')); print(d['ms'], d['per_token_ns'], d.get('t1k'))"
timeout 60 python benchmarks/training_bench.py --memory > "$OUT/training-memory.txt" 2>&1
echo "memory at the peak: exit $?"; head -12 "$OUT/training-memory.txt"
timeout 120 ncu --kernel-name regex:_tile_ --launch-skip 4 --launch-count 4 --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section WarpStateStats \
    python benchmarks/training_bench.py --profile > "$OUT/ncu-tile-kernels.txt" 2>&1
echo "ncu: exit $?"
grep -E "^  bla_|^ +(Duration|Registers Per|Achieved Occupancy|Theoretical Occupancy|Compute \(SM\) Throughput|Memory Throughput|Dynamic Shared)" "$OUT/ncu-tile-kernels.txt"
