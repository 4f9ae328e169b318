#!/usr/bin/env bash
# Set up medsearch in ./.venv (idempotent). `scripts/setup.sh test` adds what the tests need.
#
# torch is pinned to 2.13.0: on the team's and CI's machines that is the CPU build already on disk;
# an unpinned torch can pull a multi-GB CUDA build. On a machine with a GPU, install the torch build
# you want first; the pin is only in this script, not in the package.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
extras=""
if [[ "${1:-}" == "test" ]]; then extras="[test]"; fi
if [[ ! -x .venv/bin/python ]]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "torch==2.13.0" -e ".${extras}"
echo "medsearch is installed in .venv ($(.venv/bin/python -c 'import medsearch; print(medsearch.__version__)'))" >&2
