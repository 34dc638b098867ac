"""Full training runs of the MNIST example's presets, torch.nn.RNN and fastrnn.RNN side by side.

The training of examples/mnist_rnn.py, instrumented: both models start from
identical weights and train in lockstep on identical batches, each step of one
timed beside the same step of the other (alternating which goes first). Module
and gradient hooks measure the time spent inside the RNN's forward and backward.
It prints a table per run and can write a JSON report and a plot of the loss
curves and test accuracies. The flags below the preset vary what the presets fix.

    python benchmarks/mnist_train.py --preset relu-1x100 --report relu.json --plot relu.png
    python benchmarks/mnist_train.py --preset tanh-2x256 --clip 1 --schedule constant

MNIST comes from --data-dir (default ./data), as in the example: the four IDX
files, decompressed, in DATA_DIR/MNIST/raw/ (run the example once to download
them, or put them there).
"""

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import fastrnn
from mnist_model import MNIST_MEAN, MNIST_STD, MODEL_KEYS, PRESETS, TRAIN_KEYS, describe, initial_model, make_optimizer

IMPLS = ("torch", "fastrnn")
EVAL_BATCH = 1000
LOG_EVERY = 10  # steps per logged (averaged) loss value


class RNNTimer:
    """Wall time inside one RNN module's forward and backward during training steps.

    Forward: a pre-hook and a hook on the module. Backward: the gradient of the RNN's
    output is complete (a tensor hook fires) when the readout's backward is done and the
    RNN's begins; the RNN is the model's first module and its input needs no gradient,
    so its backward ends when loss.backward() returns, where backward_done() is called.
    On CPU autograd runs in the calling thread, so these stamps are exact; on CUDA each
    stamp synchronizes, for both implementations alike."""

    def __init__(self, rnn, device):
        self.cuda = device.type == "cuda"
        self.forward_s = self.backward_s = 0.0
        self._fwd_start = self._bwd_start = None
        self._handles = [rnn.register_forward_pre_hook(self._pre), rnn.register_forward_hook(self._post)]

    def _now(self):
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def _pre(self, module, args):
        if module.training and torch.is_grad_enabled():
            self._fwd_start = self._now()

    def _post(self, module, args, output):
        if self._fwd_start is not None:
            self.forward_s += self._now() - self._fwd_start
            self._fwd_start = None
            if output[0].requires_grad:
                output[0].register_hook(self._grad_ready)

    def _grad_ready(self, grad):
        self._bwd_start = self._now()

    def backward_done(self):
        if self._bwd_start is not None:
            self.backward_s += self._now() - self._bwd_start
            self._bwd_start = None

    def remove(self):
        for h in self._handles:
            h.remove()


def load_split(root, train, device):
    """One split as tensors on `device`: images [N, 28, 28], normalised, and labels [N]."""
    from torchvision import datasets

    try:
        ds = datasets.MNIST(root, train=train, download=False)
    except Exception as e:  # missing or unreadable: the fix is the same
        raw = Path(root) / "MNIST" / "raw"
        lines = str(e).strip().splitlines()
        reason = lines[-1] if lines and not lines[0].startswith("Dataset not found") else "not found"
        sys.exit(f"error: could not load MNIST from {raw} ({reason}).\nPut the four files train-images-idx3-ubyte, "
                 f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (decompressed) in "
                 f"{raw}/ (python examples/mnist_rnn.py downloads them into ./data).")
    x = (ds.data.float().div_(255.0) - MNIST_MEAN) / MNIST_STD
    return x.to(device), ds.targets.long().to(device)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        correct = sum((model(x[i:i + EVAL_BATCH]).argmax(1) == y[i:i + EVAL_BATCH]).sum().item()
                      for i in range(0, len(x), EVAL_BATCH))
    return 100.0 * correct / len(x)


