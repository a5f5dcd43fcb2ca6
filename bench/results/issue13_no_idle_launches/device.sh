#!/usr/bin/env bash
# Issue 13: the selection without idle launches (fallback rows selected whole by one program of the
# decision launch; the PATH_RANKED threshold found by the compaction) and the decode attention's
# in-kernel merge of its splits, measured on the GPU beside the tree before them (6abb289), in two device
# calls (device tool: run(command="bash THIS check") then run(command="bash THIS speed"); `first` is the part of
# both that fits one call), after
#   mkdir baseline_6abb289 && git archive 6abb289 pallas_kernels hata_jax models train evaluation cli bench \
#     ':!bench/results' ':!train/shipped' | tar -x -C baseline_6abb289
# (untracked, not ignored, so it travels; delete it afterwards, never commit it).
#  check: every kernel check (bench.check_kernels: fresh random data, ties, outliers, ragged batches,
#         256K tokens, budgets to 8192, the band-miss variant that sends every row to the fallback), then
#         one Llama-8B layer at 128K batch 1 profiled in both trees (per-launch device times);
#  speed: the GPU-only pytest cases (the attention call's compiled launches), the band select's variants and tilings (bench.kernels --select-variants; "band miss" times the
#         fallback), then the whole Llama-8B step at 128K batch 1 (dense and HATA) in both trees.
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
