#!/usr/bin/env bash
# Issue 13, one device call (device tool: run(command="bash bench/results/issue13_encode_combine/device.sh")):
# encode_step with one dot per part of w (6bfa1e0) and the attention's combine in the split launch (349be03),
# checked against their references with the selection and whole-step checks (bench.check_kernels), then one
# Llama-8B layer per method profiled (wall and each kernel's device time, dense beside) at 128K batch 1 and
# 32K batch 8, each with main before the changes (d21630f, `git archive` unpacked into baseline_d21630f/, not
# committed) in the same run on the same card.
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for root in . baseline_d21630f; do
  for d in models train evaluation cli; do ln -sfn ../$d $root/hata_jax/$d; done
done
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
git log --oneline -1 | tee "$OUT/commit.txt"
PYTHONPATH=$PWD timeout 200 python -m bench.check_kernels --only encode attention scores+topk "select adversarial" \
  "selector streaming" --out "$OUT/check_kernels.json" > "$OUT/check_kernels.log" 2>&1
echo "check_kernels exit $?"; grep -c PASS "$OUT/check_kernels.log"; grep FAIL "$OUT/check_kernels.log"
for cfg in "131072 1 4096" "32768 8 2048"; do
  set -- $cfg
  for root in . baseline_d21630f; do
    tag=$([ $root = . ] && echo new || echo baseline)
    (cd $root && PYTHONPATH=$PWD timeout 85 python -m bench.profile --layers --seq $1 --batch $2 --budget $3 \
      --out "$OUT/layers_$1_b$2_k$3_$tag.json" 2>&1 | grep -v -i warning | tail -3)
  done
done
ls -la "$OUT"
