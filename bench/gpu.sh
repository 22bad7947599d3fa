#!/usr/bin/env bash
# One unattended run of the GPU benchmarks on a CUDA host, under 9 minutes on one GPU:
#   env        torch, CUDA, nvidia-smi                                   -> env.json
#   sampler    models.slots.generate eager vs the compiled step (CUDA graphs) at the
#              checkpoint's sampling defaults (cfg 1.5), batch 1..1,024, peak GPU memory,
#              the reference sampler at batch 1 and 8                    -> sampler.json
#   tokenizer  frozen (TorchScript) vs eager VQ-VAE outputs on CUDA      -> tokenizer.json
#   canvas     landscapes canvases of 1/4, 1 and 4 megapixels, the first streamed row, mnist
#              latency beside a canvas, the step's share of the GPU's matmul rate -> canvas.json
#   serve_*    the server on CUDA, /generate at 1, 32, 128 and 256 clients, compiled step
#              off and on (TAMING_COMPILE), generate slots 64 and 1,024  -> serve_*.json
#   util       nvidia-smi utilisation every 200 ms beside the whole run  -> util.json
# Every step runs under its own timeout (capped by what is left of the run's limit) and writes
# its JSON as it goes; steps.jsonl records each step's status; the summary table (images/s at
# saturation beside the GPU utilisation of the same window) is printed last -> summary.json.
# The exit status is 0 when every step finished in time.
#
#   bash bench/gpu.sh            on a CUDA host, from anywhere; results in $OUT or bench/results/gpu
#   bash bench/gpu.sh --smoke    every step on the CPU at tiny sizes (under 2 minutes on 2 cores),
#                                the same files in $OUT or bench/results/gpu-smoke
#
# PY picks the interpreter (default: .venv/bin/python, else python3). A host that lacks the
# web stack gets it from the offline wheelhouse (bench/gpu_deps.sh; `make gpu-wheels` builds it).
set -uo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  *) echo "usage: bash bench/gpu.sh [--smoke]" >&2; exit 2 ;;
esac
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ "$SMOKE" = 1 ]; then
  DEST=${OUT:-bench/results/gpu-smoke}
  DEVICE=cpu; LIMIT_S=${GPU_RUN_LIMIT_S:-115}
  BATCHES=1,4,8; REF=1; TOK_BATCHES=1,8; REPEAT=1; COMPILE_BUDGET=30; SAMPLER_SLOTS=8
  CLIENTS=1,2; WARMUP=0.5; DURATION=1; SLOTS=4; CANVAS_GRIDS=17,34; CANVAS_BASELINE=17
  SERVER_ENV=()
  # one torch thread in the benchmark processes: on a shared small box a second OpenMP thread
  # waits at every barrier for a core (the server sets its own threads)
  export OMP_NUM_THREADS=1
  # about 60 s in all on an idle 2-core box; a step's limit leaves room for a busy one
  B_ENV=30; B_SAMPLER=60; B_TOK=40; B_EAGER=45; B_COMPILED=45; B_CANVAS=90
else
  DEST=${OUT:-bench/results/gpu}
  DEVICE=cuda; LIMIT_S=${GPU_RUN_LIMIT_S:-510}
  BATCHES=1,8,64,256,1024; REF=1,8; TOK_BATCHES=1,64,1024; REPEAT=0
  # the compiled sampler runs the server's lane at 1,024 slots (2,048 rows, padded sizes):
  # the graphs it builds can be in inductor's on-disk cache when that server starts
  COMPILE_BUDGET=100; SAMPLER_SLOTS=1024
  CLIENTS=1,32,128,256; WARMUP=1; DURATION=3; SLOTS="64 1024"; CANVAS_GRIDS=64,128,256; CANVAS_BASELINE=24
  SERVER_ENV=(--env TAMING_DEVICE=cuda)
  # step limits; the run's limit caps each one at what is left (typical need in brackets:
  # env [10], sampler [40 + 10-25 per compiled size], tokenizer [20], eager server [35],
  # compiled server [35 + 10-25 per padded size not yet in the cache])
  B_ENV=60; B_SAMPLER=150; B_TOK=45; B_EAGER=45; B_COMPILED=120; B_CANVAS=90
