#!/usr/bin/env bash
# Runs every test: builds the C++ library and its GoogleTest units (ctest), installs the Python
# package, then runs pytest. Installs what it needs first (apt and pip).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_system_deps.sh
python3 -m pip install -q -r requirements-test.txt
jobs=$(nproc)
# The kernel benchmarks are built (not run) so that they keep compiling.
cmake -S . -B build/ctest -G Ninja -DACCELCORE_CUDA="${ACCELCORE_CUDA:-AUTO}" -DACCELCORE_BUILD_TESTS=ON -DACCELCORE_BUILD_BENCHMARKS=ON
cmake --build build/ctest -j "$jobs"
ctest --test-dir build/ctest --output-on-failure -j "$jobs"
# The same library and tests with CUDA off: the build a machine without nvcc gets.
if [ "${ACCELCORE_CUDA:-AUTO}" != "OFF" ]; then
  cmake -S . -B build/ctest-nocuda -G Ninja -DACCELCORE_CUDA=OFF -DACCELCORE_BUILD_TESTS=ON
  cmake --build build/ctest-nocuda -j "$jobs"
  ctest --test-dir build/ctest-nocuda --output-on-failure -j "$jobs"
fi
python3 -m pip install -q --no-build-isolation .
python3 -m pytest tests/python -q "$@"
# End to end on the scalar kernels too (the C++ units already cover every ISA kernel by kernel).
ACCELCORE_CPU_ISA=scalar python3 -m pytest tests/python -q -k "golden or batch or speculation" "$@"
