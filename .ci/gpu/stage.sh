#!/usr/bin/env bash
# The GPU check, one stage per call, on the GPU machine, from the repository
# root, with dist/ (built here by .ci/gpu/wheel.sh) carried along:
#   bash .ci/gpu/stage.sh 0    a first look at all three in about 2 minutes (9 at
#                              most), for a session with little device time:
#                              the CUDA tests, the grid against cuDNN in fp32
#                              and bf16, memcheck on the persistent kernels, an
#                              Nsight Compute profile of the persistent kernels,
#                              where a call's time goes (kernels against wall time)
#   bash .ci/gpu/stage.sh 1    the test suite's CUDA tests, on the persistent kernels and
#                              on the per-step path
#   bash .ci/gpu/stage.sh 2    compute-sanitizer memcheck and racecheck on every CUDA kernel
#   bash .ci/gpu/stage.sh 3    fastrnn against cuDNN: the MNIST models' shapes and the grid,
#                              every precision; the MNIST training step
#   bash .ci/gpu/stage.sh 4    MNIST training runs (carry mnist-gz/, the four .gz files)
# Each stage finishes well inside 8 minutes and writes its results under $OUT
# (at most 8 files come back): summary.txt plus the stage's own files.
set -uo pipefail
cd "$(dirname "$0")/../.."
STAGE=${1:?usage: stage.sh 0|1|2|3|4}
OUT=${OUT:-/tmp/fastrnn-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0
note() { printf '\n=== %s (%ss)\n' "$1" "$SECONDS" | tee -a "$OUT/summary.txt"; }

note "stage $STAGE: machine and install"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  date -u; } 2>&1 | tee -a "$OUT/summary.txt"
# The wheel goes beside the machine's torch, without its dependencies (torch is there).
$PY -m pip install -q --no-deps --no-index --target /tmp/fastrnn-site dist/fastrnn-*.whl \
  >> "$OUT/summary.txt" 2>&1 || { echo "INSTALL FAILED" | tee -a "$OUT/summary.txt"; exit 1; }
export PYTHONPATH=/tmp/fastrnn-site
$PY -c "import torch, fastrnn; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'fastrnn', fastrnn.__version__, 'CUDA kernels', fastrnn.HAS_CUDA); assert fastrnn.HAS_CUDA" \
  2>&1 | tee -a "$OUT/summary.txt" || exit 1

case "$STAGE" in
0)
  # Every CUDA test but torch.compile's (stage 1's), over 8 processes where pytest-xdist is there.
  note "the CUDA tests but torch.compile's"
  timeout 170 $PY -m pytest tests -q -rs -p no:cacheprovider -m "not slow" -k "cuda and not compile" \
    $($PY -c "import xdist" 2>/dev/null && echo "-n 8") \
    --junitxml "$OUT/tests.xml" > "$OUT/tests.log" 2>&1 || status=1
  tail -15 "$OUT/tests.log" | tee -a "$OUT/summary.txt"
  note "fastrnn against cuDNN, the grid, fp32 and bf16"
  timeout 150 $PY benchmarks/cuda_shapes.py --repeats 10 --precisions fp32 bf16 \
    --markdown "$OUT/cuda_shapes.md" --json "$OUT/cuda_shapes.json" 2>&1 | tee -a "$OUT/summary.txt" \
    || status=1
  note "compute-sanitizer memcheck, persistent kernels"
  FASTRNN_CUDA_PERSISTENT=1 timeout 80 compute-sanitizer --tool memcheck --error-exitcode 9 \
    $PY .ci/gpu/sanitize_case.py > "$OUT/sanitizer.log" 2>&1 \
    || { status=1; echo "memcheck (persistent) FAILED" | tee -a "$OUT/summary.txt"; }
  tail -2 "$OUT/sanitizer.log" | tee -a "$OUT/summary.txt"
  note "Nsight Compute: where the persistent kernels' steps spend their time"
  timeout 90 ncu --kernel-name-base demangled --kernel-name regex:persistent --launch-count 6 \
    --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats \
    --section SourceCounters \
    $PY .ci/gpu/profile_case.py > "$OUT/ncu.txt" 2>&1 || { status=1; echo "ncu FAILED" | tee -a "$OUT/summary.txt"; }
  grep -E "persistent|Duration|Warp Cycles Per Issued|Stall" "$OUT/ncu.txt" | head -20 | tee -a "$OUT/summary.txt"
  note "where a call's time goes: kernels against wall time, fastrnn and cuDNN"
  timeout 60 $PY .ci/gpu/where_time_goes.py > "$OUT/where.txt" 2>&1 || { status=1; echo "where_time_goes FAILED" | tee -a "$OUT/summary.txt"; }
  grep -E "^## |^host|^cublas" "$OUT/where.txt" | tee -a "$OUT/summary.txt"
  ;;