fi
RESERVE_S=8  # kept back for the table
mkdir -p "$DEST"
rm -f "$DEST"/{env,sampler,tokenizer,canvas,util,summary}.json "$DEST"/serve_*.json "$DEST"/steps.jsonl \
  "$DEST"/*.log
START=$(date +%s)
echo "gpu.sh: $([ "$SMOKE" = 1 ] && echo "smoke run on the CPU" || echo "CUDA run"), results in $DEST," \
     "at most ${LIMIT_S} s"

# The server's web stack: the host's own, else the wheelhouse (never the network).
if ! "$PY" -c 'import torch, numpy, fastapi, uvicorn, pydantic_settings, prometheus_client, safetensors, PIL' \
     2>/dev/null; then
  # shellcheck source=bench/gpu_deps.sh
  source bench/gpu_deps.sh
  gpu_deps "$PY" || { echo "gpu.sh: the serving packages are missing (see bench/gpu_deps.sh)" >&2; exit 1; }
fi

# step NAME BUDGET_S COMMAND...: runs under min(BUDGET_S, what the run has left), logs to
# NAME.log, appends its status to steps.jsonl. A failed or timed-out step does not end the run.
step() {
  local name=$1 budget=$2
  shift 2
  local left=$(( START + LIMIT_S - RESERVE_S - $(date +%s) ))
  local limit=$(( budget < left ? budget : left ))
  local status rc t0 tenths
  t0=$(date +%s%N)
  if [ "$limit" -lt 5 ]; then
    status=skipped; rc=-1
    echo "=== $name: skipped (${left} s left)"
  else
    echo "=== $name (limit ${limit} s)"
    # timeout signals the whole process group: a benchmark's server goes with it
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$DEST/$name.log"
    rc=${PIPESTATUS[0]}
    case $rc in
      0) status=ok ;;
      124|137) status=timeout ;;
      *) status=failed ;;
    esac
  fi
  tenths=$(( ($(date +%s%N) - t0) / 100000000 ))
  printf '{"step": "%s", "status": "%s", "rc": %d, "seconds": %d.%d, "limit_s": %d}\n' \
    "$name" "$status" "$rc" $((tenths / 10)) $((tenths % 10)) "$limit" >> "$DEST/steps.jsonl"
}

"$PY" bench/gpu_checks.py util --out "$DEST/util.json" &
UTIL_PID=$!
stop_util() {
  if [ -n "${UTIL_PID:-}" ]; then
    kill -TERM "$UTIL_PID" 2>/dev/null
    wait "$UTIL_PID" 2>/dev/null
    UTIL_PID=
  fi
}
trap stop_util EXIT

SMOKE_FLAG=()
[ "$SMOKE" = 1 ] && SMOKE_FLAG=(--smoke)
step env "$B_ENV" "$PY" bench/gpu_checks.py env "$DEST" "${SMOKE_FLAG[@]}"
if [ "$SMOKE" = 0 ] && ! grep -q '"cuda_available": true' "$DEST/env.json" 2>/dev/null; then
  echo "gpu.sh: torch sees no CUDA device; bash bench/gpu.sh --smoke runs on the CPU" >&2
  exit 1
fi

REPEAT_FLAG=()
[ "$REPEAT" != 0 ] && REPEAT_FLAG=(--repeat "$REPEAT")
step sampler "$B_SAMPLER" "$PY" bench/sampler.py --device "$DEVICE" --batch-sizes "$BATCHES" \
  --reference-sizes "$REF" --slots "$SAMPLER_SLOTS" --budget-s "$COMPILE_BUDGET" "${REPEAT_FLAG[@]}" \
  --out "$DEST/sampler.json"

step tokenizer "$B_TOK" "$PY" bench/gpu_checks.py tokenizer --device "$DEVICE" \
  --batch-sizes "$TOK_BATCHES" --out "$DEST/tokenizer.json"

# canvases run eager (their step is), so the server starts without compiling
step canvas "$B_CANVAS" "$PY" bench/canvas.py --device "$DEVICE" --grids "$CANVAS_GRIDS" \
  --compile false --ready-timeout "$B_CANVAS" --baseline-side "$CANVAS_BASELINE" \
  --out "$DEST/canvas.json"

# /generate only, one model, no batching-off baseline and no in-process ceiling (the sampler
# step is that): eager and compiled side by side at each slot count, the costliest last.
for slots in $SLOTS; do
  for mode in eager compiled; do
    compile=$([ "$mode" = compiled ] && echo true || echo false)
    budget=$([ "$mode" = compiled ] && echo "$B_COMPILED" || echo "$B_EAGER")
    step "serve_${mode}_slots${slots}" "$budget" "$PY" bench/serve.py --ops generate \
      --clients "$CLIENTS" --warmup "$WARMUP" --duration "$DURATION" --no-baseline --no-ceiling \
      --device "$DEVICE" --ready-timeout "$budget" "${SERVER_ENV[@]}" --env TAMING_MODELS=mnist \
      --env TAMING_COMPILE="$compile" --env TAMING_GENERATE_SLOTS="$slots" \
      --out "$DEST/serve_${mode}_slots${slots}.json"
  done
done

stop_util
echo "gpu.sh: $(( $(date +%s) - START )) s in all"
"$PY" bench/gpu_checks.py table "$DEST" || exit 1
# the exit status says whether every step finished in time
! grep -qv '"status": "ok"' "$DEST/steps.jsonl"
