"""The row-by-row MNIST models of examples/mnist_rnn.py, for the benchmarks.

Each 28x28 image is a sequence of 28 rows of 28 pixels. The presets are the
example's; the benchmarks add flags to vary what the presets fix (momentum,
clipping, schedule, initialisation). tests/test_mnist_example.py checks that the
two stay the same models with the same initial weights.
"""

import torch
from torch import nn

SEQ_LEN, INPUT_SIZE, NUM_CLASSES = 28, 28, 10
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081

# relu-1x100 reaches 97.7% test accuracy and tanh-2x256 98.8% (benchmarks/RESULTS.md has
# the runs behind each setting); every preset anneals the learning rate to 0 on a cosine.
PRESETS = {
    "tanh-2x256": dict(cell="rnn", hidden_size=256, num_layers=2, nonlinearity="tanh", readout="all",
                       optimizer="adam", lr=1e-3, momentum=0.0, clip=0.0, init="default",
                       batch_size=64, epochs=3, schedule="cosine"),
    "relu-1x100": dict(cell="rnn", hidden_size=100, num_layers=1, nonlinearity="relu", readout="last",
                       optimizer="sgd", lr=0.01, momentum=0.9, clip=1.0, init="irnn",
                       batch_size=128, epochs=6, schedule="cosine"),
    "tanh-2x128": dict(cell="rnn", hidden_size=128, num_layers=2, nonlinearity="tanh", readout="last",
                       optimizer="adam", lr=1e-3, momentum=0.0, clip=0.0, init="default",
                       batch_size=100, epochs=2, schedule="cosine"),
    "lstm-2x128": dict(cell="lstm", hidden_size=128, num_layers=2, nonlinearity=None, readout="last",
                       optimizer="adam", lr=1e-3, momentum=0.0, clip=0.0, init="default",
                       batch_size=64, epochs=2, schedule="cosine"),
}
MODEL_KEYS = ("cell", "hidden_size", "num_layers", "nonlinearity", "readout")
TRAIN_KEYS = ("optimizer", "lr", "momentum", "clip", "init", "batch_size", "epochs", "schedule")


class Net(nn.Module):
    def __init__(self, cell, hidden_size, num_layers, nonlinearity, readout):
        super().__init__()
        if cell == "lstm":
            self.rnn = nn.LSTM(INPUT_SIZE, hidden_size, num_layers, batch_first=True)
        else:
            self.rnn = nn.RNN(INPUT_SIZE, hidden_size, num_layers, nonlinearity=nonlinearity,
                              batch_first=True)
        self.readout = readout
        self.fc = nn.Linear(hidden_size * (SEQ_LEN if readout == "all" else 1), NUM_CLASSES)

    def forward(self, x):
        out, _ = self.rnn(x.reshape(-1, SEQ_LEN, INPUT_SIZE))
        return self.fc(out.flatten(1) if self.readout == "all" else out[:, -1])


def irnn_init(rnn):
    """W_hh = I and zero biases (Le, Jaitly and Hinton, 2015): an untrained relu RNN then
    carries its state from row to row instead of letting it fade or blow up."""
    with torch.no_grad():
        for name, p in rnn.named_parameters():
            if name.startswith("weight_hh"):
                p.copy_(torch.eye(p.shape[0]))
            elif name.startswith("bias"):
                p.zero_()
            else:
                p.normal_(0.0, p.shape[1] ** -0.5)


def initial_model(hp, seed=0):
    """The model on torch.nn.RNN with the preset's initial weights, drawn from `seed`."""
    torch.manual_seed(seed)
    model = Net(*(hp[k] for k in MODEL_KEYS))
    if hp["init"] == "irnn":
        irnn_init(model.rnn)
    return model


def make_optimizer(model, hp, total_steps):
    """The optimizer and its per-step schedule (cosine from lr to 0, or constant)."""
    if hp["optimizer"] == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=hp["lr"], momentum=hp["momentum"])
    else:
        opt = torch.optim.Adam(model.parameters(), lr=hp["lr"])
    if hp["schedule"] == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return opt, sched


def describe(hp):
    momentum = f" momentum {hp['momentum']:g}" if hp["optimizer"] == "sgd" and hp["momentum"] else ""
    clip = f"clip {hp['clip']:g}" if hp["clip"] > 0 else "no clipping"
    return (
        f"{hp['num_layers']} layer(s), {hp['nonlinearity'] or hp['cell']}, hidden {hp['hidden_size']}, readout from "
        f"{'all steps' if hp['readout'] == 'all' else 'the last step'}; {hp['optimizer']} lr {hp['lr']:g}"
        f"{momentum} ({hp['schedule']}), {clip}, {hp['init']} init, batch {hp['batch_size']}, "
        f"{hp['epochs']} epoch(s)"
    )
