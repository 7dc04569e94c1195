#!/usr/bin/env bash
# One command on a fresh machine: install what is needed, start the model server on the embedded
# default model (or $MODEL), wait until it is ready, then serve the OpenAI API on $PORT (8000).
# Ctrl-C stops both.
set -euo pipefail
cd "$(dirname "$0")"
scripts/ensure_venv.sh requirements.txt
deployment/server-llm.sh &
backend_pid=$!
trap 'kill $backend_pid 2>/dev/null; wait $backend_pid 2>/dev/null' EXIT
trap 'exit 130' INT TERM
deployment/api-server.sh &
api_pid=$!
trap 'kill $api_pid $backend_pid 2>/dev/null; wait $api_pid $backend_pid 2>/dev/null' EXIT
# Exit (and stop the other) as soon as either process ends.
wait -n $backend_pid $api_pid
