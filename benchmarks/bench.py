"""The side-by-side suite: fastrnn.RNN against torch.nn.RNN (native ATen on the
CPU, cuDNN on CUDA), identical weights and inputs, interleaved runs, medians.

    python benchmarks/bench.py [--device cpu|cuda] [--quick] [--json FILE] [--csv FILE]
                               [--plot FILE.png] [--markdown FILE.md]

Grid: T x batch x hidden for one unidirectional float32 layer (padded), forward
only (no_grad) and forward+backward; then variations around T=128, batch=64
(2 layers, bidirectional, PackedSequence with uneven lengths, and float64 on
the CPU / float16 and bfloat16 on CUDA). On the CPU, cells whose forward+backward
would take more than --cpu-budget-gflop GFLOP are skipped (2 cores make them
minutes long); the table says which. Columns: both times (median, and the
spread min-max), the speedup, the fraction of the sgemm rate reached (CPU) or
the microseconds per step per layer (CUDA), and peak forward+backward memory.

The CPU results in benchmarks/results/ (tabled in benchmarks/RESULTS.md) come from

    python benchmarks/bench.py --device cpu --budget-s 0.6 --json benchmarks/results/bench_cpu.json \
        --csv benchmarks/results/bench_cpu.csv --plot benchmarks/results/bench_cpu_speedup.png
"""

import argparse
import csv
import itertools
import json
import math
import os
import subprocess
import sys
from datetime import date

import torch
from tqdm import tqdm

from harness import cpu_model, make_step, peak_memory, rnn_flops, sgemm_peak, time_interleaved, twin_rnns

INPUT = 32
GRID = dict(steps=[28, 128, 512], batch=[1, 16, 64, 128, 256], hidden=[64, 128, 256, 512, 1024])
# On the CPU batch 4 too: 2 rows a thread, where a split of the batch rows leaves each thread
# too few rows to hide the weights' streaming (benchmarks/RESULTS.md, Intel).
CPU_EXTRA_BATCHES = [4]
QUICK_GRID = dict(steps=[28], batch=[16, 128], hidden=[64, 256])
VARIATION_BASE = dict(steps=128, batch=64)


def cells(device, quick):
    """Every (config) to measure, as dicts."""
    grid = QUICK_GRID if quick else GRID
    base = dict(layers=1, bidirectional=False, packed=False, dtype="float32")
    out = []
    batches = sorted(grid["batch"] + (CPU_EXTRA_BATCHES if device == "cpu" and not quick else []))
    for steps, batch, hidden in itertools.product(grid["steps"], batches, grid["hidden"]):
        out.append(dict(base, steps=steps, batch=batch, hidden=hidden))
    extra_dtypes = ["float64"] if device == "cpu" else ["float16", "bfloat16"]
    variations = [dict(layers=2), dict(bidirectional=True), dict(packed=True)]
    variations += [dict(dtype=d) for d in extra_dtypes]
    hiddens = [64, 256] if quick else [64, 256, 1024]
    steps = 28 if quick else VARIATION_BASE["steps"]
    for var, hidden in itertools.product(variations, hiddens):
        out.append(dict(base, steps=steps, batch=VARIATION_BASE["batch"], hidden=hidden, **var))
    return out


def cell_name(c):
    parts = [f"T{c['steps']}", f"B{c['batch']}", f"H{c['hidden']}", f"L{c['layers']}",
             "bi" if c["bidirectional"] else "uni", "packed" if c["packed"] else "padded", c["dtype"]]
    return "-".join(parts)


def make_inputs(c, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(c["steps"], c["batch"], INPUT, generator=g).to(device, dtype)
    if not c["packed"]:
        return (x,)
    # Uneven lengths, uniform in [1, T], the longest present.
    lengths = torch.randint(1, c["steps"] + 1, (c["batch"],), generator=g)
    lengths[0] = c["steps"]
    return (torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False),)


