#!/usr/bin/env bash
# Issue 13 (and issue 20's last GPU check) in one device call (~330 s, +150 with `sweep`, +200 with `step`; at most
# one of them fits a call; device tool: run(command="[BASELINE=DIR] bash THIS [sweep | step]")), after
#   mkdir baseline_e25526f && git archive e25526f pallas_kernels hata_jax models train evaluation cli bench \
#     ':!bench/results' ':!train/shipped' | tar -x -C baseline_e25526f
# (untracked, not ignored, so it travels; delete it afterwards, never commit it). BASELINE names another such tree
# (default baseline_e25526f). Ran 2026-12-07 as `bash THIS` (H100, results beside this script). Next, to measure
# d96c69e (the one-hot table as a literal): this tree with only that file as before,
#   mkdir baseline_75a2115 && git archive HEAD pallas_kernels hata_jax models train evaluation cli bench \
#     ':!bench/results' ':!train/shipped' | tar -x -C baseline_75a2115 \
#   && git show 75a2115:pallas_kernels/radix_select.py > baseline_75a2115/pallas_kernels/radix_select.py
#   BASELINE=baseline_75a2115 bash THIS step
#  1. the kernel checks: encode (float32 w split inside the kernels, 8278440), the whole HATA step, and
#     StreamingLLM's positional selection (30829e3; issue 20's last unchecked GPU path);
#  2. one Llama-8B layer at 128K batch 1 profiled beside the baseline tree, in the same run;
#  3. with `sweep`: the band select's variants and the fused hamming_topk's tilings (bench.kernels --select-variants);
#     with `step`: the whole Llama-8B step at 128K batch 1 (dense and HATA), this tree's process then the baseline's.
set -u
baseline=${BASELINE:-baseline_e25526f}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for root in . "$baseline"; do
  for d in models train evaluation cli; do ln -sfn ../$d $root/hata_jax/$d; done
done
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
PYTHONPATH=$PWD timeout 150 python -m bench.check_kernels --only encode "hata_decode_attention b=2" "selector streaming" \
  --out "$OUT/check_kernels.json" > "$OUT/check_kernels.log" 2>&1
echo "check_kernels exit $?" | tee -a "$OUT/check_kernels.log"; grep -c PASS "$OUT/check_kernels.log"
grep -E "FAIL|streaming" "$OUT/check_kernels.log"
for root in . "$baseline"; do
  tag=$([ $root = . ] && echo new || echo baseline)
  (cd $root && PYTHONPATH=$PWD timeout 85 python -m bench.profile --layers --seq 131072 --batch 1 --budget 4096 \
    --out "$OUT/layers_131072_b1_k4096_$tag.json" 2>&1 | grep -v -i warning | grep hata_layer)
done
if [ "${1:-}" = sweep ]; then
  PYTHONPATH=$PWD timeout 150 python -m bench.kernels --skip-check --select-variants --out "$OUT/select_variants.json" \
    2>&1 | grep -v -i warning | tail -14
fi
if [ "${1:-}" = step ]; then
  for root in . "$baseline"; do
    tag=$([ $root = . ] && echo new || echo baseline)
    (cd $root && PYTHONPATH=$PWD timeout 100 python -m bench.selector_speed --out "$OUT/step_llama_128k_$tag.json" \
      --time-budget 80 --models llama --contexts 131072 --batches 1 --fractions 16 --methods dense hata 2>&1 \
      | grep -v -i warning | tail -3)
  done
fi
ls -la "$OUT"
