#!/usr/bin/env bash
# Builds the wheel that the GPU check installs on the GPU machine, here, on a
# CPU machine: cp39-abi3 on torch's stable ABI, so it runs under the GPU
# machine's own torch (>= 2.10) and Python (>= 3.9) with nothing built there.
#   bash .ci/gpu/wheel.sh            -> dist/fastrnn-*.whl (CUDA kernels for sm_80 and sm_90)
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf dist
FASTRNN_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"} \
  python -m pip wheel -q --no-deps --no-build-isolation -w dist .
# (the listing taken whole first: grep -q would close the pipe on unzip, and pipefail fail the check)
listing=$(unzip -l dist/fastrnn-*.whl)
[[ $listing == *_C_cuda* ]] || { echo "the wheel has no CUDA kernels" >&2; exit 1; }
ls -l dist
