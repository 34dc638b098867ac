"""The raw fastrnn ops: against the plain-PyTorch reference, gradcheck,
torch.library.opcheck, torch.compile, and the double-backward error."""

import itertools

import pytest
import torch

import fastrnn
from fastrnn.reference import elman_reference

from conftest import devices, lengths_for

T, B, I, H = 4, 3, 5, 4

CASES = list(itertools.product([False, True], [False, True], [False, True], [False, True]))


def case_id(c):
    relu, reverse, packed, bias = c
    return "-".join(["relu" if relu else "tanh", "rev" if reverse else "fwd",
                     "packed" if packed else "padded", "bias" if bias else "nobias"])


def make_args(relu, reverse, packed, bias, dtype=torch.float64, device="cpu", requires_grad=True, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        t = (torch.rand(*shape, generator=g, dtype=dtype) - 0.5).to(device)
        return t.requires_grad_(requires_grad)

    batch_sizes = None
    if packed:
        lengths = lengths_for(B, T).sort(descending=True).values
        batch_sizes = torch.tensor([int((lengths > t).sum()) for t in range(T)])
        x = rand(int(batch_sizes.sum()), I)
    else:
        x = rand(T, B, I)
    args = (x, rand(B, H), rand(H, I), rand(H, H),
            rand(H) if bias else None, rand(H) if bias else None, batch_sizes)
    return args, dict(relu=relu, reverse=reverse)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_matches_reference(c, device):
    args, kw = make_args(*c, device=device)
    out, h_n = fastrnn.elman(*args, **kw)
    ref_out, ref_h = elman_reference(*args, **kw)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_n, ref_h, rtol=1e-10, atol=1e-12)
    tensors = [a for a in args[:6] if a is not None]
    g = torch.randn_like(out), torch.randn_like(h_n)
    got = torch.autograd.grad((out, h_n), tensors, g)
    want = torch.autograd.grad((ref_out, ref_h), tensors, g)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_gradcheck(c):
    args, kw = make_args(*c)
    assert torch.autograd.gradcheck(lambda *a: fastrnn.elman(*a, **kw), args)


@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_opcheck_forward(c):
    args, kw = make_args(*c)
    torch.library.opcheck(torch.ops.fastrnn.elman_forward.default,
                          (*args, kw["relu"], kw["reverse"]))


@pytest.mark.parametrize("need", [(True, True, True), (False, True, False), (False, False, False)],
                         ids=["all", "weights-only", "none"])
@pytest.mark.parametrize("c", CASES[::3], ids=case_id)
def test_opcheck_backward(c, need):
    args, kw = make_args(*c, requires_grad=False)
    x, hx, w_ih, w_hh, _, _, batch_sizes = args
    out, h_n = fastrnn.elman(*args, **kw)
    bwd_args = (torch.randn_like(out), torch.randn_like(h_n), x, hx, w_ih, w_hh, out,
                batch_sizes, kw["relu"], kw["reverse"], *need)
    torch.library.opcheck(torch.ops.fastrnn.elman_backward.default, bwd_args)
    results = torch.ops.fastrnn.elman_backward(*bwd_args)
    # Gradients that were not asked for are empty (nothing was computed).
    for needed, result, like in zip((need[0], True, need[1], need[1], need[2]), results,
                                    (x, hx, w_ih, w_hh, w_hh[0])):
        assert result.shape == (like.shape if needed else (0,))


def test_unneeded_grads_are_not_computed():
    args, kw = make_args(False, False, False, True)
    x, hx, w_ih, w_hh, b_ih, b_hh, _ = args
    x.requires_grad_(False)
    b_ih.requires_grad_(False)
    b_hh.requires_grad_(False)
    out, h_n = fastrnn.elman(*args, **kw)
    grad_w_ih, grad_hx = torch.autograd.grad(out.sum(), [w_ih, hx])
    assert grad_w_ih.shape == w_ih.shape and grad_hx.shape == hx.shape


