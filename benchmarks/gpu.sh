#!/bin/bash
# The GPU figures of the README's Decoding speed section (issue 16), in one run, bfloat16:
#   1. `gqa-jax bench decode --preset paper-fig6`: T5-XXL, input 2048, output 512, batch 32,
#      G in {64 (MHA), 32, 16, 8, 4, 1 (MQA)}: the paper's Figure 6 setting;
#   2. the train step of T5.1.1-XL (Adafactor, bfloat16 activations, float32 parameters):
#      its FLOP rate (XLA's cost analysis) against a bf16 8192^3 matmul in the same run;
#   3. XL's train step scanned against unrolled, with 'minimal' remat, bfloat16: compile
#      seconds, step seconds and MFU against PEAK_TFLOPS (default 989: H100 SXM dense bf16).
# Usage: OUT=DIR bash benchmarks/gpu.sh [extra bench-decode flags]   (default OUT: gpu_results)
# On a CPU the same script runs with e.g. `SIZE=tiny KV=1,4 TRAIN=tiny` (a wiring check).
set -o pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# T5-XXL weights (22 GB) + the MHA caches (32 GB) + cache-shaped attention inputs (32 GB):
# let XLA take more than its default 75% of the GPU's memory.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
timeout ${DECODE_TIMEOUT:-0} python3 -m gqa_jax.cli bench decode --preset paper-fig6 ${SIZE:+--size $SIZE} \
    --num-kv-heads "${KV:-64,32,16,8,4,1}" --repeats 2 --step-repeats 10 \
    --matmul-size "${MATMUL:-8192}" --no-hf --output "$OUT/decode" "$@" 2>&1 \
    | tee "$OUT/decode.log"
timeout ${TRAIN_TIMEOUT:-0} python3 "$(dirname "$0")/train_throughput.py" --presets "${TRAIN:-xl}" --dtype bfloat16 \
    --matmul-size "${MATMUL:-8192}" --batch 16 --inputs 512 --targets 128 --steps 5 \
    --output "$OUT/train" 2>&1 | tee "$OUT/train.log"
timeout ${SCAN_TIMEOUT:-0} python3 "$(dirname "$0")/scan_layers.py" --presets "${TRAIN:-xl}" --dtype bfloat16 \
    --remat minimal --batch 16 --inputs 512 --targets 128 --rounds 5 \
    --peak-tflops "${PEAK_TFLOPS:-989}" --output "$OUT/scan" 2>&1 | tee "$OUT/scan.log"
