#!/usr/bin/env bash
# The GPU check, on a machine with an NVIDIA GPU, from the repository root:
#   bash benchmarks/gpu_check.sh            (writes its report under $OUT)
# 1. builds fastrnn in place against that machine's torch (no internet: no build isolation),
# 2. runs the whole test suite (the CUDA tests and the CUDA half of the parity grid run there),
# 3. runs compute-sanitizer memcheck and racecheck on a small forward+backward,
# 4. runs the GPU benchmark (fastrnn vs cuDNN) with tf32 allowed and not,
# 5. trains the MNIST example's presets on the GPU where torchvision and the data are there.
# It writes only the eight files named below under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
PY=${PYTHON:-python3}
status=0
note() { printf '\n=== %s (%ss)\n' "$1" "$SECONDS" | tee -a "$OUT/summary.txt"; }

note "machine"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"; date -u; } \
  2>&1 | tee -a "$OUT/summary.txt"

note "build (in place, sm_90)"
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} FASTRNN_CUDA=1 \
  $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { echo "BUILD FAILED" | tee -a "$OUT/summary.txt"; tail -30 "$OUT/build.log"; exit 1; }
$PY -c "import fastrnn; assert fastrnn.HAS_CUDA; print('CUDA kernels loaded')" 2>&1 | tee -a "$OUT/summary.txt"

note "tests"
$PY -m pytest tests -q -rs -x -p no:cacheprovider --ignore tests/test_mnist_example.py \
  > "$OUT/tests.log" 2>&1 || status=1
tail -5 "$OUT/tests.log" | tee -a "$OUT/summary.txt"

note "compute-sanitizer (memcheck, racecheck)"
cat > /tmp/fastrnn_sanitize_case.py <<'PY'
import torch, fastrnn
from torch.nn.utils.rnn import pack_padded_sequence
torch.manual_seed(0)
for dtype in (torch.float32, torch.float16):
    for kw in (dict(num_layers=2, bidirectional=True), dict(nonlinearity="relu")):
        rnn = fastrnn.RNN(8, 32, **kw).cuda().to(dtype)
        x = torch.randn(6, 3, 8, device="cuda", dtype=dtype, requires_grad=True)
        for inp in (x, pack_padded_sequence(x, torch.tensor([6, 2, 4]), enforce_sorted=False)):
            out, h = rnn(inp)
            out = out.data if hasattr(out, "batch_sizes") else out
            (out.float().sum() + h.float().sum()).backward()
torch.cuda.synchronize()
print("sanitizer case ran")
PY
for tool in memcheck racecheck; do
  echo "--- $tool" >> "$OUT/sanitizer.log"
  compute-sanitizer --tool $tool --error-exitcode 9 $PY /tmp/fastrnn_sanitize_case.py \
    >> "$OUT/sanitizer.log" 2>&1 || { status=1; echo "$tool FAILED" | tee -a "$OUT/summary.txt"; }
  tail -2 "$OUT/sanitizer.log" | tee -a "$OUT/summary.txt"
done

note "benchmark (fastrnn vs cuDNN)"
# TF32 allowed (torch's default for cuDNN RNNs), then strict fp32 for both implementations.
$PY benchmarks/bench.py --device cuda --json "$OUT/bench_cuda.json" --markdown "$OUT/bench_cuda.md" \
  --plot "$OUT/bench_cuda.png" > /dev/null 2>>"$OUT/summary.txt" || status=1
$PY benchmarks/bench.py --device cuda --no-tf32 --markdown "$OUT/bench_cuda_strict.md" \
  > /dev/null 2>>"$OUT/summary.txt" || status=1
head -3 "$OUT/bench_cuda.md" | tee -a "$OUT/summary.txt"
$PY benchmarks/mnist_step.py --device cuda 2>&1 | tee -a "$OUT/summary.txt" || status=1

note "MNIST training on the GPU (full runs of every preset, both implementations)"
# Needs torchvision, and MNIST's four files, decompressed, in $MNIST_DATA/MNIST/raw/
# (default ./data, where python examples/mnist_rnn.py downloads them).
MNIST_DATA=${MNIST_DATA:-data}
if $PY -c "import torchvision" 2>/dev/null && [ -d "$MNIST_DATA/MNIST/raw" ]; then
  for preset in relu-1x100 tanh-2x128 tanh-2x256; do
    timeout 300 $PY benchmarks/mnist_train.py --preset "$preset" --device cuda --data-dir "$MNIST_DATA" 2>&1 \
      | grep -v "^epoch" | tee -a "$OUT/summary.txt" || status=1
  done
else
  echo "skipped: torchvision missing or no MNIST in $MNIST_DATA/MNIST/raw" | tee -a "$OUT/summary.txt"
fi

note "done, status $status"
exit $status
