#!/usr/bin/env bash
# Installs accelcore and everything it needs on a fresh Debian machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_system_deps.sh
python3 -m pip install -q "tokenizers>=0.15" "scikit-build-core>=0.10" "nanobind>=2.4" "cmake>=3.24" ninja
python3 -m pip install -q --no-build-isolation .
