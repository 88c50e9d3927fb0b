#!/usr/bin/env bash
# Set up CLUE Edge on a fresh Debian machine: system packages, a venv, torch (CPU wheel) and the package.
# Idempotent; run as root or with sudo available.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || need+=(mosquitto-clients)
[ -d /usr/share/datasets/fashion-mnist ] || need+=(dataset-fashion-mnist)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# The deploy tests check the units with systemd-analyze and the compose file with docker-compose
# (which validates without a Docker engine).
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
# The monitoring tests run a real Prometheus against the daemons and check the alert rules with promtool.
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ ${#need[@]} -gt 0 ]; then
    echo "setup: installing Debian packages: ${need[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
PY=.venv/bin/python
# torch first and pinned: a looser spec pulls a multi-GB CUDA build.
$PY -m pip install -q --upgrade pip
$PY -c 'import torch' >/dev/null 2>&1 || $PY -m pip install -q torch==2.13.0
$PY -m pip install -q -e '.[dev]'
echo "setup: ready ($($PY -c 'import torch; print("torch", torch.__version__)'))"
