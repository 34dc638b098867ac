"""Two builds of fastrnn against each other on the CPU, in alternating processes.

A change to the kernels that has no switch (cpu_switch.py) cannot be timed against the
code before it in one process: one process loads one build. Here each build is a
directory holding a `fastrnn` package (e.g. a copy of src/ with its _C.abi3.so); rounds
alternate a process of one with a process of the other, each timing every shape's
forward+backward (or inference) on the same weights and inputs (alternating runs after a
warm-up, median per process). Reported: each build's median over the rounds and the
ratio A / B per round (above 1: B is faster), whose median is the result; the spread
of the rounds is the machine's noise.

    python benchmarks/cpu_builds.py DIR_A DIR_B [--rounds N] [--repeats N] [--shapes NAME ...]
                                    [--pass fwd+bwd|inference] [--markdown FILE]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def child(build, shapes, backward, repeats):
    """Runs in the child process: medians in seconds per shape, as JSON on stdout."""
    sys.path.insert(0, build)
    import torch

    import fastrnn
    from cpu_switch import INPUT, SHAPES, module_for
    from harness import make_step, time_interleaved

    if not os.path.realpath(fastrnn.__file__).startswith(os.path.realpath(build)):
        raise SystemExit(f"fastrnn came from {fastrnn.__file__}, not from {build}")
    steps, names = [], []
    for shape, cell, layers, hidden, batch, length in SHAPES:
        if shapes and shape not in shapes:
            continue
        x = torch.randn(batch, length, INPUT, generator=torch.Generator().manual_seed(1))
        steps.append(make_step(module_for(cell, layers, hidden), (x,), backward))
        names.append(shape)
    times = time_interleaved(steps, repeats=repeats)
    print(json.dumps({n: t["median"] for n, t in zip(names, times)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build_a", help="a directory holding a fastrnn package")
    parser.add_argument("build_b")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=25, help="timed runs per shape and process")
    parser.add_argument("--shapes", nargs="*", help="only these shapes (cpu_switch.py's names)")
    parser.add_argument("--pass", dest="pass_", choices=["fwd+bwd", "inference"], default="fwd+bwd")
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    backward = args.pass_ == "fwd+bwd"
    if args.child:
        child(args.child, args.shapes, backward, args.repeats)
        return

    sys.path.insert(0, os.path.abspath(args.build_a))  # harness imports fastrnn: any build does
    from harness import cpu_model, emit

    def run(build):
        cmd = [sys.executable, os.path.abspath(__file__), args.build_a, args.build_b,
               "--child", os.path.abspath(build), "--repeats", str(args.repeats), "--pass", args.pass_]
        if args.shapes:
            cmd += ["--shapes", *args.shapes]
        env = dict(os.environ, PYTHONPATH=HERE)  # the build comes first, from sys.path
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"the process timing {build} failed:\n{done.stderr}")
        return json.loads(done.stdout.splitlines()[-1])

    a_runs, b_runs = [], []
    for r in range(args.rounds):
        a_runs.append(run(args.build_a))
        b_runs.append(run(args.build_b))
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr, flush=True)
    lines = [f"{cpu_model()}; {args.pass_}, {args.rounds} rounds of alternating processes, "
             f"each the median of {args.repeats} runs; ms",
             f"A = {args.build_a}, B = {args.build_b}", "",
             "| shape | A | B | A / B per round | A / B |", "|---|---|---|---|---|"]
    for shape in a_runs[0]:
        a, b = [run[shape] for run in a_runs], [run[shape] for run in b_runs]
        ratios = [x / y for x, y in zip(a, b)]
        lines.append(f"| {shape} | {statistics.median(a) * 1e3:.3f} | {statistics.median(b) * 1e3:.3f} | "
                     f"{' '.join(f'{q:.3f}' for q in ratios)} | {statistics.median(ratios):.3f}x |")
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
