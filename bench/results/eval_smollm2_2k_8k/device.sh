#!/usr/bin/env bash
# One device call of the issue-17 evaluation (run.py), on a machine warm from the calls before it.
# The 98 MB GGUF and the 18 MB tree exceed one call's 64 MiB, so the GGUF travels xz-compressed in two halves
# (`xz -6 -c GGUF > gguf.xz; split -n 2 -d -a 1 gguf.xz gguf.xz.part`, renamed gguf.xz.part1 and 2, in the
# ignored folder .evalcarry), one per call on one warm machine:
#   call 1: carry .evalcarry/a (gguf.xz.part1) and .whl (the gguf wheel):  bash device.sh setup
#   call 2: carry .evalcarry/c (gguf.xz.part2, the held-out stdlib as tar.gz, the hashattention run, the eta or
#           rbit-256 projections if any) and .evalcarry/state (loki/<fingerprint>.npz: the Loki calibration from
#           ~/.cache/hata-jax/loki, for loki stages):  bash device.sh run SECONDS [check] -- STAGES...
#   PERPLEXITY_OF="STAGE ..." in the environment names the stages the perplexity stage scores (run.py's default:
#   main, asym and eta).
# .evalcarry/state/*.tar.gz (an earlier call's results.tar.gz) is unpacked first when present,
# so a run that lost its machine resumes. Everything comes back as $OUT/results.tar.gz.
set -u
here=$(cd "$(dirname "$0")" && pwd)
cache=/tmp/hcache; root=/tmp/eval17
mkdir -p "$cache" "$root"
nvidia-smi --query-gpu=name --format=csv,noheader
for part in .evalcarry/*/gguf.xz.part*; do [ -f "$part" ] && cp "$part" "$cache/"; done
# the Loki calibration ($HATA_JAX_CACHE/loki/<model fingerprint>.npz; the device has no stdlib corpus to calibrate on)
for bases in .evalcarry/*/loki/*.npz; do [ -f "$bases" ] && mkdir -p "$cache/loki" && cp "$bases" "$cache/loki/"; done
[ -d /tmp/site/gguf ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
ls -la "$cache"
[ "$1" = setup ] && exit 0

gguf=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  cat "$cache"/gguf.xz.part? | python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer)" > "$gguf"
fi
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  $gguf" | sha256sum -c - \
  || { echo "the GGUF's parts do not make the model (a part missing: the machine was not warm)"; rm -f "$gguf"; exit 5; }
for d in models train evaluation cli; do ln -sfn ../$d hata_jax/$d; done
for f in .evalcarry/*/stdlib_heldout.tar.gz; do [ -f "$f" ] && tar -xzf "$f" -C /tmp; done
for d in .evalcarry/*/smollm2-*; do [ -d "$d" ] && cp -r "$d" /tmp/; done
for f in .evalcarry/state/*.tar.gz; do [ -f "$f" ] && tar -xzf "$f" -C "$root" --skip-old-files; done
export PYTHONPATH=$PWD:/tmp/site HATA_JAX_CACHE=$cache HATA_JAX_STDLIB=/tmp/stdlib PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_COMPILATION_CACHE_DIR=/tmp/jaxcache
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0

seconds=$2; shift 2
if [ "${1:-}" = check ]; then
  shift
  (timeout $((seconds - 60)) python -m bench.check_kernels --out "$OUT/check_kernels.json" > "$OUT/check_kernels.log" 2>&1; \
   echo "check_kernels exit $?" >> "$OUT/check_kernels.log") &
fi
[ "${1:-}" = -- ] && shift
stages=(); [ $# -gt 0 ] && stages=(--stages "$@")
[ -n "${PERPLEXITY_OF:-}" ] && stages+=(--perplexity-of $PERPLEXITY_OF)
weights=()
[ -d /tmp/smollm2-eta0.02-lr0.2 ] && weights+=(--eta /tmp/smollm2-eta0.02-lr0.2)
[ -d /tmp/smollm2-hashattention ] && weights+=(--hashattention /tmp/smollm2-hashattention)
[ -d /tmp/smollm2-rbit256 ] && weights+=(--rbit256 /tmp/smollm2-rbit256)
python "$here/run.py" --root "$root" --impl auto --deadline "$seconds" "${weights[@]}" "${stages[@]}" \
  2>&1 | grep -v -i warning | tee "$OUT/run.log"
wait
tail -3 "$OUT/check_kernels.log" 2>/dev/null
tar -czf "$OUT/results.tar.gz" -C "$root" .
ls -la "$OUT"