def measure(c, device, repeats, budget_s, peak):
    dtype = getattr(torch, c["dtype"])
    dirs = 2 if c["bidirectional"] else 1
    ref, fast = twin_rnns(INPUT, c["hidden"], c["layers"], bidirectional=c["bidirectional"],
                          device=device, dtype=dtype)
    inputs = make_inputs(c, device, dtype)
    # Rows actually computed: T * B, or the packed sequence's total length.
    rows = inputs[0].data.shape[0] if c["packed"] else c["steps"] * c["batch"]
    row = dict(c, name=cell_name(c), rows=rows)
    for backward in (False, True):
        kind = "fwdbwd" if backward else "fwd"
        steps = [make_step(ref, inputs, backward), make_step(fast, inputs, backward)]
        t_ref, t_fast = time_interleaved(steps, device, repeats=repeats, budget_s=budget_s)
        row[f"{kind}_torch_ms"] = t_ref["median"] * 1e3
        row[f"{kind}_fastrnn_ms"] = t_fast["median"] * 1e3
        row[f"{kind}_torch_spread_ms"] = [t_ref["min"] * 1e3, t_ref["max"] * 1e3]
        row[f"{kind}_fastrnn_spread_ms"] = [t_fast["min"] * 1e3, t_fast["max"] * 1e3]
        row[f"{kind}_runs"] = t_ref["runs"]
        row[f"{kind}_speedup"] = t_ref["median"] / t_fast["median"]
        if device == "cpu":
            flops = rnn_flops(1, rows, INPUT, c["hidden"], c["layers"], dirs, backward)
            row[f"{kind}_torch_peak_frac"] = flops / t_ref["median"] / peak
            row[f"{kind}_fastrnn_peak_frac"] = flops / t_fast["median"] / peak
        else:
            per = c["steps"] * c["layers"] * 1e-6
            row[f"{kind}_torch_us_per_step"] = t_ref["median"] / per
            row[f"{kind}_fastrnn_us_per_step"] = t_fast["median"] / per
        if backward and device == "cuda":
            row["mem_torch_mb"] = _mb(peak_memory(steps[0], device))
            row["mem_fastrnn_mb"] = _mb(peak_memory(steps[1], device))
    return row


def cpu_memory(c):
    """Peak fwd+bwd memory (MB) of both implementations on one cell (CPU)."""
    dtype = getattr(torch, c["dtype"])
    ref, fast = twin_rnns(INPUT, c["hidden"], c["layers"], bidirectional=c["bidirectional"], dtype=dtype)
    inputs = make_inputs(c, "cpu", dtype)
    out = []
    for module in (ref, fast):
        step = make_step(module, inputs, True)
        # From before the first call: what fastrnn keeps between calls (csrc/scratch.h)
        # counts, as the first call leaves it resident.
        out.append(_mb(peak_memory(lambda: (step(), step()), "cpu")))
    return out


def cpu_memory_pass(cells_todo):
    """Runs cpu_memory for every cell in a child process whose glibc returns each
    block of 64 KiB or more to the OS when freed, so that the peak resident set
    measures what one forward+backward allocates. (A separate process, because
    that setting slows every allocation down and must not touch the timings.)"""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, __file__, "--memory-pass"], input=json.dumps(cells_todo),
                          capture_output=True, text=True, env=env, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(nbytes):
    return None if nbytes is None else nbytes / 2**20


