"""Peak memory of one inference call (torch.no_grad()), torch.nn's module against
fastrnn's, on the CPU.

Each measurement runs in a child process of its own, whose glibc returns every freed
block of 64 KiB or more to the OS, so that the peak resident set is what the call
allocates: the first full-size call after a tiny one (libraries loaded), so that
what fastrnn keeps between calls (csrc/scratch.h) counts.

    python benchmarks/inference_memory.py [--shapes LSTM-2x512-B64-T256 ...]
"""

import argparse
import json
import os
import subprocess
import sys

import torch

from harness import cpu_model, emit, peak_memory, twin_rnns

INPUT = 28
DEFAULT_SHAPES = ["RNN-2x512-B64-T256", "LSTM-2x512-B64-T256", "LSTM-1x256-B4-T256",
                  "LSTM-2x256-B64-T256-bi", "GRU-2x512-B64-T256"]


def parse(shape):
    """'LSTM-2x512-B64-T256[-bi]' -> (cell, layers, hidden, batch, steps, bidirectional)."""
    cell, size, batch, steps, *rest = shape.split("-")
    layers, hidden = map(int, size.split("x"))
    return cell, layers, hidden, int(batch[1:]), int(steps[1:]), rest == ["bi"]


def child(shape, which):
    """Peak MB of one inference call of `which` (0 torch.nn, 1 fastrnn) at `shape`."""
    cell, layers, hidden, batch, steps, bi = parse(shape)
    kind = {"RNN": "tanh", "LSTM": "lstm", "GRU": "gru"}[cell]
    module = twin_rnns(INPUT, hidden, layers, kind, bidirectional=bi, batch_first=True)[which]
    x = torch.randn(batch, steps, INPUT)
    with torch.no_grad():
        module(x[:2, :2])
        peak = peak_memory(lambda: module(x))
    return peak / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    lines = [f"{cpu_model()}, torch {torch.__version__}, input {INPUT}, batch_first, float32",
             "", "| shape | output MB | peak MB torch.nn | peak MB fastrnn |", "|---|---|---|---|"]
    for shape in args.shapes:
        cell, layers, hidden, batch, steps, bi = parse(shape)
        peaks = [json.loads(subprocess.run(
            [sys.executable, __file__, "--child", shape, str(which)], env=env, check=True,
            capture_output=True, text=True).stdout.strip().splitlines()[-1]) for which in (0, 1)]
        output = batch * steps * (2 if bi else 1) * hidden * 4 / 2**20
        lines.append(f"| {shape} | {output:.1f} | {peaks[0]:.1f} | {peaks[1]:.1f} |")
    emit(lines)


if __name__ == "__main__":
    main()
