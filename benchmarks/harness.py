"""Shared timing machinery for the benchmarks: identical twin modules, interleaved
A/B runs with warm-up and medians, CUDA events on the GPU, peak memory, FLOP counts."""

import argparse
import copy
import os
import platform
import random
import statistics
import time

import torch

import fastrnn


# What tells one x86 generation from another where the model name does not
# ("AMD EPYC" is Zen 4 and Zen 5 alike): family and model, and the vector
# extensions the kernels choose by.
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")


def cpu_model():
    """The CPU's model name from /proc/cpuinfo, with its family, model and vector
    extensions (every CPU benchmark states it)."""
    fields = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break  # the first CPU's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    if "cpu family" not in fields:
        return name
    flags = set(fields.get("flags", "").split())
    simd = ", ".join(f for f in _CPU_FLAGS if f in flags) or "no AVX2"
    return f"{name} (family {fields['cpu family']} model {fields.get('model', '?')}; {simd})"


def machine():
    """The start of a CPU table's heading: the CPU, torch and the thread count."""
    return f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def table_options(doc, repeats=15):
    """The options of a benchmark that prints one table: --repeats, --markdown (parsed)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--markdown", help="also write the table to this file")
    return parser.parse_args()


def has_amx():
    """Whether the CPU has AMX-BF16 tiles (fastrnn's bfloat16 products run on them)."""
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_bf16" in f.read()
    except OSError:
        return False


def twin_rnns(input_size, hidden, layers, nonlinearity="tanh", bidirectional=False,
              batch_first=False, device="cpu", dtype=torch.float32, seed=0):
    """(torch.nn's module, fastrnn's) holding identical weights: an RNN for nonlinearity
    "tanh" or "relu", an LSTM for "lstm", a GRU for "gru"."""
    torch.manual_seed(seed)
    kwargs = dict(bidirectional=bidirectional, batch_first=batch_first)
    if nonlinearity in ("lstm", "gru"):
        cls = torch.nn.LSTM if nonlinearity == "lstm" else torch.nn.GRU
        ref = cls(input_size, hidden, layers, **kwargs)
    else:
        ref = torch.nn.RNN(input_size, hidden, layers, nonlinearity=nonlinearity, **kwargs)
    ref = ref.to(device, dtype)
    return ref, fastrnn.convert(copy.deepcopy(ref))


def with_env(step, name, value):
    """`step` with environment variable `name` set to `value` (None: unset) while it runs
    (fastrnn's kernels read their switches on each call)."""
    def run():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
        try:
            step()
        finally:
            os.environ.pop(name, None)
    return run


def with_fused(step, fused):
    """`step` with the fused CPU kernel switched on or off."""
    return with_env(step, "FASTRNN_CPU_FUSED", "1" if fused else "0")


def rnn_flops(steps, batch, input_size, hidden, layers, directions=1, backward=False):
    """Forward: 2*T*B*(I*H + H*H) per layer and direction; fwd+bwd does 3x that."""
    forward = 0
    for layer in range(layers):
        layer_in = input_size if layer == 0 else hidden * directions
        forward += directions * 2 * steps * batch * (layer_in * hidden + hidden * hidden)
    return 3 * forward if backward else forward


def sgemm_peak(samples=10, n=2048):
    """This machine's float32 GEMM rate (FLOP/s): the best of `samples` n^3 products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(samples):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def make_step(module, inputs, backward):
    """A closure running one forward (no_grad) or forward+backward of `module`."""
    params = list(module.parameters())

    def outputs():
        out, h = module(*inputs)
        out = out.data if isinstance(out, torch.nn.utils.rnn.PackedSequence) else out
        return out, (h if isinstance(h, tuple) else (h,))

    if not backward:
        def step():
            with torch.no_grad():
                module(*inputs)
        return step

    grads = None

    def step():
        nonlocal grads
        out, h = outputs()
        if grads is None:
            grads = [torch.ones_like(t) for t in (out, *h)]
        torch.autograd.backward([out, *h], grads)
        for p in params:
            p.grad = None
    return step


def _timer(device):
    if device == "cuda":
        def run(step):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def run(step):
            t0 = time.perf_counter()
            step()
            return time.perf_counter() - t0
    return run


def time_interleaved(steps, device="cpu", repeats=20, warmup=3, budget_s=None):
    """Median, min and max seconds of each closure, run in turn, one round after another.

    No closure ever runs twice in a row, and each follows each of the others about
    equally often: on the CPU a call finds the caches as the one before left them.
    (Mirrored rounds, A B C C B A, ran the first and last twice in a row every other
    round and the middle ones never: those paid for it, 20-30 us a call, a third of
    a small call.) Two alternate, A B A B; three or more run in a shuffled order
    each round (seeded, so runs repeat).

    With `budget_s`, the number of repeats is cut so that the whole measurement
    takes about that long (at least 3 repeats)."""
    run = _timer(device)
    first = []
    for step in steps:
        for _ in range(warmup - 1):
            step()
        first.append(run(step))
    if budget_s is not None:
        repeats = max(3, min(repeats, int(budget_s / max(sum(first), 1e-9))))
    times = [[] for _ in steps]
    n, order, rng = len(steps), list(range(len(steps))), random.Random(0)
    for r in range(repeats):
        if n > 2:
            last = order[-1]
            while True:
                rng.shuffle(order)
                if order[0] != last:
                    break
        for i in order:
            times[i].append(run(steps[i]))
    return [dict(median=statistics.median(t), min=min(t), max=max(t), runs=len(t)) for t in times]


def peak_memory(step, device="cpu"):
    """Peak bytes allocated while `step` runs, above what was allocated before.

    CUDA: the caching allocator's max_memory_allocated. CPU: the process's peak
    resident set (VmHWM, reset through /proc/self/clear_refs), which is what the
    CPU allocator's blocks cost; None where /proc does not allow it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _proc_status_kb("VmRSS")
        step()
        return (_proc_status_kb("VmHWM") - base) * 1024
    except OSError:
        return None


def _proc_status_kb(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise OSError(key)


def emit(lines, markdown=None):
    """Prints a benchmark's table, and writes it to `markdown` when given."""
    text = "\n".join(lines)
    print(text)
    if markdown:
        with open(markdown, "w") as f:
            f.write(text + "\n")
