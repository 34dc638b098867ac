"""fastrnn.RNN vs torch.nn.RNN on the CPU, on the MNIST example's shapes (examples/mnist_rnn.py).

Both modules hold identical weights and see identical inputs; runs are
interleaved (A B B A ...) after a warm-up, and medians are reported. The FLOP
rate is compared with this machine's sgemm rate measured in the same run (the
best of repeated 2048^3 float32 GEMMs).

    python benchmarks/cpu_seed.py [--repeats N] [--markdown FILE]
"""

import argparse

import torch

from harness import make_step, rnn_flops, sgemm_peak, time_interleaved, twin_rnns

# (name, layers, nonlinearity, hidden, batch); all T = 28, input 28.
SEED_SHAPES = [
    ("relu-1x100", 1, "relu", 100, 128),
    ("tanh-2x256", 2, "tanh", 256, 64),
    ("tanh-2x128", 2, "tanh", 128, 100),
]
T, INPUT = 28, 28


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    peak = sgemm_peak()
    rows = []
    for name, layers, nl, hidden, batch in SEED_SHAPES:
        # batch_first, as the example feeds [batch, 28 rows, 28 pixels] images.
        ref, fast = twin_rnns(INPUT, hidden, layers, nl, batch_first=True)
        x = torch.randn(batch, T, INPUT)
        for backward in (True, False):
            ref_t, fast_t = time_interleaved(
                [make_step(ref, (x,), backward), make_step(fast, (x,), backward)],
                repeats=args.repeats)
            t_ref, t_fast = ref_t["median"], fast_t["median"]
            flops = rnn_flops(T, batch, INPUT, hidden, layers, backward=backward)
            rows.append((name, "fwd+bwd" if backward else "inference", t_ref * 1e3, t_fast * 1e3,
                         t_ref / t_fast, flops / t_ref / peak, flops / t_fast / peak))
        # The sgemm peak drifts with the machine's load: re-measure, keep the best.
        peak = max(peak, sgemm_peak(samples=3))

    lines = [
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"sgemm peak {peak / 1e9:.0f} GFLOP/s (best 2048^3), T={T}, input={INPUT}, "
        f"median of {args.repeats} interleaved runs",
        "",
        "| shape | pass | torch.nn.RNN ms | fastrnn ms | speedup | torch % of peak | fastrnn % of peak |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, kind, tr, tf, sp, er, ef in rows:
        lines.append(f"| {name} | {kind} | {tr:.2f} | {tf:.2f} | {sp:.2f}x | {er:.0%} | {ef:.0%} |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
