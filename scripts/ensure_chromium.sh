#!/usr/bin/env bash
# Debian's chromium for tests/test_report_browser.py (the report's page in a real browser), called by
# `make test`. Does nothing when chromium is on PATH. Never fails the test target: where chromium cannot
# be installed (not root, no apt-get, the package registry unreachable) it says so, and the browser test
# is skipped with that reason.
set -u
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "ensure_chromium: chromium is missing and installing it needs root and apt-get; the browser test will be skipped" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
install() { timeout 600 apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1; }
# A fresh machine may have empty package lists: update them only when the first try fails.
if install || { timeout 300 apt-get update -q >/dev/null 2>&1 && install; }; then
    echo "ensure_chromium: installed $(chromium --version 2>/dev/null)" >&2
else
    echo "ensure_chromium: apt-get could not install chromium; the browser test will be skipped" >&2
fi
exit 0
