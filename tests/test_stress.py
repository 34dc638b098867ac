"""Slow stress tests (pytest -m slow): sizes past 2**31 elements / bytes through the raw
ops, and a training memory soak."""

import gc
import os

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

pytestmark = pytest.mark.slow

RNN = torch.ops.fastrnn.rnn
RNN_BACKWARD = torch.ops.fastrnn.rnn_backward


def _free_mib():
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) // 1024
    except (OSError, KeyError, ValueError):
        return 0


def _one_layer_weights(H, dtype, seed):
    """weight_ih [H, 1], weight_hh [H, H], bias_ih [H], bias_hh [H] (zero)."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand(H, 1, generator=g) - 0.5).to(dtype),
            (torch.rand(H, H, generator=g) * 0.5 - 0.25).to(dtype),
            (torch.rand(H, generator=g) - 0.5).to(dtype),
            torch.zeros(H, dtype=dtype)]


def test_forward_output_past_2_pow_31_elements():
    """A bfloat16 output of 2**31 + 3 * 1024 elements (4.3 GB; about 4.7 GB in all): the
    rows past element 2**31 are written by steps whose row offset * H passes 2**31, so
    32-bit offsets anywhere (views, copies of h_n, the step loop) would misplace them.
    Columns are independent in a padded batch: a few, including the last, are checked
    against a small run of their own."""
    T, H = 64, 16
    B = 2 ** 31 // (T * H) + 3
    assert T * B * H > 2 ** 31
    if _free_mib() < 7000:
        pytest.skip("needs about 7 GB of free memory")
    weights = _one_layer_weights(H, torch.bfloat16, 0)
    x = torch.randn(T, B, 1, dtype=torch.bfloat16)
    hx = torch.randn(1, B, H, dtype=torch.bfloat16)
    out, h_n, reserve = RNN(x, hx, weights, True, 1, 0.0, False, False, "tanh", None)
    assert out.shape == (T, B, H) and out.numel() > 2 ** 31 and reserve.numel() == 0
    cols = torch.tensor([0, 1, B // 2, B - 2, B - 1])
    small_out, small_h, _ = RNN(x[:, cols].contiguous(), hx[:, cols].contiguous(), weights, True,
                                1, 0.0, False, False, "tanh", None)
    torch.testing.assert_close(out[:, cols], small_out, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(h_n[:, cols], small_h, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(h_n[0], out[-1], atol=0, rtol=0)
    # the last element lies past 2**31
    flat_last = (T - 1) * B * H + (B - 1) * H + H - 1
    assert flat_last > 2 ** 31
    assert out.flatten()[flat_last] == small_out[-1, -1, -1]
    del out, h_n


def test_backward_past_2_pow_31_bytes():
    """float32 backward on tensors of 2**29 + 3 * 1024 elements (> 2**31 bytes each:
    output and dA; grad_output is expanded from one element, as autograd's gradient of
    .sum() is; about 4.5 GB in all): the fused activation-derivative loop and the
    per-step views reach byte offsets past 2**31. (A backward past 2**31 *elements*
    needs output + dA past 2**31 elements each, 8.6 GB in bfloat16 and 17 GB in float32,
    more than this test may take.) Checked column-wise against a small run."""
    T, H = 16, 32
    B = 2 ** 29 // (T * H) + 3
    if _free_mib() < 7000:
        pytest.skip("needs about 7 GB of free memory")
    weights = _one_layer_weights(H, torch.float32, 1)
    x = torch.randn(T, B, 1)
    hx = torch.randn(1, B, H)
    config = (True, 1, 0.0, False, False, "tanh", None)
    out, h_n, reserve = RNN(x, hx, weights, *config)
    assert out.numel() * out.element_size() > 2 ** 31
    cols = torch.tensor([0, B // 3, B - 1])
    grad_out = torch.ones(1, 1, 1).expand(out.shape)
    grad_h = torch.zeros_like(h_n)
    gx, ghx, gw = RNN_BACKWARD(x, hx, weights, *config, out, reserve, grad_out, grad_h, True, False)
    assert all(g.shape == (0,) for g in gw)
    del grad_out, out
    xs, hs = x[:, cols].contiguous(), hx[:, cols].contiguous()
    small_out, small_h, small_reserve = RNN(xs, hs, weights, *config)
    sgx, sghx, _ = RNN_BACKWARD(xs, hs, weights, *config, small_out, small_reserve,
                                torch.ones_like(small_out), torch.zeros_like(small_h), True, False)
    torch.testing.assert_close(gx[:, cols], sgx, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ghx[:, cols], sghx, rtol=1e-4, atol=1e-5)


def test_reserve_past_2_pow_31_bytes():
    """Two float32 layers with dropout 1 in training: the reserve holds layer 0's output
    and its mask, 2**29 + 3 * 1024 elements each, so the mask starts past byte 2**31
    (about 6.5 GB; 11 GB with backward's dY and dX). Every mask element must be zeroed
    (layer 1 reads zeros: its output is that of a zero input), and backward must read
    the reserve back: the gradient of the input is zero (nothing passes a zero mask),
    that of layer 1's hx is not."""
    T, H = 16, 16
    B = 2 ** 29 // (T * 2 * H) + 3
    N, W = T * B, 2 * H
    assert N * W * 4 > 2 ** 31
    if _free_mib() < 13000:
        pytest.skip("needs about 13 GB of free memory")
    g = torch.Generator().manual_seed(2)
    weights = []
    for layer in range(2):
        for _ in range(2):
            weights += [torch.rand(H, 1 if layer == 0 else W, generator=g) - 0.5,
                        torch.rand(H, H, generator=g) * 0.5 - 0.25,
                        torch.rand(H, generator=g) - 0.5, torch.zeros(H)]
    x = torch.randn(T, B, 1)
    hx = torch.randn(4, B, H) * 0.1
    config = (True, 2, 1.0, True, True, "tanh", None)
    out, h_n, reserve = RNN(x, hx, weights, *config)
    assert reserve.shape == (2 * N * W,)
    mask = reserve[N * W:]
    assert mask.storage_offset() * 4 > 2 ** 31
    assert not bool(mask.any()), "a mask element past byte 2**31 was not zeroed"
    del mask
    # layer 1 read zeros: its output is that of a 1-layer run on a zero input
    cols = torch.tensor([0, B // 2, B - 1])
    small_out, small_h, _ = RNN(torch.zeros(T, len(cols), W), hx[2:, cols].contiguous(),
                                weights[8:], True, 1, 0.0, False, True, "tanh", None)
    torch.testing.assert_close(out[:, cols], small_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_n[2:, cols], small_h, rtol=1e-5, atol=1e-6)
    grad_out = torch.ones(1, 1, 1).expand(out.shape)
    gx, ghx, _ = RNN_BACKWARD(x, hx, weights, *config, out, reserve, grad_out,
                              torch.zeros_like(h_n), True, False)
    assert not bool(gx.any())
    assert bool(ghx[2:].any()) and not bool(ghx[:2].any())


def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_training_memory_is_flat():
    """2,000 training steps (padded and packed, tanh and relu layers, dropout) keep the
    resident memory flat after warm-up: a tensor leaked per step (>= 64 KiB each here)
    would add > 100 MiB."""
    torch.manual_seed(0)
    model = nn.ModuleDict(dict(
        a=fastrnn.RNN(8, 32, 2, bidirectional=True, dropout=0.1),
        b=fastrnn.RNN(64, 32, nonlinearity="relu", batch_first=True),
    ))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x = torch.randn(32, 16, 8)
    lengths = torch.randint(1, 33, (16,))
    lengths[0] = 32

    def step(i):
        inp = pack_padded_sequence(x, lengths, enforce_sorted=False) if i % 2 else x
        out, h = model["a"](inp)
        if i % 2:
            out = nn.utils.rnn.pad_packed_sequence(out, total_length=32)[0]
        out2, h2 = model["b"](out.transpose(0, 1))
        loss = out2.square().mean() + h.square().mean() + h2.square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(200):
        step(i)
    gc.collect()
    start = rss_mib()
    samples = []
    for i in range(200, 2000):
        step(i)
        if i % 200 == 199:
            gc.collect()
            samples.append(rss_mib())
    growth = samples[-1] - start
    assert growth < 24, f"RSS grew {growth:.1f} MiB over 1,800 steps: {start:.1f} -> {samples}"


def test_lstm_reserve_past_2_pow_31_elements(monkeypatch):
    """A bfloat16 LSTM forward whose reserve (the activated gates [N, 4H] then c [N, H])
    holds 2**31 + 5 * 16 * 3 * 64 elements (8.6 GB: a half-type call on the CPU keeps it in
    float32; about 9 GB in all): the cell states of the last rows are written past element
    2**31, so 32-bit offsets in the saved-tensor views or the LSTM step would misplace them.
    Columns (sequences) are independent: a few, the last included, are checked against a
    small run of their own -- output, h_n, c_n and the saved c and gates -- both with the
    input projection inside the step (the small run's batch would take it outside, which
    sums in another order)."""
    monkeypatch.setenv("FASTRNN_CPU_PROJECT_INSIDE", "1")
    T, H = 64, 16
    per_row = 5 * H  # saved_per_row: gates 4H and c H
    B = 2 ** 31 // (T * per_row) + 3
    N = T * B
    assert N * per_row > 2 ** 31
    if _free_mib() < 11000:
        pytest.skip("needs about 11 GB of free memory")
    g = torch.Generator().manual_seed(3)
    weights = [(torch.rand(4 * H, 1, generator=g) - 0.5).bfloat16(),
               (torch.rand(4 * H, H, generator=g) * 0.5 - 0.25).bfloat16(),
               (torch.rand(4 * H, generator=g) - 0.5).bfloat16(),
               torch.zeros(4 * H, dtype=torch.bfloat16)]
    x = torch.randn(T, B, 1, dtype=torch.bfloat16)
    hx = torch.randn(1, B, H, dtype=torch.bfloat16)
    cx = torch.randn(1, B, H, dtype=torch.bfloat16)
    LSTM = torch.ops.fastrnn.lstm
    out, h_n, c_n, reserve = LSTM(x, hx, cx, weights, True, 1, 0.0, False, False, None)
    assert reserve.shape == (N * per_row,) and reserve.numel() > 2 ** 31
    gates = reserve[: N * 4 * H].view(T, B, 4 * H)
    cs = reserve[N * 4 * H:].view(T, B, H)
    cols = torch.tensor([0, 1, B // 2, B - 2, B - 1])
    small = LSTM(x[:, cols].contiguous(), hx[:, cols].contiguous(), cx[:, cols].contiguous(),
                 weights, True, 1, 0.0, False, False, None)
    s_out, s_h, s_c, s_reserve = small
    s_gates = s_reserve[: T * len(cols) * 4 * H].view(T, len(cols), 4 * H)
    s_cs = s_reserve[T * len(cols) * 4 * H:].view(T, len(cols), H)
    for big, want in ((out[:, cols], s_out), (h_n[:, cols], s_h), (c_n[:, cols], s_c),
                      (cs[:, cols], s_cs), (gates[:, cols], s_gates)):
        torch.testing.assert_close(big, want, atol=0, rtol=0)  # same kernels, same rows
    # the last saved c lies past element 2**31 and is the last step's c: c_n
    assert N * 4 * H + (T - 1) * B * H + (B - 1) * H > 2 ** 31
    torch.testing.assert_close(cs[-1].to(c_n.dtype), c_n[0], atol=0, rtol=0)
