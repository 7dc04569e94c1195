#!/usr/bin/env bash
# One command on a fresh machine: install what is needed, start the model server on the embedded
# default model (or $MODEL), wait until it is ready, then serve the OpenAI API on $PORT (8000).
# Ctrl-C drains: both layers refuse new requests, finish those in flight (up to SHUTDOWN_GRACE_S,
# 30 s), then stop; a second Ctrl-C stops at once.
set -euo pipefail
cd "$(dirname "$0")"
scripts/ensure_venv.sh requirements.txt
# Each layer runs in its own session, so the terminal's Ctrl-C reaches only this script, which passes
# one SIGTERM to each (the drain); a second Ctrl-C passes another (stop now).
setsid deployment/server-llm.sh &
backend_pid=$!
api_pid=
stop() {
  kill -TERM $api_pid $backend_pid 2>/dev/null || true
  # `wait` returns early when a signal arrives; wait until both have really exited.
  while kill -0 $api_pid 2>/dev/null || kill -0 $backend_pid 2>/dev/null; do wait 2>/dev/null || sleep 0.2; done
}
trap 'echo "draining (Ctrl-C again to stop at once) ..." >&2; trap "kill -TERM $api_pid $backend_pid 2>/dev/null" INT TERM; stop; exit 130' INT TERM
trap 'kill -TERM $api_pid $backend_pid 2>/dev/null || true' EXIT
setsid deployment/api-server.sh &
api_pid=$!
# Exit (and stop the other) as soon as either process ends.
wait -n $backend_pid $api_pid
