"""examples/mnist_rnn.py and benchmarks/mnist_train.py end to end, run as scripts on CPU.

The training tests decompress the real MNIST files (gzip, from $MNIST_GZ_DIR or
../shared/data/MNIST/raw beside the repository) into a temporary folder and pass
it as --data-dir with --no-download: nothing is ever downloaded, and the tests
are skipped when the files are missing. Every output goes to temporary folders.
"""

import copy
import gzip
import importlib.util
import json
import math
import os
import re
import runpy
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastrnn

pytest.importorskip("torchvision")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "mnist_rnn.py"
TRAIN_BENCH = REPO / "benchmarks" / "mnist_train.py"
MNIST_GZ = Path(os.environ.get("MNIST_GZ_DIR", REPO.parent / "shared" / "data" / "MNIST" / "raw"))
RAW_NAMES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# The default preset (tanh-2x256, readout from all 28 steps) learns fastest per image:
# one epoch of 60 Adam steps on 6000 images reaches about 90% test accuracy.
QUICK = ["--limit", "6000", "--epochs", "1", "--batch-size", "100", "--lr", "1.5e-3"]


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # benchmarks/ modules import their neighbours
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    return module


@pytest.fixture(scope="module")
def mnist_root(tmp_path_factory):
    """A data root holding MNIST/raw/ with the four files decompressed, as torchvision wants them."""
    if not all((MNIST_GZ / (n + ".gz")).is_file() for n in RAW_NAMES):
        pytest.skip(f"MNIST (gzip) not found in {MNIST_GZ}; set MNIST_GZ_DIR")
    root = tmp_path_factory.mktemp("data")
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in RAW_NAMES:
        with gzip.open(MNIST_GZ / (name + ".gz"), "rb") as fin, open(raw / name, "wb") as fout:
            shutil.copyfileobj(fin, fout)
    return root


def run_script(script, args, cwd, timeout=300, threads=1):
    env = dict(os.environ)
    # One intra-op thread by default: on a small, shared machine OpenMP threads that
    # compete with another process slow training down many times over.
    env["OMP_NUM_THREADS"] = str(threads)
    env["MPLBACKEND"] = "Agg"
    # The scripts import the fastrnn these tests import (installed, or built in place).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(fastrnn.__file__).parents[1]),
                                                      env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(script), "--device", "cpu", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def run_until_exit(script, args, capsys):
    """(exit status, stderr) of the script run in this process (runpy, as __main__), for the
    calls that stop before training (the command line's check, the data's): without a new
    interpreter's 5 s of imports. The script must end by SystemExit, not by another exception
    (whose traceback the interpreter would print); a message it exits with is what the
    interpreter would print to stderr, with status 1."""
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(script), "--device", "cpu", *map(str, args)]
    sys.path.insert(0, str(script.parent))  # benchmarks/ scripts import their neighbours
    try:
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    code, stderr = exit_.value.code, capsys.readouterr().err
    if code is None or isinstance(code, int):
        return code or 0, stderr
    return 1, f"{stderr}{code}\n"


def describe(proc):
    return f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def assert_clean_exit(proc):
    assert proc.returncode == 0, describe(proc)
    assert "Traceback" not in proc.stderr, describe(proc)


def final_accuracies(stdout):
    m = re.search(r"^Test accuracy: torch\.nn\.\w+ ([\d.]+)%, fastrnn\.\w+ ([\d.]+)%$", stdout, re.M)
    assert m, stdout[-2000:]
    return float(m.group(1)), float(m.group(2))


def speedup(stdout):
    m = re.search(r"^Speedup: fastrnn\.\w+ trains ([\d.]+)x as fast as torch\.nn\.\w+ "
                  r"\(median over (\d+) training steps", stdout, re.M)
    assert m, stdout[-2000:]
    return float(m.group(1)), int(m.group(2))


# --------------------------------------------------------------------------- the example


