#!/usr/bin/env bash
# Issue 13, prepared for the next device call (~250 s; device tool:
#   run(command="bash bench/results/issue13_encode_split/device.sh")), after
#   mkdir baseline_e25526f && git archive e25526f pallas_kernels hata_jax models train evaluation cli bench | tar -x -C baseline_e25526f
# (untracked, not ignored, so it travels; delete it afterwards, never commit it).
# Checks encode_step and prefill encode with float32 w split inside the kernels (no XLA convert before them)
# against the reference, with the whole HATA step, then profiles one Llama-8B layer at 128K batch 1 with main
# before the change (e25526f) beside it in the same run: the XLA `loop_convert_fusion` launch (0.9 us) should be
# gone and `hash_encode_step` (4.8 us at e25526f) about as fast.
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for root in . baseline_e25526f; do
  for d in models train evaluation cli; do ln -sfn ../$d $root/hata_jax/$d; done
done
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
PYTHONPATH=$PWD timeout 120 python -m bench.check_kernels --only encode "hata_decode_attention b=2" \
  --out "$OUT/check_kernels.json" > "$OUT/check_kernels.log" 2>&1
echo "check_kernels exit $?"; grep -c PASS "$OUT/check_kernels.log"; grep FAIL "$OUT/check_kernels.log"
for root in . baseline_e25526f; do
  tag=$([ $root = . ] && echo new || echo baseline)
  (cd $root && PYTHONPATH=$PWD timeout 85 python -m bench.profile --layers --seq 131072 --batch 1 --budget 4096 \
    --out "$OUT/layers_131072_b1_k4096_$tag.json" 2>&1 | grep -v -i warning | grep hata_layer)
done
ls -la "$OUT"
