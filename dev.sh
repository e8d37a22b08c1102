#!/usr/bin/env bash
# Set up the project in .venv and run something in it.
#   bash dev.sh up      prepare the default corpus, train with a simulated fleet, serve the demo
#   bash dev.sh test    run the whole test suite
#   bash dev.sh setup   only install
# Needs only Python 3.11 and pip; the browser tests also install Debian's chromium.
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3

setup() {
  if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
  fi
  # Reinstall only when the project's requirements change.
  local stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    .venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
    # The CPU build of torch first, pinned: an unpinned torch pulls a several-GB CUDA build.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
    # [ray]: the Ray executor's test starts a two-node Ray cluster on this machine.
    .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test,ray]'
    rm -f .venv/.installed-*
    touch "$stamp"
  fi
  # Compile the C++ training kernel now rather than in the middle of the first run (cached).
  .venv/bin/python -c 'import sys; from keyboard_model.native import cifg_kernel; sys.exit(cifg_kernel() is None)' || true
}

browser() {
  # Headless Chromium and its driver from Debian, for the web page's end-to-end tests.
  if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    return
  fi
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium chromium-driver >/dev/null
}

case "${1:-}" in
  setup) setup ;;
  up) setup; shift; exec .venv/bin/fedkb up "$@" ;;
  test) setup; browser; shift; exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: bash dev.sh {up|test|setup} [options]" >&2; exit 2 ;;
esac