1)
  # Twice: as installed (persistent kernels where W_hh fits on chip), then every layer on
  # the per-step path (FASTRNN_CUDA_PERSISTENT=0).
  for path in persistent per-step; do
    note "CUDA tests, $path"
    FASTRNN_CUDA_PERSISTENT=$([ $path = persistent ] && echo 1 || echo 0) \
      timeout 220 $PY -m pytest tests -q -rs -p no:cacheprovider -m "not slow" -k cuda \
      --junitxml "$OUT/tests-$path.xml" > "$OUT/tests-$path.log" 2>&1 || status=1
    tail -3 "$OUT/tests-$path.log" | tee -a "$OUT/summary.txt"
  done
  ;;
2)
  note "compute-sanitizer (memcheck, racecheck) on every CUDA kernel"
  for tool in memcheck racecheck; do
    for path in persistent stepwise; do
      echo "--- $tool, $path kernels" >> "$OUT/sanitizer.log"
      FASTRNN_CUDA_PERSISTENT=$([ $path = persistent ] && echo 1 || echo 0) \
        timeout 100 compute-sanitizer --tool $tool --error-exitcode 9 \
        $PY .ci/gpu/sanitize_case.py $([ $tool = racecheck ] && echo --quick) >> "$OUT/sanitizer.log" 2>&1 \
        || { status=1; echo "$tool ($path) FAILED" | tee -a "$OUT/summary.txt"; }
      tail -2 "$OUT/sanitizer.log" | tee -a "$OUT/summary.txt"
    done
  done
  ;;
3)
  note "fastrnn against cuDNN"
  timeout 300 $PY benchmarks/cuda_shapes.py --markdown "$OUT/cuda_shapes.md" --json "$OUT/cuda_shapes.json" \
    2>&1 | tee -a "$OUT/summary.txt" || status=1
  timeout 120 $PY benchmarks/bench.py --device cuda --budget-s 0.3 --json "$OUT/bench_cuda.json" \
    --markdown "$OUT/bench_cuda.md" > /dev/null 2>> "$OUT/summary.txt" || status=1
  timeout 60 $PY benchmarks/mnist_step.py --device cuda --markdown "$OUT/mnist_step.md" \
    2>&1 | tee -a "$OUT/summary.txt" || status=1
  ;;
4)
  note "MNIST training on the GPU, both implementations side by side"
  # MNIST's four .gz files carried in mnist-gz/ (git-ignored), decompressed where torchvision reads.
  mkdir -p /tmp/mnist/MNIST/raw
  for f in mnist-gz/*.gz; do gunzip -c "$f" > "/tmp/mnist/MNIST/raw/$(basename "$f" .gz)"; done
  for preset in relu-1x100 tanh-2x256 lstm-2x128; do
    timeout 150 $PY benchmarks/mnist_train.py --preset "$preset" --device cuda --data-dir /tmp/mnist \
      2>&1 | grep -v "^epoch" | tee -a "$OUT/summary.txt" || status=1
  done
  ;;
*)
  echo "unknown stage $STAGE" >&2; exit 2
  ;;
esac
note "stage $STAGE done, status $status"
exit $status
