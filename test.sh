#!/usr/bin/env bash
# One command: install test dependencies, then run unit, engine, end-to-end and client-compatibility
# tests. Extra arguments go to pytest (e.g. ./test.sh -k chat).
set -euo pipefail
cd "$(dirname "$0")"
scripts/ensure_venv.sh requirements-test.txt
# The preset test converts a Hugging Face checkpoint with llama.cpp's converter, in its own venv.
VENV="$PWD/.venv-convert" scripts/ensure_venv.sh requirements-convert.txt
exec .venv/bin/python -m pytest "$@"
