#!/usr/bin/env bash
# Issue 13: the selection in three launches with none idle (the decision inside the band launch, by the last of a
# row's programs to arrive; a fallback row selected whole by that program) and the decode attention's in-kernel
# merge of its splits, measured on the GPU beside the tree before them (6abb289). `first` is what matters most and
# fits one device call (~500 s): run(command="bash THIS first"); `check` then `speed` are the whole set in two
# calls. Build the baseline tree first:
#   mkdir baseline_6abb289 && git archive 6abb289 pallas_kernels hata_jax models train evaluation cli bench \
#     ':!bench/results' ':!train/shipped' | tar -x -C baseline_6abb289
# (untracked, not ignored, so it travels; delete it afterwards, never commit it).
#  first: the selection, attention and HATA-step checks; one Llama-8B layer at 128K batch 1 profiled in both
#         trees (per-launch device times); the GPU-only test of the attention call's compiled launches (whether
#         XLA's zero fill of the arrival counters is a kernel); the band select's variants.
#  check: every kernel check (bench.check_kernels: fresh random data, ties, outliers, ragged batches, 256K
#         tokens, budgets to 8192, the band-miss variant that sends every row to the fallback), then the layer
#         profile in both trees;
#  speed: the GPU-only pytest cases, the band select's variants and tilings (bench.kernels --select-variants;
#         "band miss" times the fallback), then the whole Llama-8B step at 128K batch 1 (dense and HATA) in
#         both trees.
set -u
baseline=baseline_6abb289
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for root in . "$baseline"; do
  for d in models train evaluation cli; do ln -sfn ../$d $root/hata_jax/$d; done
done
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
if [ "${1:-}" = first ]; then  # one call that fits 600 s: what matters most, should only one machine come
  PYTHONPATH=$PWD timeout 170 python -m bench.check_kernels --only "scores+topk" "select " "attention b=" \
    "hata_decode_attention b=" "hata_decode_attention left" --out "$OUT/check_kernels_first.json" \
    > "$OUT/check_kernels_first.log" 2>&1
  echo "check_kernels exit $?"; grep -c PASS "$OUT/check_kernels_first.log"; grep -E "FAIL|passed" "$OUT/check_kernels_first.log"
  for root in . "$baseline"; do
    tag=$([ $root = . ] && echo new || echo baseline)
    (cd $root && PYTHONPATH=$PWD timeout 70 python -m bench.profile --layers --seq 131072 --batch 1 --budget 4096 \
      --out "$OUT/layers_131072_b1_k4096_$tag.json" 2>&1 | grep -v -i warning | grep -E "layer")
  done
  PYTHONPATH=$PWD timeout 60 python -m pytest -q -p no:cacheprovider tests/test_kernel_flash_decode.py \
    -k "compiled_call" 2>&1 | tail -4
  PYTHONPATH=$PWD timeout 150 python -m bench.kernels --skip-check --select-variants --out "$OUT/select_variants.json" \
    2>&1 | grep -v -i warning | tail -16
fi
if [ "${1:-}" = check ]; then
  PYTHONPATH=$PWD timeout 330 python -m bench.check_kernels --out "$OUT/check_kernels.json" > "$OUT/check_kernels.log" 2>&1
  echo "check_kernels exit $?"; grep -c PASS "$OUT/check_kernels.log"; grep -E "FAIL|passed" "$OUT/check_kernels.log"
  for root in . "$baseline"; do
    tag=$([ $root = . ] && echo new || echo baseline)
    (cd $root && PYTHONPATH=$PWD timeout 85 python -m bench.profile --layers --seq 131072 --batch 1 --budget 4096 \
      --out "$OUT/layers_131072_b1_k4096_$tag.json" 2>&1 | grep -v -i warning | grep -E "layer")
  done
fi
if [ "${1:-}" = speed ]; then
  PYTHONPATH=$PWD timeout 120 python -m pytest -q -p no:cacheprovider tests/test_kernel_flash_decode.py \
    tests/test_kernel_hash_encode.py -k "compiled_call or gpu" 2>&1 | tail -4
  PYTHONPATH=$PWD timeout 200 python -m bench.kernels --skip-check --select-variants --out "$OUT/select_variants.json" \
    2>&1 | grep -v -i warning | tail -16
  for root in . "$baseline"; do
    tag=$([ $root = . ] && echo new || echo baseline)
    (cd $root && PYTHONPATH=$PWD timeout 110 python -m bench.selector_speed --out "$OUT/step_llama_128k_$tag.json" \
      --time-budget 80 --models llama --contexts 131072 --batches 1 --fractions 16 --methods dense hata 2>&1 \
      | grep -v -i warning | tail -3)
  done
fi
ls -la "$OUT"
