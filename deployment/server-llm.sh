#!/usr/bin/env bash
# Starts the model server (backend/). Configure with env vars (see README): MODEL, BACKEND_PORT,
# BACKEND_HOST, CTX_SIZE, N_PARALLEL, THREADS, CHAT_TEMPLATE, MODEL_NAME, MODEL_CACHE, PRESET,
# MEDUSA_HEADS, MEDUSA_TREE. Flags pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
exec "$PY" -m backend "$@"
