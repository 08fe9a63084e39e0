#!/usr/bin/env bash
# Debian's chromium for tests/test_html_report.py's browser test (headless screenshot).
# Idempotent: does nothing when chromium is already on PATH. Needs root (CI containers are).
set -euo pipefail
command -v chromium >/dev/null && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "install_chromium.sh: chromium is missing and this is not root; run: sudo apt-get install -y chromium" >&2
    exit 1
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
