#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the CUDA build (sm_80 and sm_90) with every C++ test, the
# CUDA test under compute-sanitizer memcheck, and the Python package built with CUDA generating
# text (installed into the active Python environment: the CLI tests run it without PYTHONPATH),
# then pytest on the host's best CPU kernels (GPU hosts often have AVX-512, VNNI or AMX where
# the development machine may not; in parallel where pytest-xdist is installed). Needs cmake,
# ninja, nvcc, GoogleTest and nlohmann-json (give their prefix in CMAKE_PREFIX_PATH where they
# are not system packages), the test requirements, and the stories260K model
# (ACCELCORE_TEST_MODEL, default ../shared/models/stories260K). Logs go to $OUT if set.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/accelcore-gpu-check}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
export ACCELCORE_TEST_MODEL=${ACCELCORE_TEST_MODEL:-$PWD/../shared/models/stories260K}
B=/tmp/accelcore-gpu-build
T0=$(date +%s)
nvidia-smi -L; nvcc --version | tail -1
echo "cpu: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $(nproc) cores," \
  "$(grep -m1 -o -wE 'avx512f|avx512_vnni|avx_vnni|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
cmake -S . -B $B -G Ninja -DCMAKE_BUILD_TYPE=Release -DACCELCORE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES="80;90" \
  -DCMAKE_PREFIX_PATH="${CMAKE_PREFIX_PATH:-}" -DPython_EXECUTABLE="$(command -v python3)" > "$OUT/configure.log" 2>&1 \
  || { tail -30 "$OUT/configure.log"; exit 1; }
cmake --build $B -j"$(nproc)" > "$OUT/build.log" 2>&1 || { grep -E "error" -A3 "$OUT/build.log" | head -40; exit 1; }
echo "build: $(( $(date +%s) - T0 )) s"
ctest --test-dir $B -j"$(nproc)" --output-on-failure > "$OUT/ctest.log" 2>&1; rc=$?
grep -E "tests passed|tests failed|Failed|Skipped" "$OUT/ctest.log" | head -20
$B/tests/cpp/cuda_test --gtest_filter='CudaBackend.*' 2>&1 | tail -3
compute-sanitizer --tool memcheck $B/tests/cpp/cuda_test --gtest_filter='CudaBackend.Saxpy' 2>&1 | tail -2 || rc=1
python3 -m pip install -q --no-build-isolation --no-deps . -C build-dir=$B-py \
  -C cmake.define.ACCELCORE_CUDA=ON -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=80;90" \
  -C "cmake.define.CMAKE_PREFIX_PATH=${CMAKE_PREFIX_PATH:-}" > "$OUT/pip.log" 2>&1 || { tail -20 "$OUT/pip.log"; rc=1; }
python3 -c "
import accelcore as a, sys
print('python: cuda_compiled', a.cuda_compiled(), 'cuda_available', a.cuda_available(), 'cpu isa', a.cpu_isa())
e = a.Engine(sys.argv[1], num_threads=4)
print(e.generate(['Once upon a time'], a.SamplingParams(max_tokens=24, temperature=0.0))[0].text)
sys.exit(0 if a.cuda_available() else 1)
" "$ACCELCORE_TEST_MODEL" || rc=1
xdist=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
python3 -m pytest tests/python -q -p no:cacheprovider $xdist > "$OUT/pytest.log" 2>&1 || rc=1
tail -5 "$OUT/pytest.log"
echo "gpu check rc=$rc, $(( $(date +%s) - T0 )) s"
exit $rc
