#!/usr/bin/env bash
# Usage: scripts/ensure_venv.sh REQUIREMENTS_FILE
# Creates .venv (Python 3.11+) if needed and installs the requirements file into it, skipping pip
# entirely when the same file was already installed. Prints nothing but pip's own progress.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
req="$root/$1"
venv="${VENV:-$root/.venv}"
py="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
fi
stamp="$venv/.installed-$(basename "$req")"
digest="$(cat "$req" "$root"/requirements*.txt | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$digest" ]; then
  echo "installing $(basename "$req") into $venv (llama-cpp-python compiles once: ~10 minutes on 2 cores)" >&2
  "$venv/bin/pip" install --progress-bar off -r "$req"
  echo "$digest" > "$stamp"
fi