def test_double_backward_raises():
    args, kw = make_args(False, False, False, True)
    out, h_n = fastrnn.elman(*args, **kw)
    (gx,) = torch.autograd.grad(out.square().sum(), [args[0]], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compile_fullgraph_matches_eager(packed):
    torch._dynamo.reset()
    from conftest import pack, rnn_pair

    _, rnn = rnn_pair(I, H, num_layers=2, bidirectional=True, seed=3)
    compiled = torch.compile(rnn, fullgraph=True, backend="aot_eager")
    x = torch.randn(T, B, I, requires_grad=True)
    results = []
    for module in (rnn, compiled):
        inp = pack(x, lengths_for(B, T), False) if packed else x
        out, h_n = module(inp)
        out = out.data if packed else out
        loss = (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum() + h_n.square().sum()
        results.append((out, h_n, torch.autograd.grad(loss, [x, *rnn.parameters()])))
    (o1, h1, g1), (o2, h2, g2) = results
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(h2, h1)
    for a, b in zip(g2, g1):
        torch.testing.assert_close(a, b)


def test_compile_inductor_forward_backward():
    """The default backend (inductor) too, on a small training step."""
    torch._dynamo.reset()
    from conftest import rnn_pair

    _, rnn = rnn_pair(I, H, num_layers=2, seed=4)
    compiled = torch.compile(rnn, fullgraph=True)
    x = torch.randn(B, T, I).transpose(0, 1)
    out_e, h_e = rnn(x)
    out_c, h_c = compiled(x)
    torch.testing.assert_close(out_c, out_e)
    torch.testing.assert_close(h_c, h_e)
    ge = torch.autograd.grad(out_e.sum() + h_e.sum(), list(rnn.parameters()))
    gc = torch.autograd.grad(out_c.sum() + h_c.sum(), list(rnn.parameters()))
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


BAD_ARGUMENTS = {
    # name: (packed input?, how to break the arguments, what the error must say)
    "input-rank": (False, lambda a: a.__setitem__(0, a[0][0]), "input must be 3-D"),
    "packed-input-rank": (True, lambda a: a.__setitem__(0, a[0][None]), "input must be 2-D"),
    "hx-rank": (False, lambda a: a.__setitem__(1, a[1][0]), "hx must be 2-D"),
    "hx-batch": (False, lambda a: a.__setitem__(1, a[1][:1]), r"hx must have shape \[3, 4\]"),
    "w_ih-shape": (False, lambda a: a.__setitem__(2, a[2][:, :2]), "weight_ih must have shape"),
    "w_hh-shape": (False, lambda a: a.__setitem__(3, a[3][:2]), "weight_hh must have shape"),
    "bias-shape": (False, lambda a: a.__setitem__(4, a[4][:2]), "bias_ih must have shape"),
    "dtype-mismatch": (False, lambda a: a.__setitem__(3, a[3].float()),
                       "weight_hh must have the same dtype as input"),
    "int-dtype": (False, lambda a: a.__setitem__(0, a[0].int()), "input dtype Int is not supported"),
    "batch-sizes-order": (True, lambda a: a.__setitem__(6, torch.tensor([2, 3, 1, 1])),
                          "batch_sizes must be non-increasing"),
    "batch-sizes-zero": (True, lambda a: a.__setitem__(6, torch.tensor([3, 2, 2, 0])),
                         "batch_sizes must be positive"),
    "batch-sizes-sum": (True, lambda a: a.__setitem__(6, a[6] + 1), "batch_sizes sums to"),
    "batch-sizes-dtype": (True, lambda a: a.__setitem__(6, a[6].double()), "1-D int64 CPU tensor"),
}


@pytest.mark.parametrize("name", BAD_ARGUMENTS)
def test_bad_arguments_name_the_problem(name):
    packed, mutate, match = BAD_ARGUMENTS[name]
    args, kw = make_args(False, False, packed, True, requires_grad=False)
    args = list(args)
    mutate(args)
    with pytest.raises(RuntimeError, match=match) as info:
        fastrnn.elman(*args, **kw)
    assert info.value.args[0].startswith("fastrnn::elman_forward: ")
