"""fastrnn against torch.nn (cuDNN) on a CUDA GPU, RNN, LSTM and GRU, in every precision.

Shapes: the MNIST models (T=28, input 28), hidden 512 and 1024, packed input
with uneven lengths, and cuDNN's published persistent-kernel case (T=1406,
B=34, H=120). Precisions: strict fp32 (TF32 off for cuDNN and cuBLAS), TF32
(allowed, torch.nn.RNN's default through cuDNN), fp16 and bf16. Both modules
hold identical weights and see identical inputs; runs are interleaved after a
warm-up and timed with CUDA events; medians are reported. fastrnn runs twice:
as installed (csrc/cuda/persistent.cuh's kernels where W_hh fits on chip, elsewhere
a cuBLAS GEMM per step) and on the per-step path alone (FASTRNN_CUDA_PERSISTENT=0).

    python benchmarks/cuda_shapes.py [--repeats N] [--markdown FILE] [--json FILE]
                                     [--shapes NAME ...] [--precisions fp32 tf32 fp16 bf16]
"""

import argparse
import json

import torch
from torch.nn.utils.rnn import pack_padded_sequence

from harness import emit, make_step, time_interleaved, twin_rnns, with_env

# (name, T, B, input, hidden, layers, nonlinearity, packed)
SHAPES = [
    ("relu-1x100 b128", 28, 128, 28, 100, 1, "relu", False),
    ("tanh-2x256 b64", 28, 64, 28, 256, 2, "tanh", False),
    ("tanh-2x128 b100", 28, 100, 28, 128, 2, "tanh", False),
    ("tanh-1x512 b64", 28, 64, 28, 512, 1, "tanh", False),
    ("tanh-1x1024 b64", 28, 64, 28, 1024, 1, "tanh", False),
    ("tanh-2x256 b64 packed", 28, 64, 28, 256, 2, "tanh", True),
    ("tanh-1x120 b34 T1406", 1406, 34, 120, 120, 1, "tanh", False),
    ("lstm-2x128 b64", 28, 64, 28, 128, 2, "lstm", False),
    ("gru-2x128 b64", 28, 64, 28, 128, 2, "gru", False),
    ("lstm-1x512 b64", 28, 64, 28, 512, 1, "lstm", False),
]
PRECISIONS = {
    "fp32": (torch.float32, False),
    "tf32": (torch.float32, True),
    "fp16": (torch.float16, False),
    "bf16": (torch.bfloat16, False),
}


def set_tf32(allowed):
    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = allowed


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--markdown", help="also write the table to this file")
    parser.add_argument("--json", help="also write every measurement to this file")
    parser.add_argument("--shapes", nargs="*", help="only these shapes (names as in the table)")
    parser.add_argument("--precisions", nargs="*", choices=list(PRECISIONS), default=list(PRECISIONS))
    args = parser.parse_args()

    torch.manual_seed(0)
    rows = []
    for precision in args.precisions:
        dtype, tf32 = PRECISIONS[precision]
        set_tf32(tf32)
        for name, steps, batch, inp, hidden, layers, nl, packed in SHAPES:
            if args.shapes and name not in args.shapes:
                continue
            ref, fast = twin_rnns(inp, hidden, layers, nl, device="cuda", dtype=dtype)
            x = torch.randn(steps, batch, inp, device="cuda", dtype=dtype)
            if packed:
                lengths = torch.randint(1, steps + 1, (batch,))
                lengths[0] = steps
                x = pack_padded_sequence(x, lengths, enforce_sorted=False)
            for backward in (False, True):
                fast_step = make_step(fast, (x,), backward)
                per_step = with_env(fast_step, "FASTRNN_CUDA_PERSISTENT", "0")
                ref_t, fast_t, per_step_t = time_interleaved(
                    [make_step(ref, (x,), backward), fast_step, per_step],
                    device="cuda", repeats=args.repeats, warmup=5)
                rows.append(dict(precision=precision, shape=name, steps=steps, layers=layers,
                                 pass_="fwd+bwd" if backward else "forward",
                                 torch_ms=ref_t["median"] * 1e3, fastrnn_ms=fast_t["median"] * 1e3,
                                 per_step_ms=per_step_t["median"] * 1e3))
    set_tf32(True)

    lines = [
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
        f"cuDNN {torch.backends.cudnn.version()}; median of {args.repeats} interleaved runs "
        "(CUDA events)",
        "",
        "| precision | shape | pass | torch.nn (cuDNN) ms | fastrnn ms | speedup | "
        "fastrnn us / step / layer | fastrnn per-step path ms | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        us_per_step = r["fastrnn_ms"] * 1e3 / (r["steps"] * r["layers"])
        lines.append(f"| {r['precision']} | {r['shape']} | {r['pass_']} | {r['torch_ms']:.3f} | "
                     f"{r['fastrnn_ms']:.3f} | {r['torch_ms'] / r['fastrnn_ms']:.2f}x | "
                     f"{us_per_step:.2f} | {r['per_step_ms']:.3f} | "
                     f"{r['torch_ms'] / r['per_step_ms']:.2f}x |")
    emit(lines, args.markdown)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
