#!/usr/bin/env bash
# Two builds of fastrnn's CUDA kernels against each other on the GPU machine, from the
# repository root: the wheels in dist-base/ and dist/ (each built on a CPU machine by
# .ci/gpu/wheel.sh at its revision; carry both folders), installed side by side;
# benchmarks/cuda_shapes.py runs under each in alternating processes (AB_ROUNDS each,
# default 3, so that a drift of the machine's clocks falls on both), and the medians of
# fastrnn's times are compared per shape. Each process's median is listed too: at a
# quarter of a millisecond a call the host's time differs between processes by tens of
# percent, and where the two builds' ranges overlap the difference is marked as noise.
# Results under $OUT: ab.md, and each run's JSON.
#   [AB_ROUNDS=5] bash .ci/gpu/ab.sh [cuda_shapes.py arguments, e.g. --shapes ... --precisions fp32]
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/fastrnn-gpu-ab}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
for build in base new; do
  wheel=$([ $build = base ] && echo dist-base || echo dist)
  $PY -m pip install -q --no-deps --no-index --target /tmp/fastrnn-$build $wheel/fastrnn-*.whl || exit 1
done
for round in $(seq "${AB_ROUNDS:-3}"); do
  for build in base new; do
    PYTHONPATH=/tmp/fastrnn-$build timeout 150 $PY benchmarks/cuda_shapes.py --repeats 10 \
      --json "$OUT/$build-$round.json" "$@" > /dev/null 2>&1 || echo "$build run $round FAILED"
  done
done
$PY - "$OUT" <<'PY' | tee "$OUT/ab.md"
import glob, json, statistics, sys
out = sys.argv[1]
times = {}
for build in ("base", "new"):
    for path in sorted(glob.glob(f"{out}/{build}-*.json")):
        for r in json.load(open(path)):
            times.setdefault((r["precision"], r["shape"], r["pass_"]), {}).setdefault(build, []).append(r["fastrnn_ms"])
print("| precision | shape | pass | base ms | new ms | new vs base | base, each process | new, each process |")
print("|---|---|---|---|---|---|---|---|")
for (precision, shape, pass_), t in times.items():
    if len(t) == 2:
        base, new = statistics.median(t["base"]), statistics.median(t["new"])
        apart = max(t["new"]) < min(t["base"]) or max(t["base"]) < min(t["new"])
        each = [" ".join(f"{x:.3f}" for x in t[b]) for b in ("base", "new")]
        print(f"| {precision} | {shape} | {pass_} | {base:.3f} | {new:.3f} | {base / new:.2f}x"
              f"{'' if apart else ' (noise)'} | {each[0]} | {each[1]} |")
PY
