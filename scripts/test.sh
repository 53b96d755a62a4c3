#!/usr/bin/env bash
# Runs every test: builds the C++ library and its GoogleTest units (ctest), installs the Python
# package, then runs pytest. Installs what it needs first (apt and pip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_system_deps.sh
python3 -m pip install -q -r requirements-test.txt
jobs=$(nproc)
cmake -S . -B build/ctest -G Ninja -DACCELCORE_CUDA="${ACCELCORE_CUDA:-AUTO}" -DACCELCORE_BUILD_TESTS=ON
cmake --build build/ctest -j "$jobs"
ctest --test-dir build/ctest --output-on-failure -j "$jobs"
python3 -m pip install -q --no-build-isolation .
python3 -m pytest tests/python -q "$@"
