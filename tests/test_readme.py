"""The README's Python snippets run as written and do what the text says."""

import copy
import re
import shlex
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import torch

import fastrnn

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_use_section_snippets():
    blocks = python_blocks()
    assert len(blocks) >= 2, "the README lost its usage snippets"
    ns = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)  # noqa: S102 - our own README

    assert isinstance(ns["rnn"], fastrnn.RNN)
    assert ns["output"].shape == (64, 28, 128) and ns["h_n"].shape == (2, 64, 128)

    # convert() swapped the RNN inside the README's model class, in place.
    model = ns["model"]
    assert isinstance(model.rnn, fastrnn.RNN)
    reference = ns["MnistRNN"]()
    assert isinstance(reference.rnn, torch.nn.RNN) and not isinstance(reference.rnn, fastrnn.RNN)
    reference.load_state_dict(copy.deepcopy(model.state_dict()))  # strict: same keys
    x = torch.randn(8, 28, 28)
    torch.testing.assert_close(model(x), reference(x))


def test_torch_pin_matches_the_installed_torch():
    # pip checks a constraint against the installed package's version; a CUDA wheel's
    # torch.__version__ carries a local label (+cu130) that pip's does not.
    for doc in (README, README.parent / "examples" / "README.md"):
        lines = [l for l in doc.read_text().splitlines() if l.endswith("> torch-pin.txt")]
        assert len(lines) == 1, doc
        argv = shlex.split(lines[0].removesuffix("> torch-pin.txt"))
        assert argv[:2] == ["python", "-c"], lines[0]
        pin = subprocess.run([sys.executable, *argv[1:]], capture_output=True, text=True,
                             check=True).stdout.strip()
        assert pin == f"torch=={version('torch')}", (doc, pin)
