"""Where a module call's time goes on the GPU, fastrnn and torch.nn (cuDNN) side by side, float32:
a call's wall time (CUDA events) against the sum of its kernels' times and its host time
(torch.profiler), for a persistent-kernel shape (the MNIST 2x256 model, T=28, B=64) and a
per-step one (hidden 1024, where W_hh fits no cluster; and hidden 256 on the per-step path too).
A call whose kernels add up to much less than its wall time waits on the host (launches, op
dispatch); one whose kernels fill it is bound by them. Forward and forward+backward. For fastrnn,
also the host's time to enqueue a call (no synchronization inside it) and the host-side ops and
CUDA runtime calls by their own CPU time; --trace DIR writes Chrome traces of two forward+backward
calls of the first case. First, the host time of the single operations a backward is made of.
(.ci/gpu/stage.sh 0 writes this to $OUT/where.txt.)"""

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fastrnn

CASES = [  # (name, T, B, hidden, layers, FASTRNN_CUDA_PERSISTENT)
    ("tanh-2x256 b64", 28, 64, 256, 2, "1"),
    ("tanh-2x256 b64, per-step path", 28, 64, 256, 2, "0"),
    ("tanh-1x1024 b64", 28, 64, 1024, 1, "1"),
]


def wall_ms(run, repeats=20):
    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def kernels_and_host_ms(run, calls=5):
    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            run()
        torch.cuda.synchronize()
    events = prof.key_averages()
    kernels = sum(e.self_device_time_total for e in events) / 1000 / calls
    return kernels, prof


def host_us(op, calls=1, rounds=20, warmup=0):
    """The host's time per call of op: median over rounds of `calls` calls enqueued back to
    back, the GPU idle at each round's start."""
    for _ in range(warmup):
        op()
    times = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            op()
        times.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]


def backward_pieces():
    """The host's time of the single operations a fastrnn backward makes through torch (its
    GEMMs at the tanh-2x256 B=64 layer's shapes, a column sum, a copy), under each BLAS
    library torch can prefer: what a backward's host time is made of, and whether cuBLASLt's
    or cuBLAS's host path is the cheaper for these products."""
    N, H, B = 28 * 64, 256, 64
    dA = torch.randn(N, H, device="cuda")
    x, w = torch.randn(N, H, device="cuda"), torch.randn(H, H, device="cuda")
    out = torch.empty(H, H, device="cuda")
    pieces = {
        "dW = dA^T x (256 x 1792 x 256)": lambda: torch.mm(dA.t(), x, out=out),
        "dW += dA_0^T h0 (256 x 64 x 256)": lambda: torch.addmm(out, dA[:B].t(), x[:B], out=out),
        "dX = dA W (1792 x 256 x 256)": lambda: torch.mm(dA, w),
        "db = dA.sum(0)": lambda: dA.sum(0),
        "copy_ of [1792, 256]": lambda: x.copy_(dA),
        "empty [256, 256]": lambda: torch.empty(H, H, device="cuda"),
    }
    original = torch.backends.cuda.preferred_blas_library()
    print("\n## host time of a backward's pieces, us a call (float32, no TF32)")
    for library in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(library)
        times = (f"{name} {host_us(op, calls=200, rounds=5, warmup=20):.1f}" for name, op in pieces.items())
        print(f"{library}: " + "; ".join(times))
    torch.backends.cuda.preferred_blas_library(original)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--trace", help="write Chrome traces of the first case's forward+backward here")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    backward_pieces()
    for name, steps, batch, hidden, layers, persistent in CASES:
        os.environ["FASTRNN_CUDA_PERSISTENT"] = persistent
        ref = torch.nn.RNN(28, hidden, layers).cuda()
        fast = fastrnn.RNN(28, hidden, layers).cuda()
        fast.load_state_dict(ref.state_dict())
        x = torch.randn(steps, batch, 28, device="cuda", requires_grad=True)
        for label, module in (("torch.nn", ref), ("fastrnn", fast)):
            def forward():
                with torch.no_grad():
                    module(x)

            def both():
                out, h = module(x)
                torch.autograd.backward([out, h], [torch.ones_like(out), torch.ones_like(h)])

            for pass_, run in (("forward", forward), ("fwd+bwd", both)):
                wall = wall_ms(run)
                kernels, prof = kernels_and_host_ms(run)
                print(f"\n## {name}, {label}, {pass_}: wall {wall:.3f} ms a call, kernels {kernels:.3f} ms "
                      f"({kernels / wall:.0%} of it), {wall / steps / layers * 1000:.2f} us a step and layer")
                print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=60))
                if label == "fastrnn":
                    print(f"host: {host_us(run) / 1000:.3f} ms to enqueue a call; by own CPU time:")
                    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30,
                                                    max_name_column_width=60))
                if args.trace and (name, pass_) == (CASES[0][0], "fwd+bwd"):
                    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as trace:
                        for _ in range(2):
                            run()
                        torch.cuda.synchronize()
                    slug = "".join(ch if ch.isalnum() else "-" for ch in f"{name}-{label}-{pass_}")
                    trace.export_chrome_trace(os.path.join(args.trace, f"trace-{slug}.json"))


if __name__ == "__main__":
    main()
