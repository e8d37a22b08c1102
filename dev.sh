#!/usr/bin/env bash
# Set up the project in .venv and run something in it.
#   bash dev.sh up      prepare the default corpus, train with a simulated fleet, serve the demo
#   bash dev.sh test    run the whole test suite
#   bash dev.sh setup   only install
#   bash dev.sh peers   install Flower and pfl-research, each in its own .venv-peers/*, for benchmarks/vs_peers.py
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

peers() {
  # Each peer in an environment of its own (.venv-peers/flower, .venv-peers/pfl): the same CPU torch first, held by
  # a constraint so that no peer swaps it for another build; then the peer; then this project, so that the peer's
  # clients train this project's model on its phones. The project comes last and on its own because a single
  # resolve is impossible: flwr 1.42 pins fastapi<0.139 (this project needs >=0.165) and pfl 0.6 pins
  # dp-accounting<0.6 (this project's jax-privacy 2 needs 0.6). pip then reports those conflicts (an ERROR line it
  # does not exit on); neither matters to the benchmark (Flower's simulation serves no HTTP, and pfl's privacy
  # accountants are not used).
  local pin=.venv-peers/torch-pin.txt name
  mkdir -p .venv-peers
  echo "torch==2.13.0" > "$pin"
  declare -A wanted=([flower]="flwr[simulation]>=1.42" [pfl]="pfl[pytorch]>=0.6")
  for name in flower pfl; do
    local python=".venv-peers/$name/bin/python"
    # Reinstall only when the project's requirements or the peer's change.
    local stamp=".venv-peers/$name/.installed-$(cat pyproject.toml <(echo "${wanted[$name]}") | sha256sum | cut -c1-16)"
    [ -f "$stamp" ] && continue
    [ -x "$python" ] || "$PYTHON" -m venv ".venv-peers/$name"
    "$python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    "$python" -m pip install --quiet --disable-pip-version-check torch==2.13.0
    "$python" -m pip install --quiet --disable-pip-version-check -c "$pin" "${wanted[$name]}"
    "$python" -m pip install --quiet --disable-pip-version-check -c "$pin" -e .
    # The C++ training kernel, built once per environment now rather than inside the first measured round.
    "$python" -c 'import sys; from keyboard_model.native import cifg_kernel; sys.exit(cifg_kernel() is None)' || true
    echo "$name: $("$python" -m pip list 2>/dev/null | grep -iE '^(flwr|pfl|ray|torch) ' | tr -s ' ' | paste -sd ' ' -)"
    rm -f ".venv-peers/$name"/.installed-*
    touch "$stamp"
  done
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
  peers) peers ;;
  up) setup; shift; exec .venv/bin/fedkb up "$@" ;;
  test) setup; browser; shift; exec .venv/bin/python -m pytest "$@" ;;
  *) echo "usage: bash dev.sh {up|test|setup|peers} [options]" >&2; exit 2 ;;
esac
