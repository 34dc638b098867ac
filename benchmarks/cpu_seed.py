"""fastrnn.RNN vs torch.nn.RNN on the CPU, on the seed notebooks' shapes.

Both modules hold identical weights and see identical inputs; runs are
interleaved (A B B A ...) after a warm-up, and medians are reported. The FLOP
rate is compared with this machine's sgemm rate measured in the same run (the
best of repeated 2048^3 float32 GEMMs).

    python benchmarks/cpu_seed.py [--repeats N] [--markdown FILE]
"""

import argparse
import copy
import statistics
import time

import torch

import fastrnn

# (name, layers, nonlinearity, hidden, batch); all T = 28, input 28.
SEED_SHAPES = [
    ("relu-1x100", 1, "relu", 100, 128),
    ("tanh-2x256", 2, "tanh", 256, 64),
    ("tanh-2x128", 2, "tanh", 128, 100),
]
T, INPUT = 28, 28


def sgemm_peak(samples=10, n=2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(samples):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def rnn_flops(layers, hidden, batch, backward):
    forward = sum(2 * T * batch * ((INPUT if l == 0 else hidden) * hidden + hidden * hidden)
                  for l in range(layers))
    return 3 * forward if backward else forward


def make_step(module, x, backward):
    params = list(module.parameters())
    if not backward:
        def step():
            with torch.no_grad():
                module(x)
        return step

    def step():
        out, h = module(x)
        torch.autograd.backward([out, h], [torch.ones_like(out), torch.ones_like(h)])
        for p in params:
            p.grad = None
    return step


def time_interleaved(steps, repeats, warmup=3):
    for step in steps:
        for _ in range(warmup):
            step()
    times = [[] for _ in steps]
    for r in range(repeats):
        order = range(len(steps)) if r % 2 == 0 else reversed(range(len(steps)))
        for i in order:
            t0 = time.perf_counter()
            steps[i]()
            times[i].append(time.perf_counter() - t0)
    return [(statistics.median(t), min(t), max(t)) for t in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()

    torch.manual_seed(0)
    peak = sgemm_peak()
    rows = []
    for name, layers, nl, hidden, batch in SEED_SHAPES:
        ref = torch.nn.RNN(INPUT, hidden, layers, nonlinearity=nl, batch_first=True)
        fast = fastrnn.convert(copy.deepcopy(ref))
        x = torch.randn(batch, T, INPUT)
        for backward in (True, False):
            (t_ref, *_), (t_fast, *_) = time_interleaved(
                [make_step(ref, x, backward), make_step(fast, x, backward)], args.repeats)
            flops = rnn_flops(layers, hidden, batch, backward)
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
