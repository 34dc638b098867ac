"""One training step of the MNIST example's models, torch.nn.RNN vs fastrnn.RNN.

A step is what examples/mnist_rnn.py does per batch: the whole model's forward
(RNN and readout), cross-entropy, backward, gradient clipping where the preset
clips, and the optimizer's step. Both models start from identical weights
(the preset's initialisation) and see the same random batch, so no data is
needed; steps run interleaved (A B, A B, ...) after a warm-up, and medians are
reported. benchmarks/mnist_train.py times the same steps over whole training
runs on MNIST.

    python benchmarks/mnist_step.py [--repeats N] [--device cpu|cuda] [--markdown FILE]
"""

import argparse
import copy

import torch
import torch.nn.functional as F

import fastrnn
from harness import emit, time_interleaved
from mnist_model import INPUT_SIZE, NUM_CLASSES, PRESETS, SEQ_LEN, initial_model, make_optimizer


def training_step(model, hp, x, y):
    opt, _ = make_optimizer(model, hp, total_steps=1)
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
    for name, preset in PRESETS.items():
        hp = dict(preset)
        base = initial_model(hp, seed=0)
        ref = copy.deepcopy(base).to(args.device)
        fast = fastrnn.convert(copy.deepcopy(base)).to(args.device)
        b = hp["batch_size"]
        x = torch.randn(b, SEQ_LEN, INPUT_SIZE, device=args.device)
        y = torch.randint(0, NUM_CLASSES, (b,), device=args.device)
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
    emit(lines, args.markdown)


if __name__ == "__main__":
    main()
