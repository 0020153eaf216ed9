#!/usr/bin/env bash
# One-command set-up on a fresh Debian / Raspberry Pi OS / Ubuntu machine:
#   mosquitto (apt), the real MicroPython interpreter for tests (npm),
#   and the gateway, tools and test dependencies in .venv (pip).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto mosquitto-clients)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
# ops tests: the web view in a real browser, promtool for the alert rules (Debian's prometheus)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
# perf: a C compiler and the Python headers, for the gateway's compiled modules (setup.py, Cython);
# without them pip installs the gateway as pure Python (slower, same results)
command -v gcc >/dev/null 2>&1 || need_apt+=(gcc)
python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  >/dev/null 2>&1 || need_apt+=(python3-dev)
# sinks: the collector's PostgreSQL backend test starts a throwaway server (Debian's postgresql)
ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || need_apt+=(postgresql)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: apt-get install ${need_apt[*]}"
  $SUDO apt-get update
  $SUDO apt-get install -y "${need_apt[@]}"
fi

echo "setup: npm (MicroPython WebAssembly interpreter)"
npm ci --no-audit --no-fund --loglevel=error

echo "setup: python venv in .venv"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
echo "setup: done. Tests: .venv/bin/python -m pytest"
