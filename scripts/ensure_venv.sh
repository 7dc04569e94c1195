#!/usr/bin/env bash
# Usage: [GPU=cuda] scripts/ensure_venv.sh REQUIREMENTS_FILE
# Creates .venv (Python 3.11+) if needed and installs the requirements file into it, skipping pip
# entirely when the same file was already installed. Prints nothing but pip's own progress.
# GPU=cuda builds llama-cpp-python with CUDA (nvcc and cmake needed; CUDA_ARCHITECTURES, e.g. 90,
# narrows the build to one card's architecture) instead of reusing a cached CPU wheel; it rebuilds
# a CPU build already in the venv. Without GPU the CPU install is the default and unchanged.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
req="$root/$1"
venv="${VENV:-$root/.venv}"
py="${PYTHON:-python3}"
gpu="${GPU:-}"
case "$gpu" in
  ""|cpu) gpu="" ;;
  cuda) ;;
  *) echo "GPU must be 'cuda' or empty, not '$gpu'" >&2; exit 2 ;;
esac
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
fi
stamp="$venv/.installed-$(basename "$req")"
digest="$( (cat "$req" "$root"/requirements*.txt; echo "gpu=$gpu") | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  extra=()
  if [ "$gpu" = cuda ]; then
    arch="${CUDA_ARCHITECTURES:+ -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHITECTURES}"
    export CMAKE_ARGS="-DGGML_CUDA=on -DLLAVA_BUILD=OFF$arch ${CMAKE_ARGS:-}"
    extra=(--no-cache-dir)  # pip's wheel cache would hand back the CPU build
  fi
  echo "installing $(basename "$req") into $venv${gpu:+ (llama-cpp-python with $gpu)} (llama-cpp-python compiles once: ~10 minutes on 2 cores)" >&2
  "$venv/bin/pip" install --progress-bar off "${extra[@]}" -r "$req"
  pinned="$(grep -ho '^llama-cpp-python[^ ]*==[0-9.]*' "$req" "$root/requirements.txt" | head -1 | sed 's/\[.*\]//')"
  if [ "$gpu" = cuda ] && [ -n "$pinned" ] && ! ls "$venv"/lib/python3*/site-packages/llama_cpp/lib/libggml-cuda* >/dev/null 2>&1; then
    echo "rebuilding $pinned with CUDA (the venv held a CPU build)" >&2
    "$venv/bin/pip" install --progress-bar off --no-cache-dir --force-reinstall --no-deps "$pinned"
  fi
  echo "$digest" > "$stamp"
fi
