"""fastrnn on the CPU with one of its switches set, against fastrnn as it is, in one process.

fastrnn's CPU kernels read their switches (environment variables, e.g.
FASTRNN_CPU_WEIGHT_PRODUCT=0 to hand the weight gradients back to BLAS) on every call, so
both contenders are the same module on the same weights and inputs, the switch set for
one and unset for the other (each through the same wrapper: harness.with_env). Runs alternate after a warm-up; medians are reported, with
the ratio switched / as it is (above 1: the default is faster). The shapes are the MNIST
example's (benchmarks/cpu_shapes.py), its LSTM and GRU, and a long one.

    python benchmarks/cpu_switch.py NAME=VALUE [--shapes NAME ...] [--passes fwd+bwd inference]
                                    [--repeats N] [--stat median|min] [--markdown FILE]
"""

import argparse

import torch

import fastrnn
from harness import emit, machine, make_step, time_interleaved, with_env

INPUT = 28
# (name, cell, layers, hidden, batch, steps)
SHAPES = [
    ("relu-1x100", "relu", 1, 100, 128, 28),
    ("tanh-2x256", "tanh", 2, 256, 64, 28),
    ("tanh-2x128", "tanh", 2, 128, 100, 28),
    ("lstm-2x128", "lstm", 2, 128, 64, 28),
    ("gru-2x128", "gru", 2, 128, 64, 28),
    ("tanh-1x512-T128", "tanh", 1, 512, 64, 128),
]


def module_for(cell, layers, hidden):
    torch.manual_seed(0)
    if cell == "lstm":
        return fastrnn.LSTM(INPUT, hidden, layers, batch_first=True)
    if cell == "gru":
        return fastrnn.GRU(INPUT, hidden, layers, batch_first=True)
    return fastrnn.RNN(INPUT, hidden, layers, nonlinearity=cell, batch_first=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("switch", help="NAME=VALUE, e.g. FASTRNN_CPU_WEIGHT_PRODUCT=0")
    parser.add_argument("--shapes", nargs="*", help="only these shapes (names as in the table)")
    parser.add_argument("--passes", nargs="*", default=["fwd+bwd", "inference"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--stat", choices=["median", "min"], default="median")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    name, _, value = args.switch.partition("=")
    if not name or not value:
        parser.error("the switch is NAME=VALUE")

    lines = [f"{machine()}, "
             f"{args.stat} of {args.repeats} alternating runs; ms", "",
             f"| shape | pass | as it is | {args.switch} | {args.switch} / as it is |",
             "|---|---|---|---|---|"]
    for shape, cell, layers, hidden, batch, steps in SHAPES:
        if args.shapes and shape not in args.shapes:
            continue
        module = module_for(cell, layers, hidden)
        x = torch.randn(batch, steps, INPUT, generator=torch.Generator().manual_seed(1))
        for pass_ in args.passes:
            step = make_step(module, (x,), pass_ == "fwd+bwd")
            default, switched = (r[args.stat] * 1e3 for r in time_interleaved(
                [with_env(step, name, None), with_env(step, name, value)], repeats=args.repeats))
            lines.append(f"| {shape} | {pass_} | {default:.3f} | {switched:.3f} | "
                         f"{switched / default:.3f}x |")
            print(lines[-1], flush=True)
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
