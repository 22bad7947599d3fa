#!/usr/bin/env bash
# One prepared run of the GPU benchmarks for a lent H100/H200 (a few minutes in all):
#   1. sampler, eager, batch 1..1024 (images/s, peak memory), reference at 8 and 64;
#   2. sampler with torch.compile (mode reduce-overhead: CUDA graphs) at the same sizes;
#   3. the HTTP server on the GPU under load (/generate, /encode, /decode; batched vs
#      max_batch_size=1; in-process ceiling), shorter levels than on CPU.
# Results land in $OUT (or bench/results/gpu) as JSON; the table is printed last.
#   bash bench/gpu.sh          (from the repository root, with the venv or torch+deps installed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
DEST=${OUT:-bench/results/gpu}
mkdir -p "$DEST"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$DEST/gpu.txt"
"$PY" - <<'EOF'
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
EOF
SIZES=1,8,64,256,1024
timeout 240 "$PY" bench/sampler.py --device cuda --batch-sizes $SIZES --reference-sizes 8,64 \
  --out "$DEST/sampler_eager.json" | tee "$DEST/sampler_eager.txt"
timeout 300 "$PY" bench/sampler.py --device cuda --batch-sizes $SIZES --reference-sizes "" \
  --compile --out "$DEST/sampler_compiled.json" | tee "$DEST/sampler_compiled.txt" \
  || echo "compiled sampler run failed or timed out" | tee -a "$DEST/sampler_compiled.txt"
timeout 300 "$PY" bench/serve.py --duration 4 --warmup 1 --clients 1,32,128,512 \
  --max-batch-size 256 --env TAMING_DEVICE=cuda --env TAMING_MAX_QUEUE=4096 \
  --out "$DEST/serve.json" | tee "$DEST/serve.txt"
echo "=== sampler, eager";    tail -n 6 "$DEST/sampler_eager.txt"
echo "=== sampler, compiled"; tail -n 6 "$DEST/sampler_compiled.txt"
echo "=== server";            sed -n '/^op /,$p' "$DEST/serve.txt"
