#!/usr/bin/env bash
# Creates .venv with everything the project needs on a fresh machine (called by `make`).
# torch is pinned to the CPU build this machine class carries; on a GPU machine install the
# matching CUDA build of the same torch version first and this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV=.venv

"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet torch==2.13.0
"$VENV/bin/pip" install --quiet -r requirements.txt
"$VENV/bin/pip" install --quiet --no-deps -e .