def machine(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def markdown(meta, rows, skipped):
    limit = "% of sgemm" if meta["device"] == "cpu" else "us/step/layer"
    key = "peak_frac" if meta["device"] == "cpu" else "us_per_step"
    fmt = (lambda v: f"{v:.0%}") if meta["device"] == "cpu" else (lambda v: f"{v:.1f}")
    lines = [
        f"{meta['machine']}; torch {meta['torch']}; {meta['date']}"
        + (f"; sgemm {meta['sgemm_gflops']:.0f} GFLOP/s" if meta.get("sgemm_gflops") else ""),
        "",
        f"| cell | fwd torch ms | fwd fastrnn ms | fwd speedup | fwd+bwd torch ms | fwd+bwd fastrnn ms "
        f"| fwd+bwd speedup | fwd+bwd {limit} torch / fastrnn | peak MB torch / fastrnn |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        mem = (f"{r['mem_torch_mb']:.1f} / {r['mem_fastrnn_mb']:.1f}"
               if r.get("mem_torch_mb") is not None else "n/a")
        lines.append(
            f"| {r['name']} | {r['fwd_torch_ms']:.3f} | {r['fwd_fastrnn_ms']:.3f} | {r['fwd_speedup']:.2f}x "
            f"| {r['fwdbwd_torch_ms']:.3f} | {r['fwdbwd_fastrnn_ms']:.3f} | {r['fwdbwd_speedup']:.2f}x "
            f"| {fmt(r['fwdbwd_torch_' + key])} / {fmt(r['fwdbwd_fastrnn_' + key])} | {mem} |")
    if skipped:
        lines += ["", f"Skipped (over the CPU budget of {meta['cpu_budget_gflop']} GFLOP per fwd+bwd): "
                  + ", ".join(skipped)]
    return "\n".join(lines) + "\n"


def plot(path, meta, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    grid_rows = [r for r in rows if r["layers"] == 1 and not r["bidirectional"] and not r["packed"]
                 and r["dtype"] == "float32"]
    steps = sorted({r["steps"] for r in grid_rows})
    batches = sorted({r["batch"] for r in grid_rows})
    hiddens = sorted({r["hidden"] for r in grid_rows})
    fig, axes = plt.subplots(1, len(steps), figsize=(4.5 * len(steps), 4), squeeze=False)
    values = [r["fwdbwd_speedup"] for r in grid_rows]
    lo, hi = min(values + [0.9]), max(values + [1.1])
    norm = TwoSlopeNorm(vmin=lo, vcenter=1.0, vmax=hi)  # white = 1.0 (parity)
    for ax, t in zip(axes[0], steps):
        m = [[math.nan] * len(batches) for _ in hiddens]
        for r in grid_rows:
            if r["steps"] == t:
                m[hiddens.index(r["hidden"])][batches.index(r["batch"])] = r["fwdbwd_speedup"]
        im = ax.imshow(m, cmap="RdBu", norm=norm, origin="lower", aspect="auto")
        for i, j in itertools.product(range(len(hiddens)), range(len(batches))):
            if not math.isnan(m[i][j]):
                ax.text(j, i, f"{m[i][j]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(batches)), batches)
        ax.set_yticks(range(len(hiddens)), hiddens)
        ax.set_xlabel("batch")
        if ax is axes[0][0]:
            ax.set_ylabel("hidden")
        ax.set_title(f"T = {t}")
    fig.colorbar(im, ax=axes[0].tolist(), label="fwd+bwd speedup (torch / fastrnn), 1.0 = parity")
    fig.suptitle(f"fastrnn vs torch.nn.RNN, {meta['device']}: {meta['machine']}", fontsize=9)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--quick", action="store_true", help="a handful of cells, under two minutes")
    p.add_argument("--repeats", type=int, default=25, help="most interleaved runs per cell")
    p.add_argument("--budget-s", type=float, default=1.0, help="about how long each cell's timing takes")
    p.add_argument("--cpu-budget-gflop", type=float, default=60.0)
    p.add_argument("--no-tf32", action="store_true",
                   help="CUDA: forbid TF32 in cuDNN and cuBLAS (strict fp32), for both implementations")
    p.add_argument("--json")
    p.add_argument("--csv")
    p.add_argument("--plot")
    p.add_argument("--markdown")
    p.add_argument("--memory-pass", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_pass:  # child of cpu_memory_pass: cells on stdin, results on stdout
        # The runtimes' one-time setup (thread pools, lazy inits) first, on a tiny stack, so
        # that the first cell does not count it.
        for module in twin_rnns(4, 4, 1):
            make_step(module, (torch.randn(2, 1, 4),), True)()
        print(json.dumps([cpu_memory(c) for c in json.loads(sys.stdin.read())]))
        return None
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible")
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False

    meta = dict(device=args.device, machine=machine(args.device), torch=torch.__version__,
                date=str(date.today()), quick=args.quick, input_size=INPUT,
                cpu_budget_gflop=args.cpu_budget_gflop,
                tf32=args.device == "cuda" and torch.backends.cudnn.allow_tf32)
    peak = None
    if args.device == "cpu":
        peak = sgemm_peak()
        meta["sgemm_gflops"] = peak / 1e9
    todo, skipped = [], []
    for c in cells(args.device, args.quick):
        dirs = 2 if c["bidirectional"] else 1
        gflop = rnn_flops(c["steps"], c["batch"], INPUT, c["hidden"], c["layers"], dirs, True) / 1e9
        if args.device == "cpu" and gflop > args.cpu_budget_gflop:
            skipped.append(cell_name(c))
        else:
            todo.append(c)
    rows = []
    for c in tqdm(todo, desc=f"bench {args.device}", unit="cell"):
        rows.append(measure(c, args.device, args.repeats, args.budget_s, peak))
    if args.device == "cpu":
        for row, (mem_torch, mem_fast) in zip(rows, cpu_memory_pass(todo)):
            row["mem_torch_mb"], row["mem_fastrnn_mb"] = mem_torch, mem_fast
    if args.device == "cpu":  # the sgemm rate drifts with load: keep the best seen
        meta["sgemm_gflops"] = max(meta["sgemm_gflops"], sgemm_peak(samples=5) / 1e9)

    text = markdown(meta, rows, skipped)
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, rows=rows, skipped=skipped), f, indent=1)
    if args.csv:
        flat = [{k: (json.dumps(v) if isinstance(v, list) else v) for k, v in r.items()} for r in rows]
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(flat[0]))
            w.writeheader()
            w.writerows(flat)
    if args.plot:
        plot(args.plot, meta, rows)
    return rows


if __name__ == "__main__":
    main()
