"""fastrnn.RNN against torch.nn.RNN over the whole configuration grid:
output, h_n and the gradients of the input, h0 and every parameter."""

import itertools

import pytest
import torch

from conftest import assert_close_all, devices, grads, lengths_for, pack, rnn_pair, weighted_sum

T, B, I, H = 5, 3, 4, 6

GRID = [
    dict(nonlinearity=nl, bias=bias, batch_first=bf, bidirectional=bd, num_layers=nlayers,
         batched=batched, h0=h0, packed=packed)
    for nl, bias, bf, bd, nlayers, batched, h0, packed in itertools.product(
        ["tanh", "relu"], [True, False], [False, True], [False, True], [1, 2, 3],
        [True, False], [False, True], [False, True])
    if batched or not packed  # a PackedSequence is always batched
]


def grid_id(c):
    return "-".join([
        c["nonlinearity"], "bias" if c["bias"] else "nobias", "bf" if c["batch_first"] else "tf",
        "bi" if c["bidirectional"] else "uni", f"L{c['num_layers']}",
        "batched" if c["batched"] else "unbatched", "h0" if c["h0"] else "noh0",
        "packed" if c["packed"] else "padded",
    ])


def run_case(c, dtype, device):
    ref, fast = rnn_pair(I, H, num_layers=c["num_layers"], nonlinearity=c["nonlinearity"],
                         bias=c["bias"], batch_first=c["batch_first"],
                         bidirectional=c["bidirectional"], seed=len(grid_id(c)))
    ref, fast = ref.to(device, dtype), fast.to(device, dtype)
    dirs = 2 if c["bidirectional"] else 1
    g = torch.Generator().manual_seed(7)
    shape = (B, T, I) if c["batch_first"] else (T, B, I)
    if not c["batched"]:
        shape = (T, I)
    x = torch.randn(shape, generator=g, dtype=dtype).to(device).requires_grad_()
    h0 = None
    if c["h0"]:
        h_shape = (c["num_layers"] * dirs, B, H) if c["batched"] else (c["num_layers"] * dirs, H)
        h0 = torch.randn(h_shape, generator=g, dtype=dtype).to(device).requires_grad_()

    results = []
    for module in (ref, fast):
        inp = pack(x, lengths_for(B, T), c["batch_first"]) if c["packed"] else x
        out, h_n = module(inp, h0)
        loss = weighted_sum(out, h_n)
        results.append((out, h_n, grads(module, loss, [x, h0])))
    return results


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("c", GRID, ids=grid_id)
def test_parity_with_torch(c, dtype, device):
    (out_r, h_r, g_r), (out_f, h_f, g_f) = run_case(c, dtype, device)
    if c["packed"]:
        assert type(out_f) is type(out_r)
        assert torch.equal(out_f.batch_sizes, out_r.batch_sizes)
        assert torch.equal(out_f.unsorted_indices, out_r.unsorted_indices)
        out_r, out_f = out_r.data, out_f.data
    assert out_f.shape == out_r.shape and h_f.shape == h_r.shape
    assert out_f.dtype == dtype and h_f.dtype == dtype
    assert_close_all([out_f, h_f], [out_r, h_r], dtype, "output/h_n")
    assert_close_all(g_f, g_r, dtype, "grads (input, h0, parameters)")
