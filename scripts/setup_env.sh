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

# The simulator renders headless with MUJOCO_GL=osmesa, which needs libOSMesa (Debian/Ubuntu).
if ! ldconfig -p 2>/dev/null | grep -q libOSMesa && command -v apt-get >/dev/null; then
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO="sudo"; else SUDO="unavailable"; fi
    if [ "$SUDO" = "unavailable" ]; then
        echo "libosmesa6 is missing and this user cannot install it; the simulator cannot render." >&2
    else
        $SUDO apt-get update -qq && $SUDO apt-get install -y -qq libosmesa6
    fi
fi
