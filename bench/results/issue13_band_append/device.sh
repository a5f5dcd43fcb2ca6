#!/usr/bin/env bash
# Issue 13, session 19, last call: the bucket copy over band keys the band programs append to a row-contiguous list
# (atomic offsets; the list holds (key, chunk) pairs in any order) against the flat copy with a binary search for
# each slot's chunk through L2 (the tree of ad0c359, in prev/, built first):
#   mkdir prev && git archive ad0c359 pallas_kernels hata_jax models train evaluation cli bench \
#     ':!bench/results' ':!train/shipped' | tar -x -C prev      (untracked; delete it afterwards)
# run(command="HATA_COMMIT=$(...) bash THIS"): the selection checks, one Llama-8B layer at 128K b1 budget 4096 in
# both trees, the band select's variants.
set -u
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
for root in . prev; do
  for d in models train evaluation cli; do ln -sfn ../$d $root/hata_jax/$d; done
done
export XLA_PYTHON_CLIENT_PREALLOCATE=false PYTHONUNBUFFERED=1
for root in . prev; do
  tag=$([ $root = . ] && echo append || echo binary_search)
  (cd $root && PYTHONPATH=$PWD timeout 70 python -m bench.profile --layers --seq 131072 --batch 1 --budget 4096 \
    --out "$OUT/layers_131072_b1_k4096_$tag.json" 2>&1 | grep -v -i warning | grep -E "hata_layer|dense_layer")
done
PYTHONPATH=$PWD timeout 150 python -m bench.kernels --skip-check --select-variants --out "$OUT/select_variants.json" \
  2>&1 | grep -v -i warning | grep -E "default|band miss"
PYTHONPATH=$PWD timeout 90 python -m bench.check_kernels --only "select " --out "$OUT/check_select.json" \
  > "$OUT/check_select.log" 2>&1
echo "check_kernels (select) exit $?"; grep -E "FAIL|passed" "$OUT/check_select.log"