def train_both(models, hp, data, device, seed):
    """Trains both models in lockstep; returns per-implementation results and the paired step times."""
    train_x, train_y, test_x, test_y = data
    n, bs = len(train_x), hp["batch_size"]
    steps_per_epoch = math.ceil(n / bs)
    runs, loss_steps = {}, []
    for impl, model in models.items():
        opt, sched = make_optimizer(model, hp, hp["epochs"] * steps_per_epoch)
        runs[impl] = dict(model=model, opt=opt, sched=sched, timer=RNNTimer(model.rnn, device),
                          params=list(model.parameters()), step_s=[], losses=[], window=[],
                          epoch_s=[], test_acc=[])
    for epoch in range(hp["epochs"]):
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).to(device)
        for run in runs.values():
            run["model"].train()
        for step, start in enumerate(range(0, n, bs)):
            idx = perm[start:start + bs]
            x, y = train_x[idx], train_y[idx]
            # Alternate which implementation goes first, so that neither always finds the caches warm.
            for impl in (IMPLS if step % 2 == 0 else IMPLS[::-1]):
                run = runs[impl]
                sync(device)
                t0 = time.perf_counter()
                loss = F.cross_entropy(run["model"](x), y)
                run["opt"].zero_grad(set_to_none=True)
                loss.backward()
                run["timer"].backward_done()
                if hp["clip"] > 0:
                    torch.nn.utils.clip_grad_norm_(run["params"], hp["clip"])
                run["opt"].step()
                run["sched"].step()
                sync(device)
                run["step_s"].append(time.perf_counter() - t0)
                run["window"].append(loss.detach())
            if len(runs["torch"]["window"]) == LOG_EVERY or step == steps_per_epoch - 1:
                loss_steps.append(epoch * steps_per_epoch + step + 1)
                for run in runs.values():
                    run["losses"].append(torch.stack(run["window"]).mean().item())
                    run["window"] = []
        line = [f"epoch {epoch + 1}/{hp['epochs']}:"]
        for impl, run in runs.items():
            run["epoch_s"].append(sum(run["step_s"][-steps_per_epoch:]))
            run["test_acc"].append(accuracy(run["model"], test_x, test_y))
            line.append(f"{impl} {run['epoch_s'][-1]:.2f} s, loss {run['losses'][-1]:.4f}, "
                        f"test {run['test_acc'][-1]:.2f}%;")
        print(" ".join(line).rstrip(";"), flush=True)

    results = {}
    for impl, run in runs.items():
        run["timer"].remove()
        train_s = sum(run["step_s"])
        rnn_s = run["timer"].forward_s + run["timer"].backward_s
        results[impl] = {
            "test_accuracy": run["test_acc"][-1] if run["test_acc"] else accuracy(run["model"], test_x, test_y),
            "train_accuracy": accuracy(run["model"], train_x, train_y),
            "train_seconds": train_s,
            "epoch_seconds": run["epoch_s"],
            "median_step_ms": 1e3 * statistics.median(run["step_s"]) if run["step_s"] else None,
            "test_accuracy_per_epoch": run["test_acc"],
            "final_loss": run["losses"][-1] if run["losses"] else None,
            "losses": run["losses"],
            "loss_steps": loss_steps,  # global step (1-based) at which each loss value was logged
            "log_every": LOG_EVERY,
            "steps_per_epoch": steps_per_epoch,
            "rnn_forward_seconds": run["timer"].forward_s,
            "rnn_backward_seconds": run["timer"].backward_s,
            "rnn_seconds": rnn_s,
            "rnn_share": rnn_s / train_s if train_s > 0 else None,
        }
    return results, [runs[impl]["step_s"] for impl in IMPLS]


