#!/usr/bin/env bash
# Issue 13 (and issue 20's last GPU check) in one device call (~330 s, ~480 with `sweep`; device tool:
# run(command="bash THIS [sweep]")), after
#   mkdir baseline_e25526f && git archive e25526f pallas_kernels hata_jax models train evaluation cli bench \
#     ':!bench/results' ':!train/shipped' | tar -x -C baseline_e25526f
# (untracked, not ignored, so it travels; delete it afterwards, never commit it):
#  1. the kernel checks: encode (float32 w split inside the kernels, 8278440), the whole HATA step, and
#     StreamingLLM's positional selection (30829e3; issue 20's last unchecked GPU path);
#  2. one Llama-8B layer at 128K batch 1 profiled with main before the split (e25526f) beside it, in the same run;
#  3. with `sweep`: the band select's variants and the fused hamming_topk's tilings (bench.kernels --select-variants).
set -u
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for root in . baseline_e25526f; do
  for d in models train evaluation cli; do ln -sfn ../$d $root/hata_jax/$d; done
done
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
PYTHONPATH=$PWD timeout 150 python -m bench.check_kernels --only encode "hata_decode_attention b=2" "selector streaming" \
  --out "$OUT/check_kernels.json" > "$OUT/check_kernels.log" 2>&1
echo "check_kernels exit $?" | tee -a "$OUT/check_kernels.log"; grep -c PASS "$OUT/check_kernels.log"
grep -E "FAIL|streaming" "$OUT/check_kernels.log"
for root in . baseline_e25526f; do
  tag=$([ $root = . ] && echo new || echo baseline)
  (cd $root && PYTHONPATH=$PWD timeout 85 python -m bench.profile --layers --seq 131072 --batch 1 --budget 4096 \
    --out "$OUT/layers_131072_b1_k4096_$tag.json" 2>&1 | grep -v -i warning | grep hata_layer)
done
if [ "${1:-}" = sweep ]; then
  PYTHONPATH=$PWD timeout 150 python -m bench.kernels --skip-check --select-variants --out "$OUT/select_variants.json" \
    2>&1 | grep -v -i warning | tail -14
fi
ls -la "$OUT"
