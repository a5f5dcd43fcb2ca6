#!/usr/bin/env bash
# Device calls for issue 14 (K/V storage as the caller keeps it); JSON under $OUT.
#   bash bench/results/kv_storage/run_h100.sh check   # every kernel check + the attention bench of
#                                                     # ./baseline (`git archive 3ae6d1a | tar -x -C baseline`,
#                                                     # untracked so it travels): today's path before this work
#   bash bench/results/kv_storage/run_h100.sh time    # the attention bench and every storage, this tree
set -u
nvidia-smi --query-gpu=name --format=csv,noheader
export PYTHONPATH=$PWD
case "$1" in
  check)
    timeout 330 python -m bench.check_kernels --out "$OUT/check_kernels_h100.json" 2>&1 | grep -v Warning | cut -c1-400
    if [ -d baseline ]; then
      (cd baseline && PYTHONPATH=$PWD timeout 240 python -m bench.kernels --only attention --skip-check \
         --out "$OUT/attention_before_h100.json" 2>&1 | grep -v Warning | cut -c1-300)
    fi ;;
  time)
    timeout 560 python -m bench.kernels --only attention storages --skip-check \
      --out "$OUT/attention_storages_h100.json" 2>&1 | grep -v Warning | cut -c1-300 ;;
esac
