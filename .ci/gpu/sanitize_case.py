"""A small forward+backward through every CUDA kernel fastrnn has, for
compute-sanitizer (.ci/gpu/stage.sh 0 and 2): each dtype, tanh and relu, padded and
packed, reverse directions, two layers with dropout, hidden sizes on both sides of
the persistent kernels' limits (one CTA, a cluster, one of 16 CTAs in float32, neither),
RNN, LSTM and GRU.
With --quick (racecheck, which tracks every shared-memory access and so runs the persistent
kernels thousands of times slower): float32, one layer each way, a one-CTA and a cluster size
of each cell; every persistent kernel still reached."""

import sys

import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

torch.manual_seed(0)
CASES = [(fastrnn.RNN, hidden, kw) for hidden in (8, 100, 260, 700, 1400)
         for kw in (dict(num_layers=2, bidirectional=True, dropout=0.3), dict(nonlinearity="relu"))]
CASES += [(cls, hidden, dict(num_layers=2, bidirectional=True, dropout=0.3))
          for cls in (fastrnn.LSTM, fastrnn.GRU) for hidden in (8, 100, 130)]
QUICK = "--quick" in sys.argv[1:]
if QUICK:
    CASES = [(cls, hidden, dict(bidirectional=True)) for cls, sizes in
             ((fastrnn.RNN, (8, 260)), (fastrnn.LSTM, (8, 130)), (fastrnn.GRU, (8, 130)))
             for hidden in sizes]
for dtype in (torch.float32,) if QUICK else (
        torch.float32, torch.float64, torch.float16, torch.bfloat16):
    for cls, hidden, kw in CASES:
        rnn = cls(8, hidden, **kw).to("cuda", dtype)
        x = torch.randn(6, 3, 8, device="cuda", dtype=dtype, requires_grad=True)
        lengths = torch.tensor([6, 2, 4])
        for inp in (x, pack_padded_sequence(x, lengths, enforce_sorted=False)):
            out, h = rnn(inp)
            out = out.data if hasattr(out, "batch_sizes") else out
            h = h if isinstance(h, tuple) else (h,)
            (out.float().sum() + sum(t.float().sum() for t in h)).backward()
torch.cuda.synchronize()
print("sanitizer case ran")
