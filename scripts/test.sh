#!/usr/bin/env bash
# Run the tests (arguments go to pytest). As root, where `unshare` exists, pytest runs in a private network
# namespace with only the loopback interface up: the services and the browser that tests start can reach
# nothing but each other (tests/web/test_page.py drives Chromium, which otherwise reaches for outside services).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "$(id -u)" == 0 ]] && command -v unshare >/dev/null 2>&1; then
    exec unshare -n sh -c 'ip link set lo up && exec .venv/bin/python -m pytest "$@"' sh "$@"
fi
exec .venv/bin/python -m pytest "$@"
