#!/usr/bin/env bash
# Issue 13, session 19: the band launch's decision with the bucket copied as one flat sequence of band slots (it
# was one dependent step per chunk: 80.6 us for the band launch against 21.1 before the decision moved in, H100), a missed
# row's candidates listed by one scan (PATH_LISTED) instead of one program's whole-row radix select (2.2 ms a row),
# and the attention's split merge back in its own launch (in the kernel it cost more device time). One call
# (~450 s): run(command="bash THIS"), beside the tree of 6abb289, built first:
#   mkdir baseline_6abb289 && git archive 6abb289 pallas_kernels hata_jax models train evaluation cli bench \
#     ':!bench/results' ':!train/shipped' | tar -x -C baseline_6abb289
# (untracked, not ignored, so it travels; delete it afterwards, never commit it).
# 1. the selection checks on the GPU (fresh random data; the band-miss variants check the listed and whole-row
#    fallbacks slot for slot);
# 2. one Llama-8B layer at 128K batch 1, budget 4096, profiled in both trees (per-launch device times);
# 3. the band select's variants (bench.kernels --select-variants: "band miss" times the listed fallback,
#    "band miss, whole row" the whole-row one);
# 4. the scoring, attention and HATA-step checks, in what time is left.
set -u
baseline=baseline_6abb289
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
for root in . "$baseline"; do
  for d in models train evaluation cli; do ln -sfn ../$d $root/hata_jax/$d; done
done
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
PYTHONPATH=$PWD timeout 120 python -m bench.check_kernels --only "select " --out "$OUT/check_select.json" \
  > "$OUT/check_select.log" 2>&1
echo "check_kernels (select) exit $?"; grep -c PASS "$OUT/check_select.log"; grep -E "FAIL|passed" "$OUT/check_select.log"
for root in . "$baseline"; do
  tag=$([ $root = . ] && echo new || echo baseline)
  (cd $root && PYTHONPATH=$PWD timeout 70 python -m bench.profile --layers --seq 131072 --batch 1 --budget 4096 \
    --out "$OUT/layers_131072_b1_k4096_$tag.json" 2>&1 | grep -v -i warning | grep -E "layer")
done
PYTHONPATH=$PWD timeout 150 python -m bench.kernels --skip-check --select-variants --out "$OUT/select_variants.json" \
  2>&1 | grep -v -i warning | tail -16
PYTHONPATH=$PWD timeout 120 python -m bench.check_kernels --only "scores+topk" "attention b=" \
  "hata_decode_attention b=" --out "$OUT/check_kernels.json" > "$OUT/check_kernels.log" 2>&1
echo "check_kernels (rest) exit $?"; grep -c PASS "$OUT/check_kernels.log"; grep -E "FAIL|passed" "$OUT/check_kernels.log"
ls -la "$OUT"
