"""Row-by-row MNIST with a recurrent net, trained on torch.nn's RNN (or LSTM) and on fastrnn's side by side.

Each 28x28 image is read as a sequence of 28 rows of 28 pixels. The model is
built once on torch.nn.RNN, and fastrnn.convert() turns a copy of it into the
fastrnn model, so both start from identical weights. They train in lockstep on
identical batches; every training step of one is timed right beside the same
step of the other, so that load coming and going on the machine hits both
alike.

    python examples/mnist_rnn.py                          # tanh-2x256, 3 epochs
    python examples/mnist_rnn.py --preset relu-1x100
    python examples/mnist_rnn.py --preset lstm-2x128      # torch.nn.LSTM vs fastrnn.LSTM
    python examples/mnist_rnn.py --limit 6000 --epochs 1  # a quick look

MNIST is downloaded into --data-dir (default ./data). Offline, put the four
files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte
and t10k-labels-idx1-ubyte (decompressed) in DATA_DIR/MNIST/raw/.
"""

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim.lr_scheduler import CosineAnnealingLR
from torch.utils.data import DataLoader, Subset, TensorDataset
from torchvision import datasets

import fastrnn

# relu-1x100 reaches 97.7% test accuracy, tanh-2x256 98.8%, lstm-2x128 98.9%. Momentum,
# clipping and the IRNN start are what relu-1x100 needs to get there in 6 epochs with SGD at lr 0.01.
PRESETS = {
    "tanh-2x256": dict(cell="rnn", hidden_size=256, num_layers=2, nonlinearity="tanh", readout="all",
                       optimizer="adam", lr=1e-3, momentum=0.0, clip=0.0, init="default",
                       batch_size=64, epochs=3),
    "relu-1x100": dict(cell="rnn", hidden_size=100, num_layers=1, nonlinearity="relu", readout="last",
                       optimizer="sgd", lr=0.01, momentum=0.9, clip=1.0, init="irnn",
                       batch_size=128, epochs=6),
    "tanh-2x128": dict(cell="rnn", hidden_size=128, num_layers=2, nonlinearity="tanh", readout="last",
                       optimizer="adam", lr=1e-3, momentum=0.0, clip=0.0, init="default",
                       batch_size=100, epochs=2),
    "lstm-2x128": dict(cell="lstm", hidden_size=128, num_layers=2, nonlinearity=None, readout="last",
                       optimizer="adam", lr=1e-3, momentum=0.0, clip=0.0, init="default",
                       batch_size=64, epochs=2),
}
IMPLS = ("torch.nn", "fastrnn")
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


class Net(nn.Module):
    def __init__(self, cell, hidden_size, num_layers, nonlinearity, readout):
        super().__init__()
        if cell == "lstm":
            self.rnn = nn.LSTM(28, hidden_size, num_layers, batch_first=True)
        else:
            self.rnn = nn.RNN(28, hidden_size, num_layers, nonlinearity=nonlinearity, batch_first=True)
        # "all" classifies from every row's output, "last" from the last row's alone.
        self.readout = readout
        self.fc = nn.Linear(hidden_size * (28 if readout == "all" else 1), 10)

    def forward(self, x):
        out, _ = self.rnn(x.reshape(-1, 28, 28))  # [batch, 1, 28, 28] -> 28 rows of 28 pixels
        return self.fc(out.flatten(1) if self.readout == "all" else out[:, -1])


def irnn_init(rnn):
    # W_hh = I and zero biases (Le, Jaitly and Hinton, 2015): an untrained relu RNN then
    # carries its state from row to row instead of letting it fade or blow up.
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("weight_hh"):
                p.copy_(torch.eye(p.shape[0]))
            elif name.startswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)


def timed_step(model, optimizer, scheduler, data, target, clip, device):
    # Synchronizing on CUDA makes the time the step's own, not just that of its kernels' launch.
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(data), target)
    loss.backward()
    if clip:
        nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    scheduler.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return loss.item(), time.perf_counter() - start


def train(args, hp, runs, names, step_times, device, train_loader, epoch):
    """One epoch of both models in lockstep, batch by batch."""
    for model, _, _ in runs.values():
        model.train()
    for batch_idx, (data, target) in enumerate(train_loader):
        data, target = data.to(device), target.to(device)
        # Alternate which model goes first, so that neither always finds the caches warm.
        order = IMPLS if batch_idx % 2 == 0 else IMPLS[::-1]
        losses = {}
        for impl in order:
            model, optimizer, scheduler = runs[impl]
            losses[impl], seconds = timed_step(model, optimizer, scheduler, data, target, hp["clip"], device)
            step_times[impl].append(seconds)
        if batch_idx % args.log_interval == 0:
            print("Train Epoch: {} [{}/{} ({:.0f}%)]\tLoss: {} {:.6f}  {} {:.6f}".format(
                epoch, batch_idx * len(data), len(train_loader.dataset), 100.0 * batch_idx / len(train_loader),
                names[IMPLS[0]], losses[IMPLS[0]], names[IMPLS[1]], losses[IMPLS[1]]), flush=True)


def test(model, device, test_loader):
    model.eval()
    correct = 0
    with torch.no_grad():
        for data, target in test_loader:
            data, target = data.to(device), target.to(device)
            correct += (model(data).argmax(dim=1) == target).sum().item()
    return 100.0 * correct / len(test_loader.dataset)


def make_optimizer(model, hp, total_steps):
    if hp["optimizer"] == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"])
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    return optimizer, CosineAnnealingLR(optimizer, T_max=total_steps)  # stepped once per batch


