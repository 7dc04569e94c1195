#!/usr/bin/env bash
# Starts the API layer (app/) once the model server answers /health. Configure with env vars (see
# README): PORT, HOST, BACKEND_URLS or BACKEND_URL or BACKEND_PORT, MAX_BATCH_SIZE, MAX_WAIT_MS, MAX_QUEUE,
# API_KEY. It waits for the (first) model server; WAIT_FOR_BACKEND=0 starts at once (requests get 503
# until a model is ready; with several, those that come up later join as the router finds them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
url="${BACKEND_URLS:-}"
url="${url%%,*}"
url="${url:-${BACKEND_URL:-http://127.0.0.1:${BACKEND_PORT:-8001}}}"
if [ "${WAIT_FOR_BACKEND:-1}" != "0" ]; then
  echo "waiting for the model server at $url ..." >&2
  "$PY" -m common.wait_ready "$url"
fi
exec "$PY" -m app "$@"
