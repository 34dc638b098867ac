"""fastrnn.RNN vs torch.nn.RNN on the CPU, on the MNIST example's shapes (examples/mnist_rnn.py) and a long one.

Four contenders, in one process, on identical weights and inputs: torch.nn.RNN, fastrnn
with its per-step BLAS recurrence (FASTRNN_CPU_FUSED=0), fastrnn with the fused
recurrence kernel (csrc/cpu/recurrence.h), and the same fused kernels called as the raw ops
(torch.ops.fastrnn.rnn and rnn_backward, no module and no autograd: what a module call
adds is the difference). Runs are interleaved (shuffled each round) after a
warm-up, and medians are reported. FLOP rates are compared with this machine's sgemm rate
measured in the same run (the best of repeated 2048^3 float32 GEMMs, re-measured between
shapes, best kept): on a shared machine only ratios within one run mean anything.

    python benchmarks/cpu_shapes.py [--repeats N] [--markdown FILE] [--shapes NAME ...]
                                    [--onednn LIB]

--onednn adds oneDNN's vanilla RNN primitive, from a library built from
benchmarks/onednn_rnn.cpp (see there), as a raw primitive like the raw ops; oneDNN is not a
dependency of fastrnn.
"""

import argparse
import ctypes

import torch

from harness import (emit, machine, make_step, rnn_flops, sgemm_peak, time_interleaved,
                     twin_rnns, with_fused)

# (name, layers, nonlinearity, hidden, batch, steps); input 28.
SHAPES = [
    ("relu-1x100", 1, "relu", 100, 128, 28),
    ("tanh-2x256", 2, "tanh", 256, 64, 28),
    ("tanh-2x128", 2, "tanh", 128, 100, 28),
    ("tanh-1x512-T128", 1, "tanh", 512, 64, 128),
]
INPUT = 28
CONTENDERS = ["torch.nn.RNN", "fastrnn per-step", "fastrnn fused", "fastrnn raw ops"]


def raw_op_step(module, x, backward):
    """fastrnn's ops on module's weights, as fastrnn.RNN calls them for batch_first x [B, T, I]
    but without the module and autograd: the forward op (and the backward op)."""
    layers, hidden, nl = module.num_layers, module.hidden_size, module.nonlinearity
    xt = x.transpose(0, 1)  # the time-major view the module hands the op
    hx = torch.zeros(layers, x.shape[0], hidden)
    weights = [w.detach() for w in module._flat_weights]
    config = (True, layers, 0.0, module.training, False, nl)
    forward, backward_op = torch.ops.fastrnn.rnn.default, torch.ops.fastrnn.rnn_backward.default
    out, h_n, _ = forward(xt, hx, weights, *config, None)
    grad_out, grad_h = torch.ones_like(out), torch.ones_like(h_n)

    def step():
        out, h_n, reserve = forward(xt, hx, weights, *config, None)
        if backward:
            backward_op(xt, hx, weights, *config, None, out, reserve, grad_out, grad_h, False, True)
    return step


def onednn_contender(lib, layers, nl, hidden, batch, steps, backward):
    """A step running oneDNN's RNN primitives on this shape (weights already in its layout)."""
    lib.onednn_rnn_create.restype = ctypes.c_void_p
    lib.onednn_rnn_run.argtypes = [ctypes.c_void_p]
    handle = lib.onednn_rnn_create(steps, batch, INPUT, hidden, layers, int(nl == "relu"),
                                   int(backward))
    return lambda: lib.onednn_rnn_run(handle)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--shapes", nargs="*", help="only these shapes (names as in the table)")
    parser.add_argument("--onednn", help="a library built from benchmarks/onednn_rnn.cpp")
    parser.add_argument("--stat", choices=["median", "min"], default="median",
                        help="min: on a loaded machine, the runs least disturbed")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # Loaded after torch, so that oneDNN's libgomp.so.1 is torch's (one OpenMP runtime).
    onednn = ctypes.CDLL(args.onednn) if args.onednn else None
    contenders = CONTENDERS + (["oneDNN 3.x RNN"] if onednn else [])

    torch.manual_seed(0)
    peak = sgemm_peak()
    rows = []
    for name, layers, nl, hidden, batch, steps in SHAPES:
        if args.shapes and name not in args.shapes:
            continue
        # batch_first, as the example feeds [batch, 28 rows, 28 pixels] images.
        ref, fast = twin_rnns(INPUT, hidden, layers, nl, batch_first=True)
        x = torch.randn(batch, steps, INPUT)
        for backward in (True, False):
            fast_step = make_step(fast, (x,), backward)
            steps_ = [make_step(ref, (x,), backward), with_fused(fast_step, False),
                      with_fused(fast_step, True), raw_op_step(fast, x, backward)]
            if onednn:
                steps_.append(onednn_contender(onednn, layers, nl, hidden, batch, steps, backward))
            times = time_interleaved(steps_, repeats=args.repeats)
            flops = rnn_flops(steps, batch, INPUT, hidden, layers, backward=backward)
            rows.append((name, "fwd+bwd" if backward else "inference",
                         [t[args.stat] for t in times], flops))
        # The sgemm peak drifts with the machine's load: re-measure, keep the best.
        peak = max(peak, sgemm_peak(samples=3))

    lines = [
        f"{machine()}, "
        f"sgemm peak {peak / 1e9:.0f} GFLOP/s (best 2048^3), input={INPUT}, "
        f"{args.stat} of {args.repeats} interleaved runs; ms (% of the sgemm peak)",
        "",
        "| shape | pass | " + " | ".join(contenders) + " | fused vs torch | fused vs per-step |"
        + (" fused vs oneDNN | raw ops vs oneDNN |" if onednn else ""),
        "|---|---|" + "---|" * len(contenders) + "---|---|" + ("---|---|" if onednn else ""),
    ]
    for name, kind, ts, flops in rows:
        cells = " | ".join(f"{t * 1e3:.2f} ({flops / t / peak:.0%})" for t in ts)
        line = f"| {name} | {kind} | {cells} | {ts[0] / ts[2]:.2f}x | {ts[1] / ts[2]:.2f}x |"
        if onednn:
            line += f" {ts[4] / ts[2]:.2f}x | {ts[4] / ts[3]:.2f}x |"
        lines.append(line)
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
