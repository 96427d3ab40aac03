#!/usr/bin/env bash
# The GPU measurements of issues 10 and 17, in parts that fit the GPU machine: 15 minutes of
# device time in all (about 30 s to start it included), at most 10 minutes a command, and less
# than 30 s between commands (after that the machine and what was set up on it are gone).
# On the GPU machine, from the project root, after the two set-up calls of
# ../shared/gpu/README.md (which leave /tmp/gpusite), each part one call:
#     bash .gpu/2/setup-site.sh && bash docs/performance/gpu-check.sh preflight  # ~40 s
#     bash docs/performance/gpu-check.sh n     # shipped D-FINE-N 320: service vs the CUDA
#                                              # peer and vs its front end alone; eval fp32
#                                              # vs fp16                              (~4 min)
#     bash docs/performance/gpu-check.sh l     # D-FINE-L 640, random weights: fp32 and fp16
#                                              # with the engine ceiling         (~5-7 min)
#     bash docs/performance/gpu-check.sh f     # FRONTENDS auto against 1: shipped D-FINE-N
#                                              # on the GPU and the front end alone (~4 min)
#     bash docs/performance/gpu-check.sh s     # video: 640x480 10 fps MJPEG cameras on the
#                                              # shipped D-FINE-N, 4 to 64 streams  (~4 min)
# Device time: start ~30 s, set-up part 1 ~20 s, part 2 + preflight ~60 s, n <= 250 s, l <= 420
# s: under 13 minutes if every step runs to its limit, which leaves room to rerun preflight.
# Each part stops itself (`timeout`) well inside its call's limit, writes at most 8 files
# under $OUT (or build/gpu-check), and ends with the targets it checked (gpu_targets.py).
# Tried here on the CPU first so that a lease is not spent on a typo:
#     PROVIDERS=cpu DURATION=1 bash docs/performance/gpu-check.sh preflight|n|l
# (part l there with L_VARIANT=n L_SIZE=320; EXTRA_ARGS="--batch-buckets 1,2,4
# --max-batch-size 4" runs the bucket path there too). EXTRA_ARGS goes to every service.
set -uo pipefail
PART=${1:?which part: preflight, n, l, f or s}
OUT=${OUT:-build/gpu-check}
PROVIDERS=${PROVIDERS:-cuda}
DURATION=${DURATION:-5}
EXTRA_ARGS=${EXTRA_ARGS:-}
SITE=${SITE:-/tmp/gpusite}
[ -d "$SITE" ] && export PYTHONPATH="$SITE:$PWD"
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG="$OUT/$PART.log"
log() { echo "== $(date +%T) $*" | tee -a "$LOG"; }
# Every step's output, stderr included, goes to the part's log (and the tail of it to the
# caller); a step that runs past its share is stopped and the part goes on to its targets.
step() { local limit=$1; shift; timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
         local rc=${PIPESTATUS[0]}; [ "$rc" = 0 ] || log "step exited $rc: $*"; return "$rc"; }
[ "$PROVIDERS" = cpu ] || nvidia-smi --query-gpu=name,driver_version,memory.total \
  --format=csv,noheader | tee -a "$LOG"
"$PY" -c "import onnxruntime as o; print('onnxruntime', o.__version__, o.get_available_providers())" \
  | tee -a "$LOG"
BENCH=("$PY" -m app bench --duration-s "$DURATION" --no-ceiling --no-single-call)

case "$PART" in
preflight)
  log "preflight: the shipped model on $PROVIDERS, fp32 and fp16: providers, graphs per bucket"
  step 50 "$PY" docs/performance/gpu_preflight.py "$OUT" --providers "$PROVIDERS" \
    --service-args "$EXTRA_ARGS"
  exit $?
  ;;
n)
  # Targets: c=64 >= 3x the CUDA peer; c=16 p99 <= 3x p50; no request over 1 s; CUDA and a
  # graph in every bucket; fp16 AP within 0.005. The front end alone (instant engine) says
  # whether this small model on this GPU is bounded by the service's front end.
  log "bench: shipped D-FINE-N 320 on $PROVIDERS, the plain peer, the front end alone"
  step 150 "${BENCH[@]}" --concurrency 1,16,64 --no-engine-ceiling --front-end \
    --service-args "--providers $PROVIDERS $EXTRA_ARGS" --peer-providers "$PROVIDERS" --out "$OUT/n"
  log "eval: fp32 against fp16 on the model card's 500 held-out images"
  [ -f data/shapes/val/annotations.json ] || \
    step 40 "$PY" -m models.synthetic --out data/shapes --train 0 --val 500 --seed 0
  step 60 "$PY" -m app eval --data data/shapes/val --model models/dfine_n_shapes.onnx \
    --providers "$PROVIDERS" --compare-precision fp16 --concurrency 16 \
    --out "$OUT/n-eval-fp16.json"
  ;;
l)
  # Targets: c=64 >= 0.9x the engine ceiling (best bucket), GPU busy >= 85 %, fp16 >= 1.8x
  # the fp32 images/s, c=1 p50 <= 10 ms with fp16; CUDA and a graph in every bucket.
  variant=${L_VARIANT:-l} size=${L_SIZE:-640}
  model="/tmp/dfine_$variant$size.onnx"
  log "export: D-FINE-$variant $size, random weights"
  [ -f "$model" ] || step 60 "$PY" -m models.export --variant "$variant" \
    --input-size "$size" --out "$model"
  for precision in fp32 fp16; do
    log "bench: D-FINE-$variant $size $precision, engine ceiling by bucket"
    step 180 "${BENCH[@]}" --model "$model" --concurrency 1,64 --no-peer \
      --service-args "--providers $PROVIDERS --precision $precision $EXTRA_ARGS" --out "$OUT/l-$precision"
  done
  ;;
f)
  # Issue 26: FRONTENDS auto (one front end per 4 cores, 2 to 8, and one engine process)
  # against one process, the shipped model on the GPU and with the engine taken out, at c=16
  # and 64 (the bench's CPU per request covers every process of the service).
  for frontends in 1 0; do
    log "bench: shipped D-FINE-N 320 on $PROVIDERS, FRONTENDS=$frontends (0: auto)"
    step 110 "${BENCH[@]}" --concurrency 16,64 --no-peer --no-engine-ceiling --front-end \
      --service-args "--providers $PROVIDERS --frontends $frontends $EXTRA_ARGS" \
      --out "$OUT/f-$frontends"
  done
  ;;
s)
  # Issue 27: how many live 640x480 10 fps cameras the shipped model keeps up with on the GPU
  # (MAX_BATCH_SIZE auto: the cameras' frames share runs), lag p50/p99, CPU per frame.
  log "bench-streams: shipped D-FINE-N 320 on $PROVIDERS"
  step 230 "$PY" -m app.bench.streams --streams 4,8,16,32,64 --warmup-s 3 --seconds 10 \
    --service-args "--providers $PROVIDERS $EXTRA_ARGS" --out "$OUT/s.json"
  ;;
*) echo "unknown part $PART: preflight, n, l, f or s"; exit 2 ;;
esac
log "targets"
"$PY" docs/performance/gpu_targets.py "$OUT" "$PART" 2>&1 | tee -a "$LOG"
