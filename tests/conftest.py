"""Shared helpers: the same RNN built twice (torch.nn.RNN and fastrnn.RNN) and
a loss with random weights so every output element carries its own gradient."""

import copy

import pytest
import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

import fastrnn

TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-5),
}

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")


def devices():
    """CPU always; CUDA when a GPU is visible (skipped with a reason otherwise)."""
    return ["cpu", pytest.param("cuda", marks=CUDA)]


def rnn_pair(*args, seed=0, **kwargs):
    """(torch.nn.RNN, fastrnn.RNN) with identical parameters."""
    torch.manual_seed(seed)
    ref = torch.nn.RNN(*args, **kwargs)
    fast = fastrnn.convert(copy.deepcopy(ref))
    assert type(fast) is fastrnn.RNN
    return ref, fast


def lengths_for(batch, steps, seed=0):
    """Uneven lengths in 1..steps, unsorted, with the maximum present."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[int(torch.randint(0, batch, (1,), generator=g))] = steps
    return lengths


def weighted_sum(out, h_n, seed=1):
    """A scalar whose gradient differs in every element of out and h_n."""
    if isinstance(out, PackedSequence):
        out = out.data
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    w_h = torch.randn(h_n.shape, generator=g, dtype=torch.float64).to(h_n)
    return (out * w_out).sum() + (h_n * w_h).sum()


def grads(module, loss, extra):
    tensors = [t for t in extra if t is not None] + list(module.parameters())
    return torch.autograd.grad(loss, tensors)


def assert_close_all(actual, expected, dtype, what=""):
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        torch.testing.assert_close(a, e, **TOL[dtype], msg=lambda m: f"{what}[{i}]: {m}")


def pack(x, lengths, batch_first):
    return pack_padded_sequence(x, lengths, batch_first=batch_first, enforce_sorted=False)
