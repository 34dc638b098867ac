"""Per-call cost of a tiny RNN stack, torch.nn.RNN vs fastrnn.RNN.

At T=1, B=1, H=8 the arithmetic is negligible: what is timed is the fixed
cost of a module call (Python, the dispatcher, allocations, kernel launches)
and of its backward. Both modules hold identical weights; runs are
interleaved after a warm-up, and the median of many calls per run is
reported, in microseconds. A third contender, "autograd alone", is an
autograd.Function over the same weights, with the same outputs, that runs no
kernel: what autograd itself costs any module's call.

    python benchmarks/overhead.py [--repeats N] [--calls N] [--threads N] [--markdown FILE]
"""

import argparse

import torch

from harness import cpu_model, emit, make_step, time_interleaved, twin_rnns

SHAPES = [(1, 1, 8, 2, True), (28, 1, 8, 2, True)]  # T, B, H, layers, bidirectional


class _NoKernel(torch.autograd.Function):
    """A module call's autograd without its computation: the outputs and the weights'
    gradients are allocated, never computed."""

    @staticmethod
    def forward(ctx, x, output_shape, hidden_shape, *weights):
        ctx.weights = [(w.shape, w.dtype) for w in weights]
        return x.new_empty(output_shape), x.new_empty(hidden_shape)

    @staticmethod
    def backward(ctx, grad_output, grad_hidden):
        return (None, None, None, *(torch.empty(shape, dtype=dtype) for shape, dtype in ctx.weights))


class _AutogradAlone(torch.nn.Module):
    """`module`'s calls (the same weights, output shapes) through _NoKernel."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, x):
        m = self.module
        directions = 2 if m.bidirectional else 1
        output_shape = (*x.shape[:-1], directions * m.hidden_size)
        hidden_shape = (m.num_layers * directions, x.shape[1], m.hidden_size)
        return _NoKernel.apply(x, output_shape, hidden_shape, *m.parameters())


def batched(step, calls):
    def run():
        for _ in range(calls):
            step()
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=200, help="module calls per timed run")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lines = [
        f"{cpu_model()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
        f"input 8, median of {args.repeats} interleaved runs of {args.calls} calls",
        "",
        "| T | B | H | layers | bidirectional | pass | torch.nn.RNN us | fastrnn us | speedup "
        "| autograd alone us |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for steps, batch, hidden, layers, bidir in SHAPES:
        ref, fast = twin_rnns(8, hidden, layers, bidirectional=bidir)
        x = torch.randn(steps, batch, 8)
        for backward in (False, True):
            times = time_interleaved(
                [batched(make_step(m, (x,), backward), args.calls)
                 for m in (ref, fast, _AutogradAlone(fast))],
                repeats=args.repeats)
            t_ref, t_fast, t_alone = (t["median"] / args.calls * 1e6 for t in times)
            lines.append(f"| {steps} | {batch} | {hidden} | {layers} | {bidir} | "
                         f"{'fwd+bwd' if backward else 'forward'} | {t_ref:.1f} | {t_fast:.1f} | "
                         f"{t_ref / t_fast:.2f}x | {t_alone:.1f} |")
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
