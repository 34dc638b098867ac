"""torch.func.vmap through fastrnn, side by side in one process.

torch.nn's recurrent modules cannot be vmapped (aten's RNN ops have no batching rule), so
the same work is timed as a Python loop over torch.nn modules, as a loop over fastrnn
modules, and as fastrnn under vmap: its batching rules (fused ops, one call per slice, or
one call for all where only inputs are batched) and, for scale, the plain PyTorch steps of
fastrnn.reference that vmap ran on before the rules existed.

- ensemble: E models of one shape (torch.func.stack_module_state), one input batch, the
  forward without gradients, and forward+backward of the summed outputs;
- per-sample gradients: torch.func.vmap(torch.func.grad(loss)) over a batch's samples;
- batched inputs: one model over E input batches at once (no gradients).

Runs alternate after a warm-up; medians.

    python benchmarks/vmap.py [--repeats N] [--markdown FILE]
"""

import contextlib
import copy

import torch
from torch.func import functional_call, grad, stack_module_state, vmap

import fastrnn.ops
from harness import emit, machine, table_options, time_interleaved, twin_rnns

INPUT, STEPS = 28, 28
# (name, nonlinearity, layers, hidden, batch, members): models, or input batches, per vmap
SHAPES = [
    ("tanh-1x128", "tanh", 1, 128, 64, 8),
    ("lstm-2x128", "lstm", 2, 128, 32, 4),
]


@contextlib.contextmanager
def on_reference():
    """vmap's route before the ops had batching rules: fastrnn.reference throughout."""
    kept = fastrnn.ops._fused_transforms
    fastrnn.ops._fused_transforms = lambda: False
    try:
        yield
    finally:
        fastrnn.ops._fused_transforms = kept


def by_reference(step):
    def run():
        with on_reference():
            step()
    return run


def ensembles(nl, layers, hidden, members):
    pairs = [twin_rnns(INPUT, hidden, layers, nonlinearity=nl, batch_first=True, seed=s)
             for s in range(members)]
    refs, fasts = [p[0] for p in pairs], [p[1] for p in pairs]
    params, buffers = stack_module_state(fasts)
    base = copy.deepcopy(fasts[0]).to("meta")
    return refs, fasts, params, buffers, base


def ensemble_steps(refs, fasts, params, buffers, base, x, backward):
    def loop(models):
        def step():
            with torch.set_grad_enabled(backward):
                outs = [m(x)[0].sum() for m in models]
                if backward:
                    sum(outs).backward()
        return step

    def vmapped():
        with torch.set_grad_enabled(backward):
            out = vmap(lambda p, b: functional_call(base, (p, b), (x,))[0])(params, buffers)
            if backward:
                out.sum().backward()

    return [loop(refs), loop(fasts), vmapped, by_reference(vmapped)]


def per_sample_steps(ref, fast, x):
    def loss(module):
        return lambda p, sample: functional_call(module, p, (sample.unsqueeze(0),))[0].sum()

    params = {k: v.detach() for k, v in fast.named_parameters()}
    ref_params = {k: v.detach() for k, v in ref.named_parameters()}

    def loop():  # torch.nn: one backward per sample
        for sample in x:
            torch.func.grad(loss(ref))(ref_params, sample)

    def vmapped():
        vmap(grad(loss(fast)), in_dims=(None, 0))(params, x)

    def fast_loop():
        for sample in x:
            torch.func.grad(loss(fast))(params, sample)

    return [loop, fast_loop, vmapped, by_reference(vmapped)]


def batched_input_steps(ref, fast, xs):
    def loop(module):
        def step():
            with torch.no_grad():
                for x in xs:
                    module(x)
        return step

    def vmapped():
        with torch.no_grad():
            vmap(fast)(xs)

    return [loop(ref), loop(fast), vmapped, by_reference(vmapped)]


def main():
    args = table_options(__doc__)
    lines = [f"{machine()}, "
             f"input={INPUT}, T={STEPS}, batch_first, median of {args.repeats} interleaved runs; ms",
             "", "| shape | work | torch.nn, a loop | fastrnn, a loop | fastrnn, vmap | "
             "fastrnn.reference, vmap | loop of torch.nn / vmap |", "|---|---|---|---|---|---|---|"]
    for name, nl, layers, hidden, batch, members in SHAPES:
        refs, fasts, params, buffers, base = ensembles(nl, layers, hidden, members)
        x = torch.randn(batch, STEPS, INPUT)
        cases = [
            (f"ensemble of {members}, inference",
             ensemble_steps(refs, fasts, params, buffers, base, x, False)),
            (f"ensemble of {members}, forward+backward",
             ensemble_steps(refs, fasts, params, buffers, base, x, True)),
            (f"per-sample gradients, {batch} samples", per_sample_steps(refs[0], fasts[0], x)),
            (f"{members} input batches, inference",
             batched_input_steps(refs[0], fasts[0], torch.randn(members, batch, STEPS, INPUT))),
        ]
        for what, steps in cases:
            times = [t["median"] for t in time_interleaved(steps, repeats=args.repeats)]
            cells = " | ".join(f"{t * 1e3:.2f}" for t in times)
            lines.append(f"| {name} | {what} | {cells} | {times[0] / times[2]:.2f}x |")
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