@pytest.fixture(scope="module")
def quick(mnist_root, tmp_path_factory):
    """One quick run of the example on 6000 images, shared by the tests below."""
    cwd = tmp_path_factory.mktemp("quick")
    proc = run_script(EXAMPLE, [*QUICK, "--data-dir", mnist_root, "--no-download", "--log-interval", "10",
                                "--save-model"], cwd=cwd)
    assert_clean_exit(proc)
    return cwd, proc


def test_quick_run_learns_and_both_agree(quick):
    _, proc = quick
    assert "tanh-2x256: 2 layer(s) tanh, hidden 256, adam lr 0.0015, batch 100, 1 epoch(s), 6000 training images" \
        in proc.stdout
    torch_acc, fast_acc = final_accuracies(proc.stdout)
    assert torch_acc >= 85.0 and fast_acc >= 85.0, (torch_acc, fast_acc)
    assert abs(torch_acc - fast_acc) <= 1.0
    # Same initial weights and the same batches: the losses coincide up to rounding,
    # the first step's most closely.
    losses = [(float(a), float(b)) for a, b in
              re.findall(r"^Train Epoch: 1 .*Loss: torch\.nn\.\w+ ([\d.]+)  fastrnn\.\w+ ([\d.]+)$", proc.stdout, re.M)]
    assert len(losses) == 6, proc.stdout  # 60 steps, logged every 10
    assert 2.0 < losses[0][0] < 2.6  # about ln(10) before any training
    assert math.isclose(*losses[0], rel_tol=1e-4), losses
    for a, b in losses:
        assert math.isclose(a, b, rel_tol=0.05, abs_tol=0.02), losses
    assert losses[-1][0] < losses[0][0]
    ratio, steps = speedup(proc.stdout)
    assert steps == 60 and 0.1 < ratio < 20, (ratio, steps)


def test_saved_model_loads_into_torch_nn_rnn(quick, mnist_root):
    """--save-model writes the fastrnn model's state_dict; the same model on torch.nn.RNN loads
    it strictly and scores the accuracy the script printed for fastrnn."""
    from torchvision import datasets, transforms

    cwd, proc = quick
    example = load_module("mnist_rnn_example", EXAMPLE)
    model = example.Net("rnn", 256, 2, "tanh", "all")
    assert type(model.rnn) is torch.nn.RNN
    model.load_state_dict(torch.load(cwd / "mnist_rnn.pt", map_location="cpu", weights_only=True))
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    loader = torch.utils.data.DataLoader(datasets.MNIST(mnist_root, train=False, transform=tf), batch_size=1000)
    assert example.test(model, torch.device("cpu"), loader) == pytest.approx(final_accuracies(proc.stdout)[1],
                                                                            abs=0.011)


@pytest.mark.parametrize("train", [True, False], ids=["train", "test"])
def test_loaded_images_are_torchvisions_transforms(mnist_root, train):
    """The example normalises each split once, as tensors: the very values (and labels) that
    ToTensor() and Normalize() give image by image, so its runs learn as before."""
    from torchvision import datasets, transforms

    example = load_module("mnist_rnn_example", EXAMPLE)
    loaded = example.load_mnist(mnist_root, train, download=False)
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    reference = datasets.MNIST(mnist_root, train=train, transform=tf)
    assert len(loaded) == len(reference) == (60000 if train else 10000)
    for i in range(0, len(reference), 613):
        (want, label), (got, got_label) = reference[i], loaded[i]
        assert got.shape == want.shape == (1, 28, 28) and got.dtype == want.dtype
        assert torch.equal(got, want) and got_label.item() == label, i


