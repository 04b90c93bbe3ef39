#!/usr/bin/env bash
# The GPU sweep of issue 16 (README, "MQAR"), on a CUDA machine (sm_90) that has torch but no TVM, from the
# repository root. Needs the kernel bundle, built where nvcc and TVM are (a few minutes on two cores):
#
#   for flags in "--bla-resolutions 63 31" "--bla-resolutions 63 --bla-slots W"; do
#     .venv/bin/python -m examples.mqar --dtype bfloat16 --swa-windows $flags --list-specs > /tmp/s.json
#     .venv/bin/bla-tvm build --device cuda --arch sm_90 --specs /tmp/s.json --out .bundle-mqar/kernels --append
#   done
#   .venv/bin/bla-tvm bundle --out .bundle-mqar          # libtvm_runtime*.so + the cp312 tvm_ffi wheel
#
# then, there:  bash examples/mqar/gpu_sweep.sh OUTDIR [FLAGS]   (OUTDIR gets mqar.json, mqar.png and sweep.log;
# FLAGS, e.g. --steps 2000, go to both sweeps after the script's own)
#
# The setting (d_model 128, 2 layers, 2 heads of 64, T 256, 16 pairs, vocabulary 8192, lr 1e-3,
# 4,000 steps) under bfloat16 autocast, the dtype the CUDA tile programs serve, seeds 0 and 1: BLA W 256 N 63
# with M = W first, then SWA W 16-256 and BLA N 63, 31 with M = N, every method for seed 0 before seed 1. The
# JSON is written after every run and resumes (an OUTDIR without one starts from the committed
# examples/mqar/results/mqar.json, if any); no run starts after BUDGET_S seconds (default 520, for a 600 s call).
set -u
out=${1:?usage: bash examples/mqar/gpu_sweep.sh OUTDIR [FLAGS]}
shift
bundle=${BUNDLE:-.bundle-mqar}
python=${PYTHON:-python3}
deadline=$(($(date +%s) + ${BUDGET_S:-520}))
mkdir -p "$out"
"$python" -m pip install -q --no-index --no-deps --target /tmp/bla_site "$bundle"/wheels/*.whl || exit 1
if [ ! -e "$out/mqar.json" ] && [ -e examples/mqar/results/mqar.json ]; then
    cp examples/mqar/results/mqar.json "$out/mqar.json"
fi
export PYTHONPATH=/tmp/bla_site:. BLA_TVM_PREBUILT_DIR=$bundle/kernels BLA_TVM_RUNTIME_DIR=$bundle/lib
export BLA_TVM_NO_BUILD=1 BLA_TVM_NO_TUNING=1 PYTHONUNBUFFERED=1
common=(--dtype bfloat16 --seeds 0 1 --device cuda --out "$out/mqar.json" --no-progress --deadline "$deadline")
extra=("$@")
sweep() { "$python" -m examples.mqar "${common[@]}" "$@" ${extra[@]+"${extra[@]}"} 2>&1 | tee -a "$out/sweep.log"; }
sweep --swa-windows --bla-resolutions 63 --bla-slots W
sweep --swa-windows 16 32 64 128 256 --bla-resolutions 63 31
