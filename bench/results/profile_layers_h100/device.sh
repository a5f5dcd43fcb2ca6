#!/usr/bin/env bash
# Issue 13's next device call (~350 s; device tool: run(command="bash bench/results/profile_layers_h100/device.sh")):
# the selection kernels after the serial design's removal (3e59a2c) and StreamingLLM's positional selection
# (30829e3) checked against their references; the band select's variants and the fused hamming_topk's tilings
# timed (bench.kernels --select-variants: is the band launch latency-bound at one loop step per program?); one
# Llama-8B layer per method profiled again (wall and each kernel's device time) at the configs of layers_*.json.
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for d in models train evaluation cli; do ln -sfn ../$d hata_jax/$d; done
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
timeout 150 python -m bench.check_kernels --only select "selector streaming" --out "$OUT/check_kernels.json" \
  > "$OUT/check_kernels.log" 2>&1
echo "check_kernels exit $?"; grep -c PASS "$OUT/check_kernels.log"; grep FAIL "$OUT/check_kernels.log"
timeout 150 python -m bench.kernels --skip-check --select-variants --out "$OUT/select_variants.json" 2>&1 \
  | grep -v -i warning | tail -12
for cfg in "131072 1 4096" "32768 1 2048" "32768 8 2048"; do
  set -- $cfg
  timeout 80 python -m bench.profile --layers --seq $1 --batch $2 --budget $3 --out "$OUT/layers_$1_b$2_k$3.json" \
    2>&1 | grep -v -i warning
done
ls -la "$OUT"
