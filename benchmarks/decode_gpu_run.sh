#!/usr/bin/env bash
# One call on a GPU machine with torch but no TVM (the lent H200): the decode benchmark (checks, timings,
# variants), the GPU decode tests, and an Nsight Compute profile of the decode kernels, everything under $OUT.
# Needs BUNDLE (default .bundle), built here beforehand (benchmarks/decode_notes.md, "Reproducing").
set -u
BUNDLE=${BUNDLE:-.bundle}
export PYTHONUNBUFFERED=1 BLA_TVM_NO_TUNING=1
timeout 170 python benchmarks/decode_bench.py --bundle "$BUNDLE" --out "$OUT" --no-fla > "$OUT/bench.log" 2>&1
echo "bench: exit $?"
tail -32 "$OUT/bench.log"
profile() {  # name, kernel ('default' or a variant's module file)
    timeout 45 ncu --clock-control none --kernel-name regex:decode --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
        --section MemoryWorkloadAnalysis --section SchedulerStats --section InstructionStats \
        python benchmarks/decode_bench.py --bundle "$BUNDLE" --profile "$2" > "$OUT/ncu_$1.txt" 2>&1
    echo "ncu $1: exit $?"
    grep -E "^ +(Duration|DRAM Throughput|Memory Throughput|Achieved Occupancy|Registers Per|Block Limit Reg|Warp Cycles Per Issued|Issue Slots Busy)" "$OUT/ncu_$1.txt"
}
profile tile "default"
for variant in ${PROFILE_VARIANTS:-0}; do
    profile "variant$variant" "$BUNDLE/variants/variant$variant.so"
done
PYTHONPATH=/tmp/bla_site:. BLA_TVM_PREBUILT_DIR=$BUNDLE/kernels BLA_TVM_RUNTIME_DIR=$BUNDLE/lib BLA_TVM_NO_BUILD=1 \
    timeout 50 python -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py -k decode > "$OUT/pytest.log" 2>&1
echo "GPU decode tests: exit $?"
tail -3 "$OUT/pytest.log"
