#!/usr/bin/env bash
# Per-instruction Nsight Compute profile of the tile programs of one training step (N = M = 63, the training
# bench's shape): for each kernel named in $@ (default: the four tile programs), the full section set of its
# second launch and the SASS with each instruction's warp-stall samples, as CSV under $OUT. Run on the GPU
# machine after gpu_run.sh's install step (the same bundle and environment):
#     bash benchmarks/ncu_sass.sh chunk_backward_tile chunk_output_tile
set -u
kernels=${*:-chunk_output_tile state_scan_tile chunk_backward_tile state_scan_reverse_tile}
for kernel in $kernels; do
    timeout 150 ncu --set full --import-source no --kernel-name "regex:bla_${kernel}_kernel" --launch-skip 1 \
        --launch-count 1 -f -o "/tmp/ncu-$kernel" python benchmarks/training_bench.py --profile > "/tmp/ncu-$kernel.log" 2>&1
    echo "ncu $kernel: exit $?"
    ncu --import "/tmp/ncu-$kernel.ncu-rep" --page source --csv --print-source sass > "$OUT/sass-$kernel.csv" 2>&1
    ncu --import "/tmp/ncu-$kernel.ncu-rep" --page details > "$OUT/details-$kernel.txt" 2>&1
    grep -E "Duration|Registers Per|Achieved Occupancy|Warp Cycles Per Issued" "$OUT/details-$kernel.txt" | head -4
done