def load_mnist(root, train, download):
    """A split as one tensor of normalised images [N, 1, 28, 28] and one of labels [N]: the same
    values as transforms.ToTensor() and Normalize() give, made once rather than image by image
    every epoch (which took longer than training relu-1x100 on a CPU)."""
    try:
        dataset = datasets.MNIST(root, train=train, download=download)
    except Exception as e:  # missing, unreadable or not downloadable: the user's fix is the same
        raw = os.path.join(root, "MNIST", "raw")
        lines = str(e).strip().splitlines()
        reason = lines[-1] if lines and not lines[0].startswith("Dataset not found") else "not found"
        sys.exit(f"error: could not load MNIST from {raw} ({reason}).\n"
                 f"Put the four files train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte "
                 f"and t10k-labels-idx1-ubyte (decompressed) in {raw}/; with internet access the script "
                 f"downloads those that are missing.")
    images = dataset.data.unsqueeze(1).float().div(255)
    return TensorDataset(images.sub(MNIST_MEAN).div(MNIST_STD), dataset.targets)


def positive(kind):
    def parse(text):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def main():
    parser = argparse.ArgumentParser(description="Row-by-row MNIST RNN on torch.nn and fastrnn, side by side")
    parser.add_argument("--preset", choices=PRESETS, default="tanh-2x256",
                        help="model and training settings (default: tanh-2x256)")
    parser.add_argument("--batch-size", type=positive(int), metavar="N", help="override the preset's batch size")
    parser.add_argument("--epochs", type=positive(int), metavar="N", help="override the preset's epochs")
    parser.add_argument("--lr", type=positive(float), metavar="LR", help="override the preset's peak learning rate")
    parser.add_argument("--test-batch-size", type=positive(int), default=1000, metavar="N",
                        help="input batch size for testing (default: 1000)")
    parser.add_argument("--limit", type=positive(int), metavar="N", help="train on the first N images only")
    parser.add_argument("--data-dir", default="./data", help="where MNIST/raw/ is, or is downloaded to (default: ./data)")
    parser.add_argument("--no-download", action="store_true", help="fail instead of downloading missing data")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default: 0)")
    parser.add_argument("--log-interval", type=positive(int), default=100, metavar="N",
                        help="how many batches to wait before logging the losses (default: 100)")
    parser.add_argument("--save-model", action="store_true",
                        help="save the fastrnn model's state_dict to mnist_rnn.pt (it loads into the torch.nn model too)")
    args = parser.parse_args()
    hp = dict(PRESETS[args.preset])
    hp.update({k: getattr(args, k) for k in ("batch_size", "epochs", "lr") if getattr(args, k) is not None})
    device = torch.device(args.device)

    train_set = load_mnist(args.data_dir, True, not args.no_download)
    test_set = load_mnist(args.data_dir, False, not args.no_download)
    if args.limit:
        train_set = Subset(train_set, range(min(args.limit, len(train_set))))
    torch.manual_seed(args.seed)  # the initial weights and the batches' order
    train_loader = DataLoader(train_set, batch_size=hp["batch_size"], shuffle=True)
    test_loader = DataLoader(test_set, batch_size=args.test_batch_size)

    model = Net(hp["cell"], hp["hidden_size"], hp["num_layers"], hp["nonlinearity"], hp["readout"])
    if hp["init"] == "irnn":
        irnn_init(model.rnn)
    models = {"torch.nn": model.to(device), "fastrnn": fastrnn.convert(copy.deepcopy(model))}
    names = {impl: f"{impl}.{type(models['torch.nn'].rnn).__name__}" for impl in IMPLS}
    runs = {impl: (m, *make_optimizer(m, hp, hp["epochs"] * len(train_loader))) for impl, m in models.items()}
    step_times = {impl: [] for impl in IMPLS}

    print(f"{args.preset}: {hp['num_layers']} layer(s) {hp['nonlinearity'] or hp['cell']}, hidden {hp['hidden_size']}, "
          f"{hp['optimizer']} lr {hp['lr']:g}, batch {hp['batch_size']}, {hp['epochs']} epoch(s), "
          f"{len(train_set)} training images, {device}")
    for epoch in range(1, hp["epochs"] + 1):
        train(args, hp, runs, names, step_times, device, train_loader, epoch)
        accuracy = {impl: test(models[impl], device, test_loader) for impl in IMPLS}
        seconds = {impl: sum(step_times[impl][-len(train_loader):]) for impl in IMPLS}
        print("\nTest set, epoch {}: accuracy {} {:.2f}%, {} {:.2f}%; "
              "training steps took {:.1f} s and {:.1f} s\n".format(
                  epoch, names[IMPLS[0]], accuracy[IMPLS[0]], names[IMPLS[1]], accuracy[IMPLS[1]],
                  seconds[IMPLS[0]], seconds[IMPLS[1]]))

    # The two steps of a pair ran back to back, so load that comes and goes hits both alike;
    # the median of the pairs' ratios also sets aside the odd step that a burst of load hit.
    ratios = [t / f for t, f in zip(step_times[IMPLS[0]], step_times[IMPLS[1]])]
    print(f"Test accuracy: {names[IMPLS[0]]} {accuracy[IMPLS[0]]:.2f}%, {names[IMPLS[1]]} {accuracy[IMPLS[1]]:.2f}%")
    print(f"Speedup: {names[IMPLS[1]]} trains {statistics.median(ratios):.2f}x as fast as {names[IMPLS[0]]} "
          f"(median over {len(ratios)} training steps, each timed beside the other's)")

    if args.save_model:
        torch.save(models["fastrnn"].state_dict(), "mnist_rnn.pt")


if __name__ == "__main__":
    main()
