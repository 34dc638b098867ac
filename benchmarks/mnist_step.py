"""One training step of the MNIST example's models, torch.nn.RNN vs fastrnn.RNN.

A step is what examples/mnist_rnn.py does per batch: the whole model's forward
(RNN and readout), cross-entropy, backward, gradient clipping where the preset
clips, and the optimizer's step. Both models start from identical weights
(the preset's initialisation) and see the same batch; steps run interleaved
(A B, B A, ...) after a warm-up, and medians are reported. Timing one step side
by side in one process is steadier on a shared machine than comparing the
example's end-to-end runs, which are minutes apart.

    python benchmarks/mnist_step.py [--repeats N] [--device cpu|cuda] [--markdown FILE]
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from harness import time_interleaved

import fastrnn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import mnist_rnn  # noqa: E402  (the example's presets, model and optimizer)


def training_step(model, hp, x, y):
    opt, _ = mnist_rnn.make_optimizer(model, hp, total_steps=1)
    params = list(model.parameters())

    def step():
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hp["clip"] > 0:
            torch.nn.utils.clip_grad_norm_(params, hp["clip"])
        opt.step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()

    rows = []
    for name, preset in mnist_rnn.PRESETS.items():
        hp = dict(preset)
        base = mnist_rnn.initial_model(hp, seed=0)
        ref = copy.deepcopy(base).to(args.device)
        fast = fastrnn.convert(copy.deepcopy(base)).to(args.device)
        b = hp["batch_size"]
        x = torch.randn(b, mnist_rnn.SEQ_LEN, mnist_rnn.INPUT_SIZE, device=args.device)
        y = torch.randint(0, mnist_rnn.NUM_CLASSES, (b,), device=args.device)
        ref_t, fast_t = time_interleaved(
            [training_step(ref, hp, x, y), training_step(fast, hp, x, y)],
            device=args.device, repeats=args.repeats, warmup=5,
        )
        rows.append((name, b, ref_t["median"] * 1e3, fast_t["median"] * 1e3))

    lines = [
        f"MNIST training step ({args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved runs)",
        "",
        "| preset | batch | torch ms | fastrnn ms | speedup |",
        "|---|---|---|---|---|",
    ]
    for name, b, t_ms, f_ms in rows:
        lines.append(f"| {name} | {b} | {t_ms:.2f} | {f_ms:.2f} | {t_ms / f_ms:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
