#!/usr/bin/env bash
# Debian's Chromium for the browser tests (the HTML report, the `serve` page). Idempotent: does
# nothing where /usr/bin/chromium exists. Playwright drives it (never its own browser download).
set -euo pipefail
if [ -x "${CNNCODES_CHROMIUM:-/usr/bin/chromium}" ]; then exit 0; fi
if ! command -v apt-get >/dev/null; then
    echo "install-browser: no apt-get here; install Chromium and set CNNCODES_CHROMIUM to its path" >&2
    exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then sudo="sudo"; fi
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