def print_table(results, speedup):
    rows = [("impl", "test acc", "train acc", "s/epoch", "ms/step", "RNN share")]
    for impl, r in results.items():
        eps = r["epoch_seconds"]
        rows.append((impl, f"{r['test_accuracy']:.2f}%", f"{r['train_accuracy']:.2f}%",
                     f"{sum(eps) / len(eps):.2f}" if eps else "-",
                     f"{r['median_step_ms']:.2f}" if r["median_step_ms"] else "-",
                     f"{100 * r['rnn_share']:.0f}%" if r["rnn_share"] is not None else "-"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    print()
    for j, row in enumerate(rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
        if j == 0:
            print("  ".join("-" * w for w in widths))
    if speedup:
        print(f"\nspeedup (median over paired steps of torch step time / fastrnn step time): {speedup['median']:.2f}x; "
              f"total step time: {speedup['total']:.2f}x; RNN alone (forward + backward): {speedup['rnn']:.2f}x")
    print("RNN share: time inside the RNN's forward and backward / training step time")


def write_plot(path, results, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    # fastrnn dashed over torch: from identical starts on identical batches the curves nearly coincide.
    style = {"torch": dict(marker="o", linestyle="-"), "fastrnn": dict(marker="x", linestyle="--")}
    epochs = 1
    for impl, r in results.items():
        ax1.plot(r["loss_steps"], r["losses"], label=impl, linestyle=style[impl]["linestyle"], alpha=0.9)
        accs = r["test_accuracy_per_epoch"]
        epochs = max(epochs, len(accs))
        ax2.plot(range(1, len(accs) + 1), accs, label=impl, markersize=8, **style[impl])
    ax1.set(xlabel="training step", ylabel=f"loss (mean over {LOG_EVERY} steps)", title="training loss")
    ax2.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    ax2.set_xticks(range(1, epochs + 1))
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, default="tanh-2x256", help="default tanh-2x256")
    p.add_argument("--epochs", type=int, help="override the preset's epochs (0: evaluate the initial model)")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="the (peak) learning rate")
    p.add_argument("--momentum", type=float, help="SGD momentum (presets that train with SGD)")
    p.add_argument("--clip", type=float, help="gradient-norm clipping (0: none)")
    p.add_argument("--schedule", choices=("constant", "cosine"))
    p.add_argument("--init", choices=("default", "irnn"), help="irnn: W_hh = I, zero biases")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--data-dir", default="./data", help="the folder holding MNIST/raw/ (default ./data)")
    p.add_argument("--limit", type=int, help="train on the first N images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--report", help="write a JSON report to this file")
    p.add_argument("--plot", help="write the loss curves and test accuracies to this PNG file")
    args = p.parse_args()
    for flag, ok in (("epochs", lambda v: v >= 0), ("batch_size", lambda v: v > 0), ("limit", lambda v: v > 0),
                     ("lr", lambda v: v > 0), ("momentum", lambda v: 0 <= v < 1), ("clip", lambda v: v >= 0)):
        value = getattr(args, flag)
        if value is not None and not ok(value):
            p.error(f"--{flag.replace('_', '-')} {value} is out of range")
    hp = dict(PRESETS[args.preset])
    hp.update({k: getattr(args, k) for k in TRAIN_KEYS if getattr(args, k, None) is not None})
    if hp["momentum"] and hp["optimizer"] != "sgd":
        p.error(f"--momentum applies to SGD; preset {args.preset} trains with {hp['optimizer']}")
    device = torch.device(args.device)

    train_x, train_y = load_split(args.data_dir, True, device)
    test_x, test_y = load_split(args.data_dir, False, device)
    if args.limit:
        train_x, train_y = train_x[:args.limit], train_y[:args.limit]
    print(f"{args.preset}: {describe(hp)}; {len(train_x)} training images, {device}, "
          f"{torch.get_num_threads()} threads", flush=True)

    base = initial_model(hp, args.seed)
    models = {"torch": copy.deepcopy(base).to(device), "fastrnn": fastrnn.convert(copy.deepcopy(base)).to(device)}
    results, (torch_s, fast_s) = train_both(models, hp, (train_x, train_y, test_x, test_y), device, args.seed)
    speedup = None
    if torch_s:
        t, f = results["torch"], results["fastrnn"]
        speedup = {"median": statistics.median(a / b for a, b in zip(torch_s, fast_s)),
                   "total": t["train_seconds"] / f["train_seconds"],
                   "rnn": t["rnn_seconds"] / f["rnn_seconds"]}
    print_table(results, speedup)

    if args.report:
        report = {
            "preset": args.preset, "device": str(device), "threads": torch.get_num_threads(),
            "model": {k: hp[k] for k in MODEL_KEYS}, "training": {k: hp[k] for k in TRAIN_KEYS},
            "train_images": len(train_x), "seed": args.seed, "torch_version": torch.__version__,
            "results": results, "speedup": speedup,
        }
        Path(args.report).write_text(json.dumps(report, indent=2))
        print(f"report written to {args.report}")
    if args.plot:
        write_plot(args.plot, results, f"MNIST row by row, {args.preset}, {device}")
        print(f"plot written to {args.plot}")


if __name__ == "__main__":
    main()
