"""fastrnn.LSTM / GRU vs torch.nn.LSTM / GRU on the CPU: the MNIST notebook's shape and a small grid.

Three contenders, in one process, on identical weights and inputs: torch's module (for LSTM
in float32 torch runs oneDNN's fused LSTM, forward and backward), fastrnn with its per-step
path (one BLAS GEMM per step and the cell's pointwise pass, FASTRNN_CPU_FUSED=0) and fastrnn
with the fused recurrence kernels (csrc/cpu/recurrence.h). Runs are interleaved (in a
shuffled order each round) after a warm-up; --stat min on a loaded machine. --autocast runs
all three under torch.autocast("cpu", dtype) (the RNN's cells, tanh and relu, can be added
with --cells); under bfloat16 more contenders are the fused kernels with their products
on bfloat16 pairs (FASTRNN_CPU_BF16_PRODUCTS=1: on CPUs with AVX512-BF16; the default on
AMD's and on those with AMX, where they run on AMX tiles), on CPUs with AMX the pairs on
vdpbf16ps instead of tiles (FASTRNN_CPU_AMX=0), and with float32 products (=0).

    python benchmarks/cpu_cells.py [--threads N] [--repeats N] [--stat median|min]
                                   [--cells lstm gru tanh relu] [--shapes NAME ...]
                                   [--autocast bfloat16|float16] [--markdown FILE]
"""

import argparse

import torch

from harness import (emit, has_amx, machine, make_step, time_interleaved, twin_rnns, with_env,
                     with_fused)

INPUT = 28
# (name, layers, hidden, batch, steps, bidirectional, packed): the notebook's model first
# (examples/mnist_rnn.py, lstm-2x128: batch 64, 28 rows of 28 pixels), then around it.
SHAPES = [
    ("notebook-2x128-B64", 2, 128, 64, 28, False, False),
    ("1x64-B1", 1, 64, 1, 28, False, False),
    ("1x64-B128-T128", 1, 64, 128, 128, False, False),
    ("1x256-B16", 1, 256, 16, 28, False, False),
    ("1x512-B64", 1, 512, 64, 28, False, False),
    ("2x256-B32-bi", 2, 256, 32, 28, True, False),
    ("1x128-B64-T64-packed-bi", 1, 128, 64, 64, True, True),
]
CONTENDERS = ["torch", "fastrnn per-step", "fastrnn fused"]


def inputs_for(batch, steps, packed):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, steps, INPUT, generator=g)
    if not packed:
        return (x,)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[0] = steps
    return (torch.nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True,
                                                    enforce_sorted=False),)


def under_autocast(step, dtype):
    """`step` under CPU autocast to `dtype` (None: as it is)."""
    if dtype is None:
        return step

    def run():
        with torch.autocast("cpu", dtype=getattr(torch, dtype)):
            return step()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--stat", choices=["median", "min"], default="median")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--cells", nargs="*", default=["lstm", "gru"])
    parser.add_argument("--shapes", nargs="*", help="only these shapes (names as in the table)")
    parser.add_argument("--passes", nargs="*", default=["fwd+bwd", "inference"])
    parser.add_argument("--autocast", choices=["bfloat16", "float16"],
                        help="every contender under torch.autocast('cpu', dtype)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    contenders = list(CONTENDERS)
    pairs = args.autocast == "bfloat16"
    # (name, FASTRNN_CPU_BF16_PRODUCTS, FASTRNN_CPU_AMX) of the fused kernel's variants
    variants = []
    if pairs:
        variants.append(("fastrnn fused, bfloat16 products", "1", None))
        if has_amx():
            variants.append(("fastrnn fused, bfloat16 products on vdpbf16ps", "1", "0"))
        variants.append(("fastrnn fused, float32 products", "0", None))
    contenders += [name for name, _, _ in variants]
    rows = []
    for cell in args.cells:
        for name, layers, hidden, batch, steps, bi, packed in SHAPES:
            if args.shapes and name not in args.shapes:
                continue
            ref, fast = twin_rnns(INPUT, hidden, layers, cell, bidirectional=bi,
                                  batch_first=True)
            inputs = inputs_for(batch, steps, packed)
            for kind in args.passes:
                backward = kind == "fwd+bwd"
                fast_step = make_step(fast, inputs, backward)
                steps_ = [make_step(ref, inputs, backward), with_fused(fast_step, False),
                          with_fused(fast_step, True)]
                for _, products, amx in variants:
                    step = with_env(with_fused(fast_step, True), "FASTRNN_CPU_BF16_PRODUCTS", products)
                    steps_.append(with_env(step, "FASTRNN_CPU_AMX", amx) if amx else step)
                times = time_interleaved([under_autocast(f, args.autocast) for f in steps_],
                                         repeats=args.repeats)
                rows.append((cell, name, kind, [t[args.stat] for t in times]))
                ts = rows[-1][3]
                print(f"{cell} {name} {kind}: " + " ".join(f"{t * 1e3:.2f}" for t in ts),
                      flush=True)

    lines = [
        f"{machine()}, "
        f"input={INPUT}, batch_first, "
        f"{'autocast ' + args.autocast if args.autocast else 'float32'}, "
        f"{args.stat} of {args.repeats} interleaved runs; ms",
        "",
        "| cell | shape | pass | " + " | ".join(contenders) + " | fused vs torch | fused vs per-step |"
        + (" bfloat16 vs float32 products |" if pairs else ""),
        "|---|---|---|" + "---|" * len(contenders) + "---|---|" + ("---|" if pairs else ""),
    ]
    for cell, name, kind, ts in rows:
        cells = " | ".join(f"{t * 1e3:.2f}" for t in ts)
        lines.append(f"| {cell} | {name} | {kind} | {cells} | {ts[0] / ts[2]:.2f}x | "
                     f"{ts[1] / ts[2]:.2f}x |" + (f" {ts[-1] / ts[3]:.2f}x |" if pairs else ""))
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
