#!/usr/bin/env bash
# Issue 13, one device call (device tool: run(command="bash bench/results/issue13_encode_combine/device.sh")):
# encode_step with one dot per part of w (6bfa1e0) and the attention's combine in the split launch (349be03),
# checked against their references with the selection and whole-step checks (bench.check_kernels), then one
# Llama-8B layer per method profiled (wall and each kernel's device time; dense in the same run) at 128K batch 1
# and 32K batch 8, the configs of ../profile_layers_h100/ (main at 7f766cc, same card type), and the whole
# 128K batch-1 step of dense and HATA (bench.selector_speed).
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for d in models train evaluation cli; do ln -sfn ../$d hata_jax/$d; done
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
git log --oneline -1 | tee "$OUT/commit.txt"
timeout 250 python -m bench.check_kernels --only encode attention scores+topk "select adversarial" \
  "selector streaming" --out "$OUT/check_kernels.json" > "$OUT/check_kernels.log" 2>&1
echo "check_kernels exit $?"; grep -c PASS "$OUT/check_kernels.log"; grep FAIL "$OUT/check_kernels.log"
for cfg in "131072 1 4096" "32768 8 2048"; do
  set -- $cfg
  timeout 85 python -m bench.profile --layers --seq $1 --batch $2 --budget $3 --out "$OUT/layers_$1_b$2_k$3.json" \
    2>&1 | grep -v -i warning | tail -25
done
timeout 90 python -m bench.selector_speed --out "$OUT/speed_llama_128k.json" --time-budget 60 --models llama \
  --contexts 131072 --batches 1 --fractions 16 --methods dense hata 2>&1 | grep -v -i warning | tail -4
ls -la "$OUT"
