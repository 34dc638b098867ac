#!/usr/bin/env bash
# Builds the C++ library with CMake against the active venv's libtorch and runs its ctest.
# Usage: .ci/cpp_test.sh [BUILD_DIR]
set -euo pipefail
B=${1:-$PWD/cmake-build}
cd "$(dirname "$0")/.."
cmake -S . -B "$B" -DCMAKE_PREFIX_PATH="$(python -c 'import torch; print(torch.utils.cmake_prefix_path)')"
cmake --build "$B" -j2
ctest --test-dir "$B" --output-on-failure
