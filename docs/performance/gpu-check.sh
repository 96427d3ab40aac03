#!/usr/bin/env bash
# Issue 10's GPU measurements, in one prepared script. On the GPU machine, from the project
# root, after the two set-up calls of ../shared/gpu/README.md (which leave /tmp/gpusite):
#     bash docs/performance/gpu-check.sh n     # shipped D-FINE-N 320: bench vs the CUDA peer,
#                                              # eval fp32 vs fp16           (~4 min)
#     bash docs/performance/gpu-check.sh l     # D-FINE-L 640, random weights: fp32 and fp16
#                                              # benches with the engine ceiling (~5 min)
# Each part writes its JSON, plots and log under $OUT (or build/gpu-check), to be copied into
# docs/performance/ and README "Performance". Tried here on the CPU with
#     PROVIDERS=cpu DURATION=1 bash docs/performance/gpu-check.sh n
# (short, and without GPU figures; part l with L_VARIANT=n L_SIZE=320) so that a GPU lease is
# not spent on a typo.
set -euo pipefail
PART=${1:?which part: n or l}
OUT=${OUT:-build/gpu-check}
PROVIDERS=${PROVIDERS:-cuda}
DURATION=${DURATION:-5}
SITE=${SITE:-/tmp/gpusite}
[ -d "$SITE" ] && export PYTHONPATH="$SITE:$PWD"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/$PART.log"; }
[ "$PROVIDERS" = cpu ] || nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader | tee -a "$OUT/$PART.log"
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__)" | tee -a "$OUT/$PART.log"

case "$PART" in
n)
  # Targets: c=64 >= 3x the CUDA peer and >= 1,500 req/s; c=16 p99 <= 3x p50; max < 1 s.
  log "bench: shipped D-FINE-N 320, service --providers $PROVIDERS vs the plain peer on it"
  "$PY" -m app bench --concurrency 1,16,64 --duration-s "$DURATION" --ceiling-instances 1 \
    --service-args "--providers $PROVIDERS" --peer-providers "$PROVIDERS" \
    --out "$OUT/n" 2>/dev/null | tee -a "$OUT/n.log"
  # Target: |dAP| <= 0.005 between fp32 and fp16 on the held-out split.
  log "eval: fp32 against fp16 on the model card's 500 held-out images"
  [ -f data/shapes/val/annotations.json ] || \
    "$PY" -m models.synthetic --out data/shapes --train 0 --val 500 --seed 0 >/dev/null
  "$PY" -m app eval --data data/shapes/val --model models/dfine_n_shapes.onnx \
    --providers "$PROVIDERS" --compare-precision fp16 --concurrency 16 \
    --out "$OUT/n-eval-fp16.json" 2>/dev/null | tee -a "$OUT/n.log"
  ;;
l)
  # Targets: c=64 >= 0.9x the engine ceiling (best bucket), GPU busy >= 85 %, fp16 >= 1.8x
  # the fp32 images/s, c=1 p50 <= 10 ms with fp16.
  variant=${L_VARIANT:-l} size=${L_SIZE:-640}
  log "export: D-FINE-$variant $size, random weights"
  [ -f "/tmp/dfine_$variant$size.onnx" ] || "$PY" -m models.export --variant "$variant" \
    --input-size "$size" --out "/tmp/dfine_$variant$size.onnx" >/dev/null 2>&1
  for precision in fp32 fp16; do
    log "bench: D-FINE-$variant $size $precision"
    "$PY" -m app bench --model "/tmp/dfine_$variant$size.onnx" --concurrency 1,64 \
      --duration-s "$DURATION" --no-peer --no-ceiling \
      --service-args "--providers $PROVIDERS --precision $precision" \
      --out "$OUT/l-$precision" 2>/dev/null | tee -a "$OUT/l.log"
  done
  ;;
*) echo "unknown part $PART: n or l"; exit 2 ;;
esac
log "targets"
"$PY" docs/performance/gpu_targets.py "$OUT" "$PART" | tee -a "$OUT/$PART.log"
