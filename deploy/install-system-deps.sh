#!/usr/bin/env bash
# Installs the Debian packages tinyfleet needs, only those missing, without recommends
# (with recommends the ARM toolchain pulls ~3.3 GB). Needs root or sudo when something is missing.
# PYTHON (default python3.11) is the interpreter the Makefile builds .venv with: when it, or
# its venv module (Debian splits ensurepip out), is missing, its packages are added too.
set -euo pipefail

PYTHON="${PYTHON:-python3.11}"
PACKAGES=(redis-server mosquitto mosquitto-clients gcc-arm-none-eabi libnewlib-arm-none-eabi
          qemu-system-arm postgresql gcc libc6-dev chromium)

missing=()
for pkg in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$pkg")
    fi
done
if ! command -v "$PYTHON" >/dev/null; then
    missing+=("${PYTHON##*/}" "${PYTHON##*/}-venv")
elif ! "$PYTHON" -c "import ensurepip, venv" 2>/dev/null; then
    missing+=("${PYTHON##*/}-venv")
fi
[ ${#missing[@]} -eq 0 ] && exit 0

echo "installing Debian packages: ${missing[*]}"
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -q
$SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
