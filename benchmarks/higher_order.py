"""Second-order autograd through fastrnn against torch.nn, side by side in one process.

A gradient penalty (the loss's gradient w.r.t. the input, made with create_graph=True, its
squared norm backpropagated to the parameters: WGAN-GP's critic step) and a Hessian-vector
product (torch.autograd.functional.hvp w.r.t. the input). fastrnn runs the forward on its
fused op, then recomputes it in fastrnn.reference's plain PyTorch ops to differentiate
twice; torch.nn runs its per-step ops throughout. Also the plain forward+backward, for
scale. Runs alternate after a warm-up; medians.

    python benchmarks/higher_order.py [--repeats N] [--markdown FILE]
"""

import torch

from harness import emit, machine, table_options, time_interleaved, twin_rnns

INPUT = 28
# (name, nonlinearity, layers, hidden, batch, steps): the MNIST example's shapes
SHAPES = [
    ("relu-1x100", "relu", 1, 100, 128, 28),
    ("tanh-2x128", "tanh", 2, 128, 100, 28),
]


def penalty_step(module, x):
    def step():
        x_ = x.detach().requires_grad_()
        out, h = module(x_)
        (gx,) = torch.autograd.grad(out[:, -1].sum() + h.sum(), x_, create_graph=True)
        gx.square().sum().backward()
    return step


def hvp_step(module, x):
    v = torch.randn_like(x)
    return lambda: torch.autograd.functional.hvp(lambda x: module(x)[1].square().sum(), x, v)


def plain_step(module, x):
    def step():
        out, h = module(x)
        (out[:, -1].sum() + h.sum()).backward()
    return step


def main():
    args = table_options(__doc__)
    lines = [f"{machine()}, "
             f"input={INPUT}, median of {args.repeats} interleaved runs; ms",
             "", "| shape | step | torch.nn | fastrnn | torch.nn / fastrnn |", "|---|---|---|---|---|"]
    for name, nl, layers, hidden, batch, steps in SHAPES:
        ref, fast = twin_rnns(INPUT, hidden, layers, nonlinearity=nl, batch_first=True)
        x = torch.randn(batch, steps, INPUT)
        for what, make in (("forward+backward", plain_step), ("gradient penalty", penalty_step),
                           ("hvp", hvp_step)):
            ref_t, fast_t = time_interleaved([make(ref, x), make(fast, x)], repeats=args.repeats)
            t_ref, t_fast = ref_t["median"], fast_t["median"]
            lines.append(f"| {name} | {what} | {t_ref * 1e3:.2f} | {t_fast * 1e3:.2f} | "
                         f"{t_ref / t_fast:.2f}x |")
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