def test_presets_and_initial_weights_match_the_benchmarks():
    """benchmarks/mnist_train.py and mnist_step.py measure the example's very models."""
    example = load_module("mnist_rnn_example", EXAMPLE)
    bench = load_module("mnist_model", REPO / "benchmarks" / "mnist_model.py")
    assert set(example.PRESETS) == set(bench.PRESETS)
    for name, hp in example.PRESETS.items():
        assert hp == {k: bench.PRESETS[name][k] for k in hp}, name
        assert bench.PRESETS[name]["schedule"] == "cosine"
        torch.manual_seed(0)  # as the example seeds before building its model
        model = example.Net(hp["cell"], hp["hidden_size"], hp["num_layers"], hp["nonlinearity"], hp["readout"])
        if hp["init"] == "irnn":
            example.irnn_init(model.rnn)
        ref = bench.initial_model(bench.PRESETS[name], seed=0).state_dict()
        assert model.state_dict().keys() == ref.keys(), name
        for k, v in model.state_dict().items():
            assert torch.equal(v, ref[k]), (name, k)


def test_relu_preset_starts_from_irnn_in_both_implementations():
    example = load_module("mnist_rnn_example", EXAMPLE)
    torch.manual_seed(0)
    model = example.Net("rnn", 100, 1, "relu", "last")
    example.irnn_init(model.rnn)
    fast = fastrnn.convert(copy.deepcopy(model))
    assert type(fast.rnn) is fastrnn.RNN
    for m in (model, fast):
        assert torch.equal(m.rnn.weight_hh_l0, torch.eye(100))
        assert not m.rnn.bias_ih_l0.any() and not m.rnn.bias_hh_l0.any()
        assert 0.12 < m.rnn.weight_ih_l0.std().item() < 0.26  # N(0, 1/28): std 0.19
    x = torch.randn(4, 1, 28, 28)
    torch.testing.assert_close(fast(x), model(x))


@pytest.mark.parametrize("flag, value, message", [
    ("--epochs", "0", "argument --epochs: must be positive, got 0"),
    ("--lr", "0", "argument --lr: must be positive"),
    ("--batch-size", "-5", "argument --batch-size: must be positive"),
    ("--limit", "zero", "argument --limit: invalid"),
    ("--preset", "tanh-9x9", "argument --preset: invalid choice"),
])
def test_bad_flags(tmp_path, capsys, flag, value, message):
    code, stderr = run_until_exit(EXAMPLE, [flag, value, "--data-dir", tmp_path, "--no-download"], capsys)
    assert code == 2, stderr
    assert message in stderr, stderr


def test_missing_data_says_where_to_put_it(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    code, stderr = run_until_exit(EXAMPLE, ["--data-dir", tmp_path / "empty", "--no-download"], capsys)
    assert code == 1, stderr
    raw = tmp_path / "empty" / "MNIST" / "raw"
    assert f"error: could not load MNIST from {raw} (not found)" in stderr, stderr
    assert f"t10k-labels-idx1-ubyte (decompressed) in {raw}/" in stderr, stderr


def test_corrupt_data_is_a_clear_error(tmp_path, capsys):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    # A good header on a file cut short, as an interrupted copy leaves it; the others are never read.
    (raw / RAW_NAMES[0]).write_bytes(struct.pack(">IIII", 0x803, 60000, 28, 28) + bytes(1000))
    for name in RAW_NAMES[1:]:
        (raw / name).write_bytes(b"x")
    code, stderr = run_until_exit(EXAMPLE, ["--data-dir", tmp_path / "data", "--no-download"], capsys)
    assert code == 1, stderr
    assert f"error: could not load MNIST from {raw} (" in stderr, stderr
    assert "(not found)" not in stderr, stderr  # the reason is the read error


# The accuracies these two models are known to reach; a full run of each preset must reach
# them with both implementations.
REFERENCE_TEST_ACCURACY = {"relu-1x100": 97.35, "tanh-2x256": 97.48, "lstm-2x128": 97.78}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(REFERENCE_TEST_ACCURACY))
def test_full_run_reaches_reference_accuracy(mnist_root, tmp_path, preset):
    proc = run_script(EXAMPLE, ["--preset", preset, "--data-dir", mnist_root, "--no-download"],
                      cwd=tmp_path, timeout=3600, threads=os.cpu_count() or 1)
    assert_clean_exit(proc)
    torch_acc, fast_acc = final_accuracies(proc.stdout)
    assert torch_acc >= REFERENCE_TEST_ACCURACY[preset], proc.stdout[-1500:]
    assert fast_acc >= REFERENCE_TEST_ACCURACY[preset], proc.stdout[-1500:]
    assert abs(torch_acc - fast_acc) <= 1.0, proc.stdout[-1500:]
    ratio, steps = speedup(proc.stdout)
    assert steps == {"relu-1x100": 6 * 469, "tanh-2x256": 3 * 938, "lstm-2x128": 2 * 938}[preset]
    assert ratio > 0


