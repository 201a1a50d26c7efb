#!/usr/bin/env bash
# make setup: the virtual environment, the pinned requirements, and Debian's Fashion-MNIST.
set -euo pipefail
venv=${VENV:-.venv}
fmnist=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! cmp -s requirements.txt "$venv/.requirements.installed"; then
  echo "setup: installing requirements.txt into $venv (torch is large: a few minutes)"
  "$venv/bin/pip" install --disable-pip-version-check -q -r requirements.txt
  cp requirements.txt "$venv/.requirements.installed"
fi

if [ ! -f "$fmnist" ]; then
  echo "setup: installing Debian's dataset-fashion-mnist (the embedded benchmark)"
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && sudo_cmd="sudo"
  if ! command -v apt-get >/dev/null; then
    echo "setup: error: $fmnist is missing and apt-get is absent; install the Fashion-MNIST idx files there by hand" >&2
    exit 2
  fi
  # An empty package list (fresh container) knows no packages: update it first.
  if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then
    $sudo_cmd apt-get update -q || true
  fi
  if ! $sudo_cmd apt-get install -y -q dataset-fashion-mnist; then
    $sudo_cmd apt-get update -q || true
    $sudo_cmd apt-get install -y -q dataset-fashion-mnist || {
      echo "setup: error: could not install dataset-fashion-mnist; run 'sudo apt-get install dataset-fashion-mnist' and retry" >&2
      exit 2
    }
  fi
fi
