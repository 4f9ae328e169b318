#!/usr/bin/env bash
# Set up medsearch in ./.venv (idempotent). `scripts/setup.sh test` adds what the tests need, and
# Debian's chromium for the browser tests (tests/web/test_page.py) and Orthanc with its DICOMweb plugin for
# the PACS tests (tests/pacs), with apt-get, when run as root.
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
if [[ -n "$extras" ]] && ! command -v chromium >/dev/null 2>&1; then
    # Playwright drives Debian's chromium: `playwright install` downloads browsers, which this setup never does.
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq chromium >/dev/null
    else
        echo "chromium is not installed: the browser tests need it (as root: apt-get install chromium)" >&2
    fi
fi
if [[ -n "$extras" ]] && { ! command -v Orthanc >/dev/null 2>&1 || ! ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1; }; then
    # The PACS tests (tests/pacs) start their own Orthanc with the DICOMweb plugin; the packaged system
    # service, if the package starts one, is not used.
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null
    else
        echo "Orthanc is not installed: the PACS tests need it (as root: apt-get install orthanc orthanc-dicomweb)" >&2
    fi
fi
echo "medsearch is installed in .venv ($(.venv/bin/python -c 'import medsearch; print(medsearch.__version__)'))" >&2
