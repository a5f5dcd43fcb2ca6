#!/usr/bin/env bash
# Issue 20's speed side on the GPU, in calls of at most 600 s (device tool: run(command="bash THIS PART")).
#   a: the kernel checks of the selectors, the selection and the ring storage; SmolLM2 at 2K 1/32, 4K and 8K 1/16
#   b: the selector checks that a did not reach; Llama-3.1-8B shapes (random bf16 weights) at 32K batch 1,
#      128K batch 1 and 32K batch 8, budget 1/16
#   c: what a and b did not reach: the streaming selector's check, Llama 32K batch 8 for the last five methods,
#      128K batch 1 for the last two, and SmolLM2 2K at 1/16 and 1/32 on the same card as a's 4K and 8K
#   d: with the dense control beside every method (speed_vs_dense) and the step floors, SmolLM2 2K at both
#      budgets (the accuracy frontier's), then Llama 128K batch 1 at 1/16 and 1/32 for the leading methods
#      (ran on an H100 2026-12-07; 2K 1/32 reached dense, hata and exact only)
#   e, f (ran on an H100 2026-12-07 at e25526f, as did g): SmolLM2 4K, then 8K, at both budgets with the dense
#      control, for the methods of the 50-prompt
#      GPU evaluation (~20 s per method and budget with its control); e also times the whole Llama-8B step at
#      128K batch 1 (dense and HATA) with main before issue 13's encode_step change (6bfa1e0) (baseline_d21630f/,
#      unpacked by `git archive d21630f`, not committed) and after them, in the same run;
#   g: SmolLM2 2K at 1/32 for the methods d did not reach
#   h: SmolLM2 4K and 8K at both budgets with the dense control for the methods e and f did not time
#      (hashattention, hashattention_authors, simhash)
# Results come back under $OUT as JSON (written as they complete) and logs.
set -u
part=$1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu_$part.txt"
for d in models train evaluation cli; do ln -sfn ../$d hata_jax/$d; done
export PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
speed() {  # name seconds args...
  local name=$1 seconds=$2; shift 2
  timeout $((seconds + 60)) python -m bench.selector_speed --out "$OUT/speed_$name.json" --time-budget "$seconds" "$@" \
    2>&1 | grep -v -i warning > "$OUT/speed_$name.log"
  tail -2 "$OUT/speed_$name.log"
}
case $part in
  a)
    timeout 150 python -m bench.check_kernels --only select topk storage=ring --out "$OUT/check_kernels.json" \
      > "$OUT/check_kernels.log" 2>&1
    echo "check_kernels exit $?" | tee -a "$OUT/check_kernels.log"; grep -c PASS "$OUT/check_kernels.log"; grep FAIL "$OUT/check_kernels.log"
    speed smollm2_2k_b32 130 --models smollm2 --contexts 2048 --batches 1 --fractions 32
    speed smollm2_4k_8k 230 --models smollm2 --contexts 4096 8192 --batches 1 --fractions 16
    ;;
  b)
    timeout 70 python -m bench.check_kernels --only "selector quest" "selector simhash" "selector streaming" \
      --out "$OUT/check_kernels_b.json" > "$OUT/check_kernels_b.log" 2>&1
    echo "check_kernels exit $?" | tee -a "$OUT/check_kernels_b.log"; grep -c PASS "$OUT/check_kernels_b.log"
    speed llama_32k_b1 170 --models llama --contexts 32768 --batches 1 --fractions 16
    speed llama_128k_b1 170 --models llama --contexts 131072 --batches 1 --fractions 16
    speed llama_32k_b8 120 --models llama --contexts 32768 --batches 8 --fractions 16
    ;;
  c)
    timeout 45 python -m bench.check_kernels --only "selector streaming" --out "$OUT/check_kernels_c.json" \
      > "$OUT/check_kernels_c.log" 2>&1
    echo "check_kernels exit $?" | tee -a "$OUT/check_kernels_c.log"; grep -c PASS "$OUT/check_kernels_c.log"
    speed llama_32k_b8_rest 150 --models llama --contexts 32768 --batches 8 --fractions 16 \
      --methods loki quest quest_authors simhash streaming
    speed llama_128k_b1_rest 90 --models llama --contexts 131072 --batches 1 --fractions 16 --methods simhash streaming
    speed smollm2_2k 170 --models smollm2 --contexts 2048 --batches 1 --fractions 16 32
    ;;
  d)
    speed smollm2_2k_control 260 --models smollm2 --contexts 2048 --batches 1 --fractions 16 32
    speed llama_128k_control 230 --models llama --contexts 131072 --batches 1 --fractions 16 32 \
      --methods dense hata loki streaming quest
    ;;
  e)
    speed llama_128k_step_new 90 --models llama --contexts 131072 --batches 1 --fractions 16 --methods dense hata
    for d in models train evaluation cli; do ln -sfn ../$d baseline_d21630f/hata_jax/$d; done
    (cd baseline_d21630f && PYTHONPATH=$PWD timeout 120 python -m bench.selector_speed \
      --out "$OUT/speed_llama_128k_step_baseline.json" --time-budget 90 --models llama --contexts 131072 \
      --batches 1 --fractions 16 --methods dense hata 2>&1 | grep -v -i warning > "$OUT/speed_llama_128k_step_baseline.log")
    tail -2 "$OUT/speed_llama_128k_step_baseline.log"
    speed smollm2_4k_control 260 --models smollm2 --contexts 4096 --batches 1 --fractions 16 32 \
      --methods dense hata exact hata_rerank loki quest_authors streaming
    ;;
  f)
    speed smollm2_8k_control 420 --models smollm2 --contexts 8192 --batches 1 --fractions 16 32 \
      --methods dense hata exact hata_rerank loki quest_authors streaming
    ;;
  g)
    speed smollm2_2k_b32_control 400 --models smollm2 --contexts 2048 --batches 1 --fractions 32 \
      --methods dense hashattention hashattention_authors hata_rerank loki quest quest_authors simhash streaming
    ;;
  h)
    speed smollm2_4k_8k_rest_control 240 --models smollm2 --contexts 4096 8192 --batches 1 --fractions 16 32 \
      --methods dense hashattention hashattention_authors simhash
    ;;
esac
ls -la "$OUT"
