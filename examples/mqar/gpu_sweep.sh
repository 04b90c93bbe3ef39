#!/usr/bin/env bash
# The GPU sweep of issue 16 (README, "MQAR"), on a CUDA machine (sm_90) that has torch but no TVM, from the
# repository root. Needs the kernel bundle, built where nvcc and TVM are (a few minutes on two cores):
#
#   for flags in "--bla-resolutions 63 31 15" "--bla-resolutions 63 --bla-slots W"; do
#     .venv/bin/python -m examples.mqar --dtype bfloat16 --swa-windows $flags --list-specs > /tmp/s.json
#     .venv/bin/bla-tvm build --device cuda --arch sm_90 --specs /tmp/s.json --out .bundle-mqar/kernels --append
#   done
#   .venv/bin/bla-tvm bundle --out .bundle-mqar          # libtvm_runtime*.so + the cp312 tvm_ffi wheel
#
# then, there:  bash examples/mqar/gpu_sweep.sh OUTDIR [FLAGS]   (OUTDIR gets mqar.json, mqar.png and sweep.log;
# FLAGS, e.g. --steps 2000, go to both sweeps after the script's own)
#
# The setting (d_model 128, 2 layers, 2 heads of 64, T 256, 16 pairs, vocabulary 8192, 4,000 steps)
# under bfloat16 autocast, the dtype the CUDA tile programs serve, at learning rates 3e-3 and 1e-3, both methods
# with short convolutions on q, k and v: without them SWA stayed on the loss plateau at ln(vocab / 2) through
# 4,000 steps at every window, seed and learning rate (FlexAttention and SDPA alike), with them it reached
# accuracy 1.000 at W = 256 (benchmarks/results/h200-2026-12-03-mqar-swa-short-conv-probe.log). One worker
# process per seed (SEEDS, default "0 1 2") and learning rate, side by side: a run is bound by the host's
# launches, so the GPU has room for several. Each worker runs SWA W 256-16 and BLA W 256 with N 63, 31, 15
# (M = N), then BLA N 63 with M = W, then BLA N 31 with every layer option, into its own JSON (written after
# every run; resumed by a later call with the same OUTDIR; started from the committed
# examples/mqar/results/mqar.json), and no run starts after BUDGET_S seconds (default 520, for a 600 s call).
# At the end the workers' JSONs are merged into OUTDIR/mqar.json with its PNG.
set -u
out=${1:?usage: bash examples/mqar/gpu_sweep.sh OUTDIR [FLAGS]}
shift
bundle=${BUNDLE:-.bundle-mqar}
python=${PYTHON:-python3}
deadline=$(($(date +%s) + ${BUDGET_S:-520}))
mkdir -p "$out"
"$python" -m pip install -q --no-index --no-deps --target /tmp/bla_site "$bundle"/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/bla_site:. BLA_TVM_PREBUILT_DIR=$bundle/kernels BLA_TVM_RUNTIME_DIR=$bundle/lib
export BLA_TVM_NO_BUILD=1 BLA_TVM_NO_TUNING=1 PYTHONUNBUFFERED=1
extra=("$@")
worker() {  # seed, learning rate
    local name="seed$1-lr$2"
    local run=(--dtype bfloat16 --device cuda --out "$out/$name.json" --no-progress --deadline "$deadline"
               --seeds "$1" --lrs "$2" --swa-short-conv --bla-short-conv)
    if [ ! -e "$out/$name.json" ] && [ -e examples/mqar/results/mqar.json ]; then
        cp examples/mqar/results/mqar.json "$out/$name.json"
    fi
    for methods in "--swa-windows 256 128 64 32 16 --bla-resolutions 63 31 15" \
                   "--swa-windows --bla-resolutions 63 --bla-slots W" \
                   "--swa-windows --bla-resolutions 31 --bla-feature-map swish --bla-output-gate --bla-norm"; do
        [ "$(date +%s)" -lt "$deadline" ] || break
        # shellcheck disable=SC2086  # $methods is a list of flags
        "$python" -m examples.mqar "${run[@]}" $methods ${extra[@]+"${extra[@]}"} >> "$out/$name.log" 2>&1
    done
}
for seed in ${SEEDS:-0 1 2}; do
    for lr in 3e-3 1e-3; do
        worker "$seed" "$lr" &
    done
done
wait
cat "$out"/seed*.log > "$out/sweep.log"
"$python" -m examples.mqar --dtype bfloat16 --out "$out/mqar.json" --merge "$out"/seed*.json ${extra[@]+"${extra[@]}"}