# --------------------------------------------------------------------------- benchmarks/mnist_train.py


def test_benchmark_report_and_plot(mnist_root, tmp_path):
    report, plot = tmp_path / "report.json", tmp_path / "curves.png"
    proc = run_script(TRAIN_BENCH, ["--preset", "relu-1x100", "--limit", "1280", "--epochs", "2", "--clip", "0.5",
                                    "--data-dir", mnist_root, "--report", report, "--plot", plot], cwd=tmp_path)
    assert_clean_exit(proc)
    r = json.loads(report.read_text())
    assert r["preset"] == "relu-1x100" and r["device"] == "cpu" and r["train_images"] == 1280
    assert r["training"] == {"optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "clip": 0.5, "init": "irnn",
                             "batch_size": 128, "epochs": 2, "schedule": "cosine"}
    res = r["results"]
    assert set(res) == {"torch", "fastrnn"}
    for impl, x in res.items():
        assert x["loss_steps"] == [10, 20] and len(x["losses"]) == 2, (impl, x["loss_steps"])
        assert x["final_loss"] == x["losses"][-1] and all(math.isfinite(v) for v in x["losses"])
        assert len(x["epoch_seconds"]) == 2 and math.isclose(sum(x["epoch_seconds"]), x["train_seconds"])
        assert x["test_accuracy_per_epoch"][-1] == x["test_accuracy"] > 20.0  # learned (chance is 10%)
        assert 0.0 < x["rnn_share"] <= 1.0
        assert math.isclose(x["rnn_seconds"], x["rnn_forward_seconds"] + x["rnn_backward_seconds"])
    t, f = res["torch"], res["fastrnn"]
    assert math.isclose(t["losses"][0], f["losses"][0], rel_tol=1e-4), (t["losses"], f["losses"])
    assert abs(t["test_accuracy"] - f["test_accuracy"]) <= 1.0
    assert math.isclose(r["speedup"]["total"], t["train_seconds"] / f["train_seconds"])
    assert r["speedup"]["median"] > 0
    table = {line.split()[0]: line.split() for line in proc.stdout.splitlines() if line.split()[:1] in (["torch"], ["fastrnn"])}
    assert table["fastrnn"][1] == f"{f['test_accuracy']:.2f}%", proc.stdout
    png = plot.read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000
    width, height = struct.unpack(">II", png[16:24])  # IHDR
    assert width > height > 100


@pytest.mark.parametrize("args, message", [
    (["--momentum", "0.5"], "--momentum applies to SGD; preset tanh-2x256 trains with adam"),
    (["--preset", "relu-1x100", "--momentum", "1"], "--momentum 1.0 is out of range"),
    (["--clip", "-1"], "--clip -1.0 is out of range"),
])
def test_benchmark_bad_flags(tmp_path, capsys, args, message):
    code, stderr = run_until_exit(TRAIN_BENCH, [*args, "--data-dir", tmp_path], capsys)
    assert code == 2, stderr
    assert message in stderr, stderr


def test_benchmark_missing_data(tmp_path, capsys):
    code, stderr = run_until_exit(TRAIN_BENCH, ["--data-dir", tmp_path], capsys)
    assert code == 1, stderr
    assert f"could not load MNIST from {tmp_path / 'MNIST' / 'raw'} (not found)" in stderr, stderr
