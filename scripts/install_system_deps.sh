#!/usr/bin/env bash
# Debian packages the C++ build needs: nlohmann-json (header-only JSON), GoogleTest (tests),
# a compiler and CMake. Skips what is already installed; needs root (or sudo) to install.
set -euo pipefail
pkgs=(g++ cmake ninja-build nlohmann-json3-dev libgtest-dev)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo"
echo "installing Debian packages: ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
