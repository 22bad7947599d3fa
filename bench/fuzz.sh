#!/usr/bin/env bash
# The larger fuzz run: every operation of the OpenAPI schema, valid and invalid cases, against
# the shipped checkpoints over a real socket (the suite runs 25 cases per operation and mode on
# tiny models). Usage: bash bench/fuzz.sh [CASES_PER_OPERATION_AND_MODE]   (default 500)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
FUZZ_CASES=${1:-500} FUZZ_MODELS=shipped "$PY" -m pytest tests/service/test_service_fuzz.py -q -s \
  -p no:cacheprovider 2>&1 | tee bench/results/fuzz.txt
