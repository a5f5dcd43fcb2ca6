#!/usr/bin/env bash
# Device calls for issue 14 (K/V storage as the caller keeps it); JSON under $OUT.
#   bash bench/results/kv_storage/run_h100.sh check    # every kernel check (bench.check_kernels)
#   bash bench/results/kv_storage/run_h100.sh before   # the attention bench of ./baseline (`git archive 3ae6d1a |
#                                                      # tar -x -C baseline`, untracked so it travels): the path
#                                                      # before this work, at 128K x 1 and 32K x 8
#   bash bench/results/kv_storage/run_h100.sh time     # every storage (bench.kernels --only storages), this tree
# Run them on one warm machine, one after the other.
set -u
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD
case "$1" in
  check)
    timeout 330 python -m bench.check_kernels --out "$OUT/check_kernels.json" 2>&1 | grep -v Warning | cut -c1-400 ;;
  before)
    cd baseline && export PYTHONPATH=$PWD
    for shape in "131072 1" "32768 8"; do
      set -- $shape
      timeout 270 python -m bench.kernels --only attention --skip-check --contexts "$1" --batches "$2" \
        --out "$OUT/attention_before_${1}x$2.json" 2>&1 | grep -v Warning | cut -c1-300
    done ;;
  time)  # optional: BATCH:CONTEXT pairs, then kinds (default: both shapes, every kind)
    shift
    timeout 540 python -m bench.kernels --only storages --skip-check --storage-shapes ${SHAPES:-} \
      --storage-kinds ${KINDS:-} --out "$OUT/storages.json" 2>&1 | grep -v Warning | cut -c1-300 | tee "$OUT/storages.log" ;;
esac
