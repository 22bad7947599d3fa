#!/usr/bin/env bash
# Makes the server's web stack importable on a host that lacks it, with no network: a bare
# CUDA host has torch and numpy but not fastapi, uvicorn, pydantic, ...
#
#   source bench/gpu_deps.sh && gpu_deps "$PY"   (bench/gpu.sh): exports PYTHONPATH
#   bash bench/gpu_deps.sh [PYTHON]              prints the PYTHONPATH to use
#
# When PYTHON cannot import the serving packages, or lacks a distribution that the
# wheelhouse's requirements.txt names, it installs them from the wheelhouse that
# `make gpu-wheels` builds (GPU_WHEELS, default wheels/gpu) into a private folder
# (GPU_DEPS_TARGET, default wheels/site/cpXY) with pip --no-index, and puts that folder first
# on PYTHONPATH. The host's own site-packages (torch, numpy) stay as they are. A Python without
# pip runs pip from the wheel in the wheelhouse. GPU_DEPS_FORCE=1 installs even when the
# imports work.

GPU_DEPS_MODULES="fastapi starlette pydantic pydantic_core pydantic_settings uvicorn httptools \
uvloop multipart prometheus_client safetensors PIL"

# PYTHON [REQUIREMENTS]: do the serving packages import, and is every distribution that
# the wheelhouse names installed (any version)?
_gpu_deps_ready() {
  "$1" - "$GPU_DEPS_MODULES" "${2:-}" 2>/dev/null <<'PYCHECK'
import importlib
import importlib.metadata as md
import sys

for module in sys.argv[1].split():
    importlib.import_module(module)
if sys.argv[2]:
    for line in open(sys.argv[2]):
        name = line.split("#")[0].split("==")[0].strip()
        if name:
            md.distribution(name)
PYCHECK
}

gpu_deps() {
  local py=${1:-python3}
  local root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  local wheels=${GPU_WHEELS:-$root/wheels/gpu}
  local reqs=""
  [ -f "$wheels/requirements.txt" ] && reqs=$wheels/requirements.txt
  if [ "${GPU_DEPS_FORCE:-0}" != 1 ] && _gpu_deps_ready "$py" "$reqs"; then
    return 0
  fi
  local tag target
  tag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])') || return 1
  target=${GPU_DEPS_TARGET:-$root/wheels/site/$tag}
  export PYTHONPATH="$target${PYTHONPATH:+:$PYTHONPATH}"
  if [ "${GPU_DEPS_FORCE:-0}" != 1 ] && [ -d "$target" ] && _gpu_deps_ready "$py" "$reqs"; then
    echo "gpu_deps: serving packages from $target" >&2
    return 0
  fi
  if [ -z "$reqs" ]; then
    echo "gpu_deps: $py cannot import the serving packages and $wheels holds no wheelhouse;" \
         "build one where PyPI is reachable (make gpu-wheels GPU_PYTHON=${tag:2:1}.${tag:3})" \
         "and copy it here" >&2
    return 1
  fi
  # pip from the interpreter, or from its own wheel (a wheel is a zip Python can run).
  local pip=("$py" -m pip)
  if ! "$py" -m pip --version >/dev/null 2>&1; then
    local whl
    whl=$(ls "$wheels"/pip-*.whl 2>/dev/null | head -n 1)
    [ -n "$whl" ] || { echo "gpu_deps: $py has no pip and $wheels no pip wheel" >&2; return 1; }
    pip=("$py" "$whl/pip")
  fi
  echo "gpu_deps: installing the serving packages from $wheels into $target (offline)" >&2
  rm -rf "$target"
  # No configuration file, no PIP_* variables, no index: only the wheels in the wheelhouse.
  PIP_CONFIG_FILE=/dev/null "${pip[@]}" install --isolated --no-index --find-links "$wheels" \
    --only-binary=:all: --disable-pip-version-check --no-warn-script-location --root-user-action=ignore --quiet \
    --target "$target" -r "$wheels/requirements.txt" >&2 || return 1
  _gpu_deps_ready "$py" "$reqs" || {
    echo "gpu_deps: installed into $target, yet $py still cannot import: $GPU_DEPS_MODULES" >&2
    return 1
  }
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  gpu_deps "${1:-python3}"
  echo "PYTHONPATH=${PYTHONPATH:-}"
fi
