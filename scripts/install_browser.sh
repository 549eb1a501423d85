#!/usr/bin/env bash
# The browser that tests/test_demo.py drives: Debian's chromium and chromium-driver, installed with apt-get when
# missing (CI runs as root on a fresh Debian machine; elsewhere through sudo). Without apt-get it says what to do
# and leaves the test to fail with the same advice (or to be skipped with MAMBAOUT_SKIP_BROWSER_TEST=1).
set -euo pipefail

if command -v chromedriver >/dev/null \
        && { command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "install_browser.sh: no apt-get here: install Chromium and its chromedriver yourself for the demo's browser" \
         "test, or set MAMBAOUT_SKIP_BROWSER_TEST=1 to skip it" >&2
    exit 0
fi
as_root=()
if [ "$(id -u)" -ne 0 ]; then
    as_root=(sudo)
fi
echo "install_browser.sh: installing chromium and chromium-driver (apt-get)"
"${as_root[@]}" apt-get update -qq
"${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium \
    chromium-driver >/dev/null
