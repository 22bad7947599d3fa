#!/usr/bin/env bash
# Load with the ecosystem's tool: Triton's perf_analyzer on <model>-generate (the Open
# Inference Protocol, /v2) at several concurrencies, then the project's own load generator
# (bench/serve.py) on POST /generate at the same concurrencies, in the same run. Both send one
# image a request (perf_analyzer: LABEL [1] and SEED [1] from a data file of random classes and
# seeds; bench/serve.py: n=1, a random class and seed), closed-loop. Not a test.
#
#   PERF_ANALYZER="perf_analyzer" bash bench/perf_analyzer.sh [CONCURRENCIES] [MODEL]
#
# PERF_ANALYZER is the command that runs the binary (pip's perf-analyzer wheel ships it; where
# the host's C library is older than the wheel's, a loader prefix: see BENCHMARKS.md).
set -euo pipefail
cd "$(dirname "$0")/.."
LEVELS=${1:-1,4,16}
MODEL=${2:-mnist}
PA=${PERF_ANALYZER:-perf_analyzer}
PY=${PY:-.venv/bin/python}
OUT=bench/results
mkdir -p "$OUT"
PORT=$($PY -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
DATA=$(mktemp)
$PY - "$DATA" <<'PYEOF'
import json, random, sys
rng = random.Random(0)
rows = [{"LABEL": [rng.randrange(10)], "SEED": [rng.randrange(2**31)]} for _ in range(2000)]
json.dump({"data": rows}, open(sys.argv[1], "w"))
PYEOF
HOST=127.0.0.1 PORT=$PORT TAMING_LOG_LEVEL=warning $PY -m service 2>/dev/null &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null; rm -f "$DATA"' EXIT
for _ in $(seq 240); do
  $PY -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/v2/health/ready')" \
    2>/dev/null && break
  sleep 0.5
done
lo=${LEVELS%%,*}; hi=${LEVELS##*,}
echo "== perf_analyzer: $MODEL-generate, concurrency $LEVELS"
for c in ${LEVELS//,/ }; do
  $PA -m "$MODEL-generate" -u "127.0.0.1:$PORT" -i http --input-data "$DATA" \
    --shape LABEL:1 --shape SEED:1 --concurrency-range "$c" --measurement-interval 8000 \
    --percentile 50 -f "$OUT/perf_analyzer_c$c.csv" | sed -n '/Request concurrency/,$p'
done
kill -TERM $SERVER; wait $SERVER 2>/dev/null || true
trap 'rm -f "$DATA"' EXIT
echo "== bench/serve.py: POST /generate, clients $LEVELS"
$PY bench/serve.py --model "$MODEL" --ops generate --clients "$LEVELS" --no-baseline \
  --no-ceiling --duration 8 --out "$OUT/serve_generate_protocols.json"
