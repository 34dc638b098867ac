"""One forward and backward of fastrnn.RNN on its persistent kernels, float32, for Nsight
Compute (.ci/gpu/stage.sh 0): cuDNN's published persistent case (T=1406, B=34, H=120), a layer
of the MNIST 2x128 tanh model (T=28, B=100; one CTA per tile) and of the 2x256 one (T=28, B=64;
a cluster per tile, which hands each step over by st.async and mbarriers), so that the profile
says where a step's time goes."""

import torch

import fastrnn

torch.manual_seed(0)
for steps, batch, inp, hidden, layers in ((1406, 34, 120, 120, 1), (28, 100, 28, 128, 1), (28, 64, 28, 256, 1)):
    rnn = fastrnn.RNN(inp, hidden, layers).cuda()
    x = torch.randn(steps, batch, inp, device="cuda", requires_grad=True)
    out, h = rnn(x)
    (out.sum() + h.sum()).backward()
torch.cuda.synchronize()
print("profile case ran")
